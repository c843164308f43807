"""The encode steps of the codecs: turning float vectors into packed codes."""

from __future__ import annotations

import torch
from torch import Tensor

from .codes import pack_codes

_BIT_WEIGHTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


@torch.library.custom_op("qjl::sign_bits", mutates_args=())
def sign_bits(x: Tensor) -> Tensor:
    """float [..., n] (n a multiple of 8) -> uint8 [..., n/8]: bit j of byte i is x[8i + j] > 0."""
    *lead, n = x.shape
    if n % 8:
        raise ValueError(f"cannot pack {n} bits into whole bytes")
    b = (x > 0).reshape(*lead, n // 8, 8).to(torch.uint8)
    return (b * _BIT_WEIGHTS.to(b.device)).sum(dim=-1, dtype=torch.uint8)


@torch.library.custom_op("qjl::scalar_quantize", mutates_args=())
def scalar_quantize(y: Tensor, boundaries: Tensor, bits: int) -> Tensor:
    """Lloyd-Max codes of y [..., n] float32 (the cell of each number among the sorted `boundaries`,
    [2^bits - 1]), packed -> uint8 [..., n*bits/8]."""
    return pack_codes(torch.bucketize(y.contiguous(), boundaries).to(torch.uint8), bits)


@torch.library.custom_op("qjl::vq_nearest", mutates_args=())
def vq_nearest(y: Tensor, codebook: Tensor) -> Tensor:
    """The nearest codebook point of each group of c numbers: y [..., n*c] float32, codebook [K <= 512, c]
    -> [..., n], uint8 for K <= 256, else int16 (argmax of <g, c> - |c|^2 / 2, the nearest point without
    forming distances; the first of equal scores)."""
    c = codebook.shape[1]
    g = y.reshape(*y.shape[:-1], y.shape[-1] // c, c)
    best = (g @ codebook.T - 0.5 * (codebook * codebook).sum(-1)).argmax(-1)
    return best.to(torch.uint8 if codebook.shape[0] <= 256 else torch.int16)


@torch.library.custom_op("qjl::norm_codes", mutates_args=())
def norm_codes(norms: Tensor, group: int) -> tuple[Tensor, Tensor]:
    """Scales in 8 bits: fp16 [B, H, T] (T a multiple of `group`, every scale >= 0) -> (uint8 codes [B, H, T],
    fp16 steps [B, H, T/group]); a scale is code * step, step = the group's largest / 255 rounded to fp16
    first, and the codes chosen against the rounded step (the best for what is stored)."""
    B, H, T = norms.shape
    if T % group:
        raise ValueError(f"{T} tokens is not a multiple of the norm group {group}")
    n = norms.float().clamp_min(0).view(B, H, T // group, group)
    step = (n.amax(-1) / 255).to(torch.float16)
    safe = torch.where(step.float() > 0, step.float(), torch.ones_like(step, dtype=torch.float32))
    codes = (n / safe.unsqueeze(-1)).round().clamp_(0, 255).to(torch.uint8)
    return codes.view(B, H, T), step


FIT_ROUNDS = 6  # int_quantize(fit=True): rounds of codes <-> least-squares scale and minimum (converged by 4-5)


@torch.library.custom_op("qjl::int_quantize", mutates_args=())
def int_quantize(v: Tensor, bits: int, group: int, fit: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """Asymmetric integer codes of each `group` numbers of v [B, H, T, D] float32 -> (codes packed
    [B, H, T, D*bits/8] uint8, scales [B, H, T, D/group] fp16, minimums [B, H, T, D/group] fp16).

    Without `fit`: the group's minimum and (maximum - minimum) / levels, rounded to fp16 first, and the codes
    chosen against the rounded ones (the best codes for what is stored).
    With `fit`: from there, FIT_ROUNDS rounds of nearest codes and the least-squares scale and minimum for them
    (about half the min/max squared error at 2 bits), then the scale stretched about the group's mean m so that
    <x - m, x_hat - m> = |x - m|^2, codes kept: least-squares alone shortens every decoded group along itself by
    its relative error (~12% at 2 bits), a shrinkage the attention-weighted sum of many tokens keeps
    (BENCHMARKS.md "Fitted integer values")."""
    B, H, T, D = v.shape
    vg = v.float().view(B, H, T, D // group, group)
    levels = (1 << bits) - 1
    if fit:
        codes, scale, vmin = _fit_codes(vg, levels)
        return pack_codes(codes.to(torch.uint8).view(B, H, T, D), bits), scale, vmin
    vmin = vg.amin(dim=-1).to(torch.float16)
    vmax = vg.amax(dim=-1)
    scale = ((vmax - vmin.float()) / levels).to(torch.float16)
    safe = torch.where(scale.float() > 0, scale.float(), torch.ones_like(vmax))
    codes = ((vg - vmin.float().unsqueeze(-1)) / safe.unsqueeze(-1)).round().clamp_(0, levels)
    return pack_codes(codes.to(torch.uint8).view(B, H, T, D), bits), scale, vmin


def _fit_codes(x: Tensor, levels: int) -> tuple[Tensor, Tensor, Tensor]:
    """int_quantize's fit over groups x [..., group]: (float codes, fp16 scales, fp16 minimums)."""
    lo = x.amin(-1)
    sc = (x.amax(-1) - lo) / levels
    xm = x.mean(-1)
    xc = x - xm.unsqueeze(-1)
    for _ in range(FIT_ROUNDS + 1):
        safe = torch.where(sc > 0, sc, torch.ones_like(sc))
        codes = ((x - lo.unsqueeze(-1)) / safe.unsqueeze(-1)).round().clamp_(0, levels)
        cm = codes.mean(-1)
        cc = codes - cm.unsqueeze(-1)
        var, cov = (cc * cc).sum(-1), (cc * xc).sum(-1)
        sc = torch.where(var > 0, cov / torch.where(var > 0, var, torch.ones_like(var)), sc)
        lo = torch.where(var > 0, xm - sc * cm, lo)
    # the last round's codes, on the line through (cm, m) whose slope makes <x - m, x_hat - m> = sc cov = |x - m|^2
    sc = torch.where(cov > 0, (xc * xc).sum(-1) / torch.where(cov > 0, cov, torch.ones_like(cov)), sc)
    return codes, sc.to(torch.float16), (xm - sc * cm).to(torch.float16)
