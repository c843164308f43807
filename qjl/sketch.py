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
                   passes: int = RESIDUAL_PASSES) -> tuple[torch.Tensor, torch.Tensor]:
    """+-1 signs [..., m] of keys k [..., d] against a block-weighted projection S [m, d] (jl_projection with a
    block_weight), and <S^T signs, k> [...]. Block 0 signs k itself; each later block signs what the blocks
    before it leave of k, the reconstruction being a * S^T signs with a fitted to block 0; then `passes` rounds
    re-sign each block given all the others. keep: 1 on the channels the sketch covers, 0 on those kept apart
    (their error does not count), one row per head ([..., 1, d] or [d]; None: every channel counts). Worked in
    the signs' space: with G = S diag(keep) S^T, block i sees S_i (k - a S^T signs) = (S k)_i - a (signs G)_i.
    Sign convention of sign_bits: x > 0 is +1, otherwise -1."""
    d, m = k.shape[-1], projection.shape[0]
    blocks = [slice(i, min(i + d, m)) for i in range(0, m, d)]
    pk = k @ projection.T  # [..., m]
    gram = (projection if keep is None else projection * keep) @ projection.T  # [m, m] or [..., m, m]

    def sign(x):
        return x.gt(0).to(k.dtype).mul_(2).sub_(1)

    def others(signs, i, upto):  # (sum over blocks j != i, j < upto, of signs_j G_ji) for block i
        return sum(signs[j] @ gram[..., blocks[j], blocks[i]] for j in range(upto) if j != i)

    signs = [sign(pk[..., blocks[0]])]
    b0 = signs[0]
    a = ((b0 * pk[..., blocks[0]]).sum(-1, keepdim=True)
         / ((b0 @ gram[..., blocks[0], blocks[0]]) * b0).sum(-1, keepdim=True).clamp_min(1e-30))
    for i in range(1, len(blocks)):
        signs.append(sign(pk[..., blocks[i]] - a * others(signs, i, i)))
    for _ in range(passes if len(blocks) > 1 else 0):
        for i in range(len(blocks)):
            signs[i] = sign(pk[..., blocks[i]] - a * others(signs, i, len(blocks)))
    out = torch.cat(signs, dim=-1)
    return out, (out * pk).sum(-1)


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
    signs, along = residual_signs(k, s, keep)
    u = signs @ s
    unit = k.pow(2).sum(-1) / along  # the scale with c = 1
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
