"""JL projections, residual signs and bit packing.

The projection S is drawn from a seed with torch's CPU generator, orthogonalised
in blocks of d rows (QR) and its rows rescaled to norm sqrt(d): the same
expectation as an i.i.d. Gaussian sketch with lower variance (QJL paper, §4).

Residual signs (`--kv qjl`'s default): block b of S is weighted w^b and its
signs code what the blocks before it leave of the key, rather than the key
itself (the paper's). The estimate c * scale * <Sq, signs> keeps its form, so
the attention ops and kernels read these signs exactly as the paper's.
"""

from __future__ import annotations

import functools
import math

import torch

from .ops import pack_codes, unpack_codes


@functools.lru_cache(maxsize=64)
def jl_projection(m: int, d: int, seed: int, block_weight: float = 0.0) -> torch.Tensor:
    """S: [m, d] float32, rows orthogonal within each block of d rows, each row of norm sqrt(d); with a
    block_weight w > 0 (residual signs) the rows of block b are then scaled by w^b.

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
    if block_weight > 0:
        s = s * torch.tensor([block_weight ** (i // d) for i in range(m)], dtype=s.dtype).unsqueeze(1)
    return s.to(torch.float32).contiguous()


@functools.lru_cache(maxsize=64)
def jl_projection_on(m: int, d: int, seed: int, device: str, block_weight: float = 0.0) -> torch.Tensor:
    """jl_projection on a device, one copy per device shared by the layers that use it."""
    return jl_projection(m, d, seed, block_weight).to(device)


RESIDUAL_PASSES = 3  # alternating passes after the first, each block re-signed given the others


def residual_signs(k: torch.Tensor, projection: torch.Tensor, keep: torch.Tensor | None = None,
                   passes: int = RESIDUAL_PASSES) -> torch.Tensor:
    """+-1 signs [..., m] of keys k [..., d] against a block-weighted projection [m, d] (jl_projection with a
    block_weight): block 0 signs k itself; each later block signs what the blocks before it leave, the
    reconstruction being a * sum_b S_b^T signs_b with a fitted to block 0; then `passes` rounds re-sign each
    block given all the others. keep: 1 on the channels the sketch covers, 0 on those kept apart (their error
    does not count), broadcastable to k. Sign convention of sign_bits: x > 0 is +1, otherwise -1."""
    d = k.shape[-1]
    blocks = [projection[i:i + d] for i in range(0, projection.shape[0], d)]

    def sign(x):
        return torch.where(x > 0, 1.0, -1.0).to(k.dtype)

    def part(b, block):  # one block's contribution to the reconstruction, on the covered channels
        v = b @ block
        return v if keep is None else v * keep

    signs, parts = [], []
    rest = k
    for i, block in enumerate(blocks):
        signs.append(sign(rest @ block.T))
        parts.append(part(signs[-1], block))
        if i == 0:
            scale = (parts[0] * k).sum(-1, keepdim=True) / parts[0].pow(2).sum(-1, keepdim=True).clamp_min(1e-30)
        rest = rest - scale * parts[-1]
    for _ in range(passes if len(blocks) > 1 else 0):
        for i, block in enumerate(blocks):
            others = sum(p for j, p in enumerate(parts) if j != i)
            signs[i] = sign((k - scale * others) @ block.T)
            parts[i] = part(signs[i], block)
    return torch.cat(signs, dim=-1)


@functools.lru_cache(maxsize=64)
def residual_constants(m: int, d: int, apart: int, block_weight: float) -> tuple[float, float]:
    """(c, v) of residual signs, measured once on 4,096 Gaussian keys and queries with `apart` channels zeroed:
    c makes the stored scale |k|^2 / (c <S^T signs, k>) (the scale that keeps <k_hat, k> = |k|^2) equal |k| on
    average, and v is the estimate's variance per unit of |q|^2 scale^2 - est^2 (the paper's signs: (pi/2 - 1)/m)."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    keep = torch.ones(d, dtype=torch.float64)
    keep[:apart] = 0
    k = torch.randn(4096, d, generator=gen, dtype=torch.float64) * keep
    q = torch.randn(4096, d, generator=gen, dtype=torch.float64) * keep
    s = jl_projection(m, d, 1, block_weight).double()
    u = residual_signs(k, s, keep) @ s
    unit = k.pow(2).sum(-1) / (u * k).sum(-1)  # the scale with c = 1
    c = (unit / k.norm(dim=-1)).mean().item()
    scale = unit / c
    est = c * scale * (q * u).sum(-1)
    err = est - (q * k).sum(-1)
    v = err.pow(2).mean() / (q.pow(2).sum(-1) * scale ** 2 - est ** 2).mean()
    return c, v.item()


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
