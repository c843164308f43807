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
    p.add_argument("--modes", nargs="+", default=["exact", "qjl"], help="caches to compare; the first is the reference")
    p.add_argument("--model", default=None)
    args = p.parse_args()
    torch.set_grad_enabled(False)
    loaded = load_model(args.model)
    print(f"# {loaded.name}, {torch.get_num_threads()} threads, device {next(loaded.model.parameters()).device}",
          file=sys.stderr)
    ref = args.modes[0]
    others = args.modes[1:]
    print("| context | " + " | ".join(f"{m} ms/token" for m in args.modes) + " | "
          + " | ".join(f"ratio {m}/{ref}" for m in others) + " |")
    print("| --- " * (1 + len(args.modes) + len(others)) + "|")
    rows = []
    for context in args.context:
        best = {}
        for _ in range(args.repeats):
            for kv in args.modes:
                r = decode_speed(loaded.model, context, QJLConfig(kv=kv), steps=args.steps)
                best[kv] = min(best.get(kv, float("inf")), r["decode_ms_per_token"])
        ratios = {m: best[m] / best[ref] for m in others}
        rows.append({"context": context, **{f"{k}_ms": v for k, v in best.items()},
                     **{f"ratio_{m}": r for m, r in ratios.items()}})
        print(f"| {context} | " + " | ".join(f"{best[m]:.1f}" for m in args.modes) + " | "
              + " | ".join(f"{r:.2f}" for r in ratios.values()) + " |", flush=True)
    print(json.dumps(rows), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
