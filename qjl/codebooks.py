"""Codebooks and rotations of the turbo codecs, and the 0/1 matrices that build their scoring tables.

The rotation R is random orthogonal (one per layer class and role, from a seed); after it every coordinate
of a unit vector in R^d has the density (1 - t^2)^((d-3)/2) on [-1, 1] (about N(0, 1/d)), for which the
Lloyd-Max quantiser is solved once here. 2 and 2.25-bit values may instead use a 4-D k-means codebook of
N(0, 1)^4 (qjl/data/vq4_256.txt, vq4_512.txt), and 3-bit keys a 2-D one of 64 points (vq2_64.txt), all made by
scripts/make_vq_codebook.py.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import numpy as np
import torch


TURBO_BITS = (1, 2, 3, 4)


# --- rotation -----------------------------------------------------------------------------------
@functools.lru_cache(maxsize=16)
def rotation(d: int, seed: int) -> torch.Tensor:
    """R: [d, d] float32 orthogonal, Haar-distributed (QR of a Gaussian, sign-fixed). Memoised, never modified."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)
    return q.T.to(torch.float32).contiguous()


@functools.lru_cache(maxsize=32)
def rotation_on(d: int, seed: int, device: str) -> torch.Tensor:
    """rotation() on a device, one copy per device shared by the layers that use it."""
    return rotation(d, seed).to(device)


# --- Lloyd-Max codebooks ------------------------------------------------------------------------
@functools.lru_cache(maxsize=8)
def _density(d: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(grid x, cumulative mass F(x), cumulative first moment M(x)) of the coordinate density.

    d = 0 means N(0, 1); d >= 4 means a coordinate of a uniform unit vector in R^d.
    """
    if d == 0:
        x = np.linspace(-12.0, 12.0, 400001)
        p = np.exp(-0.5 * x * x)
    else:
        x = np.linspace(-1.0, 1.0, 400001)
        with np.errstate(divide="ignore"):
            p = np.exp((d - 3) / 2 * np.log1p(-x * x))
    dx = x[1] - x[0]
    cum = lambda f: np.concatenate([[0.0], np.cumsum((f[1:] + f[:-1]) * dx / 2)])  # noqa: E731 (trapezoid)
    return x, cum(p), cum(p * x)


def solve_lloyd_max(bits: int, d: int, iters: int = 20000, tol: float = 1e-12) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd-Max quantiser of the density for d (0: N(0,1)) -> (centroids [2^b], boundaries [2^b - 1]).

    Alternates boundaries = midpoints of centroids and centroids = conditional means of their cells,
    the cell integrals read off cumulative sums on a fine grid (interpolated, so they move smoothly).
    """
    x, F_, M_ = _density(d)
    n = 1 << bits
    c = np.interp((np.arange(n) + 0.5) / n, F_ / F_[-1], x)  # start at the quantiles
    for _ in range(iters):
        b = np.concatenate([[x[0]], (c[1:] + c[:-1]) / 2, [x[-1]]])
        Fb, Mb = np.interp(b, x, F_), np.interp(b, x, M_)
        new = np.diff(Mb) / np.diff(Fb)
        done = np.abs(new - c).max() < tol
        c = new
        if done:
            break
    return c, (c[1:] + c[:-1]) / 2


@functools.lru_cache(maxsize=32)
def codebook(bits: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(centroids [2^b], boundaries [2^b - 1]) float32 for a rotated unit vector's coordinate in R^d."""
    if bits not in TURBO_BITS:
        raise ValueError(f"turbo codes have 1 to 4 bits, not {bits}")
    c, b = solve_lloyd_max(bits, d)
    return torch.tensor(c, dtype=torch.float32), torch.tensor(b, dtype=torch.float32)


@functools.lru_cache(maxsize=32)
def codebook_on(bits: int, d: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    c, b = codebook(bits, d)
    return c.to(device), b.to(device)


@functools.lru_cache(maxsize=4)
def vq_codebook(c: int, points: int) -> torch.Tensor:
    """[points, c] float32: k-means codebook of c independent N(0, 1) numbers (qjl/data/vq{c}_{points}.txt, made
    by scripts/make_vq_codebook.py). Mean squared error a number: 4-D, 256 points (2 bits) 0.096 and 512 points
    (2.25 bits) 0.070, against 0.1175 for the scalar 2-bit Lloyd-Max code; 2-D, 64 points (3 bits) 0.030,
    against 0.0345 for the scalar 3-bit code."""
    path = Path(__file__).parent / "data" / f"vq{c}_{points}.txt"
    rows = [line.split() for line in path.read_text().splitlines() if line and not line.startswith("#")]
    return torch.tensor([[float(v) for v in row] for row in rows], dtype=torch.float32)


def vq4_codebook(points: int = 256) -> torch.Tensor:
    return vq_codebook(4, points)


@functools.lru_cache(maxsize=16)
def vq_on(c: int, points: int, dim: int, device: str) -> torch.Tensor:
    """A c-D codebook for coordinates of a rotated unit vector of `dim` (about N(0, 1/dim)), on a device."""
    return (vq_codebook(c, points) / math.sqrt(dim)).to(device)


def vq4_on(dim: int, device: str, points: int = 256) -> torch.Tensor:
    return vq_on(4, points, dim, device)


def pair_codebook_on(dim: int, device: str) -> torch.Tensor:
    """[64, 2]: the 2-D codebook of 3-bit keys, each pair of rotated coordinates one of 64 points (a 6-bit pair
    index, laid out as two 3-bit codes: pair_index reads it back)."""
    return vq_on(2, 64, dim, device)



def split_bits(bits: float, dim: int) -> list[tuple[int, int, int]]:
    """Fractional bits as parts of the rotated coordinates: [(bits, start, end)], the first part floor(bits),
    the last (a multiple of 8 coordinates) one bit more, so that the mean is about `bits`. After a random
    rotation the coordinates are alike, so which ones get the extra bit does not matter."""
    lo = int(math.floor(bits + 1e-9))
    n_hi = 0 if lo >= 4 else int(round((bits - lo) * dim / 8)) * 8
    if lo not in TURBO_BITS:
        raise ValueError(f"turbo codes have 1 to 4 bits, not {bits}")
    if n_hi >= dim:
        return [(lo + 1, 0, dim)]
    return [(lo, 0, dim - n_hi)] + ([(lo + 1, dim - n_hi, dim)] if n_hi else [])
