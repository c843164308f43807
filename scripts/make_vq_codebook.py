"""Regenerate qjl/data/vq4_256.txt, vq4_512.txt and vq2_64.txt: codebooks for 4 (or 2) independent N(0, 1)
numbers (k-means, Lloyd's algorithm, on samples from a fixed seed). Turbo's values code 4 rotated coordinates
with a 4-D one (scaled by 1/sqrt(d)): 256 points, 2 bits a number, mean squared error 0.096 against 0.1175 for
the scalar 2-bit Lloyd-Max code; 512 points (the default), 2.25 bits a number, 0.070. Its 3-bit keys code each
2 coordinates with the 64-point 2-D one: 0.030 against 0.0345 for the scalar 3-bit code.

    python scripts/make_vq_codebook.py [--codebook 4x256|4x512|2x64]   # 15 s to 6 min on 2 cores
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

DATA = Path(__file__).resolve().parent.parent / "qjl" / "data"
# "dims x points": (seed, samples, iterations)
RECIPES = {"4x256": (20261124, 400_000, 100), "4x512": (20261206, 600_000, 120), "2x64": (20261207, 400_000, 150)}


def kmeans(x: torch.Tensor, k: int, iters: int, gen: torch.Generator) -> torch.Tensor:
    c = x[torch.randperm(x.shape[0], generator=gen)[:k]].clone()
    for _ in range(iters):
        a = (x @ c.T - 0.5 * (c * c).sum(1)).argmax(1)  # nearest centroid
        s = torch.zeros_like(c).index_add_(0, a, x)
        n = torch.bincount(a, minlength=k).to(x.dtype).unsqueeze(1)
        c = torch.where(n > 0, s / n.clamp_min(1), c)
    return c


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--codebook", choices=sorted(RECIPES), default="4x512")
    name = p.parse_args().codebook
    dims, k = map(int, name.split("x"))
    seed, samples, iters = RECIPES[name]
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, dims, generator=gen, dtype=torch.float64)
    c = kmeans(x, k, iters, gen)
    c = c[torch.argsort(c[:, 0] * 1e6 + c[:, 1] * 1e3 + (c[:, 2] if dims > 2 else 0))]  # a stable order
    a = (x @ c.T - 0.5 * (c * c).sum(1)).argmax(1)
    mse = ((x - c[a]) ** 2).mean().item()
    out = DATA / f"vq{dims}_{k}.txt"
    lines = [f"# {k} x {dims} k-means codebook of N(0, 1)^{dims} (scripts/make_vq_codebook.py); mse per number %.5f" % mse]
    lines += [" ".join(f"{v:.8f}" for v in row.tolist()) for row in c]
    out.write_text("\n".join(lines) + "\n")
    print(f"{out}: mse {mse:.5f}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
