"""Time one layer's compressed attention for a decode step, per KV mode, in one run (no model needed).

    python scripts/attention_speed.py --tokens 4096 --heads 9 --kv-heads 3 --head-dim 64

Random keys and values fill one QJLLayer per setting; the best of --repeats alternating runs of --steps
calls to QJLLayer.attend (the mode's fused op) is reported in ms. The embedded model has 30 such layers.
"turbo, torch code" is the default with the CPU kernels of qjl/native switched off for the op, so the two rows
compare the kernel with the op's torch implementation in one run.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from contextlib import nullcontext

from qjl.cache import QJLLayer
from qjl.config import QJLConfig
from qjl.ops import turbo_attention

SETTINGS = {
    "qjl": QJLConfig(kv="qjl"),
    "turbo": QJLConfig(),
    "turbo, torch code": QJLConfig(),
    "turbo, format 4 (scalar K3, V2 vq4-256, fp16 scales)": QJLConfig(turbo_key_codebook="scalar", turbo_value_bits=2,
                                                                    turbo_norm_bits=16),
    "turbo, no channels apart": QJLConfig(turbo_outlier_fraction=0.0),
}


def _kernels(name: str):
    return turbo_attention.set_kernel_enabled("cpu", False) if name.endswith("torch code") else nullcontext()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--heads", type=int, default=9)
    p.add_argument("--kv-heads", type=int, default=3)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args()
    torch.set_grad_enabled(False)
    torch.manual_seed(0)
    B, H, Hq, D, T = 1, args.kv_heads, args.heads, args.head_dim, args.tokens
    layers = {}
    for name, cfg in SETTINGS.items():
        layer = QJLLayer(cfg, 0, D, H)
        layer.update(torch.randn(B, H, T, D), torch.randn(B, H, T, D))
        layer.compress_excess(torch.randn(B, Hq, 32, D))
        layer.freeze()
        layers[name] = layer
    q = torch.randn(B, Hq, 1, D)
    best = {}
    for _ in range(args.repeats):
        for name, layer in layers.items():
            with _kernels(name):
                for _ in range(3):
                    layer.attend(q, D ** -0.5)
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    layer.attend(q, D ** -0.5)
            best[name] = min(best.get(name, float("inf")), (time.perf_counter() - t0) / args.steps * 1000)
    print(f"# {T} tokens, {Hq} query heads, {H} KV heads of {D}, {torch.get_num_threads()} threads", file=sys.stderr)
    print("| setting | ms per call |")
    print("| --- | --- |")
    for name, ms in best.items():
        print(f"| {name} | {ms:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
