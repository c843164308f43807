"""The Markdown table of a `qjl bench --json` run, for BENCHMARKS.md (the same cells as the terminal table).

    qjl bench --context 8k --quality --json > bench8k.json
    python scripts/bench_markdown.py bench8k.json
"""

from __future__ import annotations

import json
import sys

from qjl_cli.bench import markdown_table


def main() -> int:
    if len(sys.argv) == 2 and sys.argv[1] in ("-h", "--help"):
        print(__doc__)
        return 0
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    with open(sys.argv[1]) as f:
        result = json.load(f)
    s = result["settings"]
    print(f"```\n{s.get('command') or 'qjl bench'}\n```\n")
    print(f"{s['model_name']} · {result['machine']['line']}; median of {s['repeat']} rounds, {s['steps']} decode "
          f"steps, peak memory = {result['machine']['peak_memory']}.\n")
    print(markdown_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
