"""JL projections and bit packing.

The projection S is drawn from a seed with torch's CPU generator, orthogonalised
in blocks of d rows (QR) and its rows rescaled to norm sqrt(d): the same
expectation as an i.i.d. Gaussian sketch with lower variance (QJL paper, §4).
"""

from __future__ import annotations

import functools
import math

import torch

from .ops import pack_codes, unpack_codes


@functools.lru_cache(maxsize=64)
def jl_projection(m: int, d: int, seed: int) -> torch.Tensor:
    """S: [m, d] float32, rows orthogonal within each block of d rows, each row of norm sqrt(d).

    Memoised: layers of one class share one tensor (never modified in place).
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    blocks = []
    for start in range(0, m, d):
        rows = min(d, m - start)
        g = torch.randn(d, d, generator=gen, dtype=torch.float64)
        q, r = torch.linalg.qr(g)
        # Sign fix makes Q Haar-distributed rather than biased by the QR convention.
        q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)
        blocks.append(q.T[:rows])
    s = torch.cat(blocks, dim=0)
    s = s * (math.sqrt(d) / s.norm(dim=1, keepdim=True))
    return s.to(torch.float32).contiguous()


@functools.lru_cache(maxsize=64)
def jl_projection_on(m: int, d: int, seed: int, device: str) -> torch.Tensor:
    """jl_projection on a device, one copy per device shared by the layers that use it."""
    return jl_projection(m, d, seed).to(device)


def sign_estimator_scale(m: int, d: int) -> float:
    """c with <q,k> = c * ||k|| * E<Sq, sign(Sk)> for rows uniform on the sphere of radius sqrt(d).

    For a Gaussian row the constant is sqrt(pi/2)/m (the paper's). Rows rescaled to
    norm sqrt(d) give E|u.x| = sqrt(d) * Gamma(d/2) / (sqrt(pi) Gamma((d+1)/2)) for
    unit x, which we use so the estimator is unbiased exactly (0.4% apart at d=64).
    """
    mean_abs = math.sqrt(d) * math.exp(math.lgamma(d / 2) - math.lgamma((d + 1) / 2)) / math.sqrt(math.pi)
    return 1.0 / (m * mean_abs)


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """bool [..., n] (n multiple of 8) -> uint8 [..., n/8], bit j of byte i is bits[8i + j] (1-bit pack_codes)."""
    if bits.shape[-1] % 8:
        raise ValueError(f"cannot pack {bits.shape[-1]} bits into whole bytes")
    return pack_codes(bits.to(torch.uint8), 1)


def unpack_bits(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., n/8] -> bool [..., n]; the inverse of pack_bits."""
    return unpack_codes(packed, 1).bool()
