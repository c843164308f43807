"""Decode ms/token with the exact cache and the QJL cache at the same context, in one run.

    python scripts/decode_speed.py --context 4096 --steps 32

Both runs prefill the same random tokens, then time greedy decode steps; the
ratio (qjl / exact) is the figure to compare across machines.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from qjl.bench import decode_speed
from qjl.config import QJLConfig
from qjl.models import load_model


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--context", type=int, nargs="+", default=[4096])
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2, help="alternate exact/qjl runs this many times; best of each")
    p.add_argument("--model", default=None)
    args = p.parse_args()
    torch.set_grad_enabled(False)
    loaded = load_model(args.model)
    print(f"# {loaded.name}, {torch.get_num_threads()} threads, device {next(loaded.model.parameters()).device}",
          file=sys.stderr)
    print("| context | exact ms/token | qjl ms/token | ratio qjl/exact |")
    print("| --- | --- | --- | --- |")
    rows = []
    for context in args.context:
        best = {}
        for _ in range(args.repeats):
            for kv in ("exact", "qjl"):
                r = decode_speed(loaded.model, context, QJLConfig(kv=kv), steps=args.steps)
                best[kv] = min(best.get(kv, float("inf")), r["decode_ms_per_token"])
        ratio = best["qjl"] / best["exact"]
        rows.append({"context": context, **{f"{k}_ms": v for k, v in best.items()}, "ratio": ratio})
        print(f"| {context} | {best['exact']:.1f} | {best['qjl']:.1f} | {ratio:.2f} |", flush=True)
    print(json.dumps(rows), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
