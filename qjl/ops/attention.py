"""A layer's attention over its compressed tokens and its exact ones, for a chunk of queries (one: a decode step).

Two fused ops, one per mode, take every tensor a layer holds (codes, scales, the shared matrices, the exact
sink, window and tail tokens) and return the attention output. Their torch implementations below compose the
primitive ops: compressed logits from the key tables, exact logits by matmul, one softmax over both, values
from codes plus the exact part. A CUDA kernel registered beneath an op does all of it in one pass.

Causality: the L queries are the last L exact tokens; everything before them is visible.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from . import dense
from .dense import causal_mask
from .codes import pair_index, unpack_codes, unpack_codes_float
from .scores import lookup_weighted_sum, table_dots
from .tables import byte_onehot, byte_sign_table, byte_table, pair_onehot


def _exact(parts: list[Tensor]) -> Tensor:
    """The exact tokens (sink, window, tail: whichever are present) as one float32 tensor [B, H, n, D]."""
    return torch.cat([t.float() for t in parts], dim=2) if len(parts) > 1 else parts[0].float()


def attend(q: Tensor, exact_k: list[Tensor], exact_v: list[Tensor], scaling: float,
           key_logits: Callable[[Tensor], Tensor], value_sum: Callable[[Tensor], Tensor]) -> Tensor:
    """q: [B, Hq, L, D] -> [B, Hq, L, D] in q's dtype. key_logits(q [B, H, gL, D] float32) -> [B, H, gL, Nc]
    and value_sum(weights [B, H, gL, Nc]) -> [B, H, gL, D] read the compressed part; the query heads of a KV
    head are folded into the query dimension, so each KV head's codes are read once."""
    B, Hq, L, D = q.shape
    H = exact_k[0].shape[1]
    g = Hq // H
    qf = q.float().reshape(B, H, g * L, D)
    logits_c = key_logits(qf) * scaling  # [B, H, gL, Nc]
    k_e, v_e = _exact(exact_k), _exact(exact_v)  # [B, H, Ne, D]
    logits_e = (qf @ k_e.transpose(2, 3)) * scaling  # [B, H, gL, Ne]
    if L > 1:
        mask = causal_mask(L, k_e.shape[2], q.device).repeat(g, 1)  # row r is query position r % L
        logits_e = logits_e.masked_fill(~mask, float("-inf"))
    n_c = logits_c.shape[-1]
    weights = torch.softmax(torch.cat([logits_c, logits_e], dim=-1), dim=-1)
    out = value_sum(weights[..., :n_c]) + weights[..., n_c:] @ v_e
    return out.reshape(B, Hq, L, D).to(q.dtype)


# --- the parts both modes share ---------------------------------------------------------------------
def outlier_scores(q_sel: Tensor, values: Tensor, scales: Optional[Tensor], mins: Optional[Tensor], bits: int,
                   group_size: int) -> Tensor:
    """<q, k> over the r channels kept apart: q_sel [B, H, Q, r] -> [B, H, Q, T] float32.

    bits 16: `values` are fp16 [B, H, T, r]. Otherwise `values` are codes [B, H, NG*r, G*bits/8], one row per
    (token group, channel), with fp16 `scales` and `mins` [B, H, NG*r, 1]: sum_j q_j (s_gj c_gjt + z_gj)."""
    if bits >= 16:
        return q_sel @ values.float().transpose(2, 3)
    B, H, Q, r = q_sel.shape
    G = group_size
    codes = unpack_codes_float(values, bits)  # [B, H, NG*r, G]
    NG = codes.shape[2] // r
    qs = q_sel.unsqueeze(3)  # [B, H, Q, 1, r]
    s = scales.float().view(B, H, 1, NG, r)
    z = mins.float().view(B, H, 1, NG, r)
    dots = torch.einsum("bhqnr,bhnrg->bhqng", qs * s, codes.view(B, H, NG, r, G))
    return (dots + (qs * z).sum(-1, keepdim=True)).reshape(B, H, Q, NG * G)


def scales(norms: Tensor, steps: Optional[Tensor]) -> Tensor:
    """Per-token scales [B, H, T] float32: fp16 `norms` as they are, or 8-bit codes times their group's fp16
    step (`steps` [B, H, T/G]: norm_codes)."""
    if steps is None or norms.shape[2] == 0:
        return norms.float()
    return norms.float() * steps.float().repeat_interleave(norms.shape[2] // steps.shape[2], dim=2)


def _pick(q: Tensor, channels: Tensor) -> Tensor:
    """q [B, H, Q, D] at channels [B, H, r] -> [B, H, Q, r]."""
    B, H, Q, _ = q.shape
    return q.gather(3, channels.unsqueeze(2).expand(B, H, Q, -1))


def sign_scores(q: Tensor, signs: Tensor, norms: Tensor, projection: Tensor, scale: float) -> Tensor:
    """The 1-bit QJL estimate c * ||k|| * <S q, sign(S k)>: q [B, H, Q, d], signs [B, H, T, m/8] -> [B, H, Q, T]."""
    dots = table_dots(byte_sign_table(q @ projection.T), signs)
    return dots * (scale * norms.float().unsqueeze(2))


# --- turbo: rotation + Lloyd-Max codes ---------------------------------------------------------------
def _code_dots(qr: Tensor, packed: Tensor, bits: int, centroids: Tensor) -> Tensor:
    """sum_j qr_j * centroid(code_j) for every query and key of one code part: [B, H, Q, T]. 3 bits with
    `centroids` [64, 2] (a pair codebook): each pair index names a point of it."""
    B, H, Q, D = qr.shape
    if centroids.dim() == 2:  # table[..., i, w] = qr[2i] * c[w, 0] + qr[2i + 1] * c[w, 1]
        return table_dots(qr.reshape(B, H, Q, D // 2, 2) @ centroids.T, pair_index(packed))
    qc = qr.unsqueeze(-1) * centroids  # [B, H, Q, D, 2^b]
    if bits == 3:
        # table[..., i, w] = qc[..., 2i, w & 7] + qc[..., 2i + 1, w >> 3]: one matmul with a 0/1 matrix
        table = qc.reshape(B, H, Q, D // 2, 16) @ pair_onehot(str(qr.device))
        return table_dots(table, pair_index(packed))
    per = 8 // bits
    # table[..., i, byte] = sum_s qc[..., i*per + s, code s of byte]: one matmul with a 0/1 matrix
    table = qc.reshape(B, H, Q, D // per, -1) @ byte_onehot(bits, str(qr.device))
    return table_dots(table, packed)


def turbo_key_scores(q: Tensor, key_codes: list[Tensor], key_bits: list[int], key_centroids: list[Tensor],
                     key_norms: Tensor, key_norm_steps: Optional[Tensor], key_rotation: Tensor,
                     channels: Optional[Tensor], rest: Optional[Tensor],
                     outlier_values: Optional[Tensor], outlier_scales: Optional[Tensor],
                     outlier_mins: Optional[Tensor], outlier_bits: int, group_size: int,
                     residual_signs: Optional[Tensor], residual_norms: Optional[Tensor],
                     residual_projection: Optional[Tensor], residual_scale: float) -> Tensor:
    """Logits <q, k_hat> (+ the residual's QJL estimate): q [B, H, Q, D] float32 -> [B, H, Q, T] float32."""
    extra = None
    if channels is not None:
        extra = outlier_scores(_pick(q, channels), outlier_values, outlier_scales, outlier_mins, outlier_bits,
                               group_size)
        q = _pick(q, rest)
    qr = q @ key_rotation.T  # the query, rotated once
    dots, a = None, 0
    for packed, bits, centroids in zip(key_codes, key_bits, key_centroids):
        n = packed.shape[-1] * 8 // bits
        part = _code_dots(qr[..., a:a + n], packed, bits, centroids)
        dots, a = part if dots is None else dots + part, a + n
    logits = dots * scales(key_norms, key_norm_steps).unsqueeze(2)
    if residual_projection is not None:
        logits = logits + sign_scores(q, residual_signs, residual_norms, residual_projection, residual_scale)
    return logits if extra is None else logits + extra


def value_index(packed: Tensor, bits: int) -> Tensor:
    """What lookup_weighted_sum indexes a value table with: the packed bytes, or the codes for 3 and 9 bits."""
    return unpack_codes(packed, bits) if bits in (3, 9) else packed


def turbo_value_sum(w: Tensor, value_codes: list[Tensor], value_bits: list[int], value_tables: list[Tensor],
                    value_norms: Tensor, value_norm_steps: Optional[Tensor], value_rotation: Tensor) -> Tensor:
    """w [B, H, Q, T] -> sum_t w_t v_t = (sum_t w_t ||v_t|| y_hat_t) R: [B, H, Q, D] float32; the rotation is
    applied once, to the sum. value_tables[p]: [256, per] (a byte to its per numbers), [8, 1] for 3 bits,
    [512, 4] for 9 bits (a 9-bit index to 4 numbers)."""
    wn = w.float() * scales(value_norms, value_norm_steps).unsqueeze(2)
    index = [value_index(p, b) for p, b in zip(value_codes, value_bits)]
    return lookup_weighted_sum(wn, index, value_tables) @ value_rotation


@torch.library.custom_op("qjl::turbo_attention", mutates_args=())
def turbo_attention(q: Tensor, exact_k: list[Tensor], exact_v: list[Tensor], key_codes: list[Tensor],
                    key_bits: list[int], key_centroids: list[Tensor], key_norms: Tensor,
                    key_norm_steps: Optional[Tensor], key_rotation: Tensor,
                    channels: Optional[Tensor], rest: Optional[Tensor], outlier_values: Optional[Tensor],
                    outlier_scales: Optional[Tensor], outlier_mins: Optional[Tensor], outlier_bits: int,
                    group_size: int, residual_signs: Optional[Tensor], residual_norms: Optional[Tensor],
                    residual_projection: Optional[Tensor], residual_scale: float, value_codes: list[Tensor],
                    value_bits: list[int], value_tables: list[Tensor], value_norms: Tensor,
                    value_norm_steps: Optional[Tensor], value_rotation: Tensor, scaling: float) -> Tensor:
    """--kv turbo attention for q [B, Hq, L, D]; layouts in docs/ARCHITECTURE.md. Norms: fp16 [B, H, T], or
    uint8 codes [B, H, T] with fp16 steps [B, H, T/G] (`*_norm_steps`; the scale is code * step)."""
    if q.shape[2] >= dense.MIN_ROWS:  # a long chunk: decoded keys and values, one SDPA (qjl/ops/dense.py)
        k = dense.turbo_keys(key_codes, key_bits, key_centroids, scales(key_norms, key_norm_steps), key_rotation,
                             channels, rest, outlier_values, outlier_scales, outlier_mins, outlier_bits, group_size,
                             residual_signs, residual_norms, residual_projection, residual_scale)
        v = dense.turbo_values(value_codes, value_bits, value_tables, scales(value_norms, value_norm_steps),
                               value_rotation)
        return dense.sdpa_chunk(q, [k, *exact_k], [v, *exact_v], scaling)

    def keys(qf):
        return turbo_key_scores(qf, key_codes, key_bits, key_centroids, key_norms, key_norm_steps, key_rotation,
                                channels, rest, outlier_values, outlier_scales, outlier_mins, outlier_bits, group_size,
                                residual_signs, residual_norms, residual_projection, residual_scale)

    def values(w):
        return turbo_value_sum(w, value_codes, value_bits, value_tables, value_norms, value_norm_steps,
                               value_rotation)

    return attend(q, exact_k, exact_v, scaling, keys, values)


# --- qjl: 1-bit JL keys, integer values ---------------------------------------------------------------
def sketch_key_scores(q: Tensor, signs: Tensor, key_norms: Tensor, projection: Tensor, sketch_scale: float,
                      channels: Optional[Tensor], outlier_values: Optional[Tensor], outlier_scales: Optional[Tensor],
                      outlier_mins: Optional[Tensor], outlier_index: Optional[Tensor], outlier_bits: int,
                      group_size: int, key_mean: Optional[Tensor], penalty: float = 0.0) -> Tensor:
    """<q,k> = <q,mean> + <q,k_out> + c*||k_in||*<Sq, sign(S k_in)>: q [B, H, Q, D] float32 -> [B, H, Q, T].

    Outliers per head (`channels` [B, H, r]; the query's own outlier channels are left out of the sketch's
    estimate) or per token group (`outlier_index` [B, H, NG, r], fp16 `outlier_values` [B, H, T, r]).
    penalty > 0: the sketch part less penalty * (||q'||^2 ||k_in||^2 - est^2)+ (sketch_penalty)."""
    B, H, Q, D = q.shape
    q_sketch = _without(q, channels)
    logits = sign_scores(q_sketch, signs, key_norms, projection, sketch_scale)
    if penalty:
        logits = logits - sketch_penalty(q_sketch, logits, key_norms, penalty)
    if channels is not None:
        logits = logits + outlier_scores(_pick(q, channels), outlier_values, outlier_scales, outlier_mins,
                                         outlier_bits, group_size)
    elif outlier_index is not None:
        idx = outlier_index.long()  # [B, H, NG, r]
        NG, r = idx.shape[2], idx.shape[3]
        vals = outlier_values.float().view(B, H, NG, -1, r)  # [B, H, NG, G, r]
        q_sel = q.gather(3, idx.view(B, H, 1, NG * r).expand(B, H, Q, NG * r)).view(B, H, Q, NG, r)
        logits = logits + torch.einsum("bhqnr,bhngr->bhqng", q_sel, vals).reshape(B, H, Q, -1)
    if key_mean is not None:
        logits = logits + q @ key_mean.unsqueeze(-1)  # [B, H, Q, 1]
    return logits


def _without(q: Tensor, channels: Optional[Tensor]) -> Tensor:
    """q [B, H, Q, D] with the channels kept apart ([B, H, r]) zeroed: what the sketch's estimate sees."""
    return q if channels is None else q.scatter(3, channels.unsqueeze(2).expand(*q.shape[:3], -1), 0.0)


def sketch_penalty(q_sketch: Tensor, est: Tensor, key_norms: Tensor, penalty: float) -> Tensor:
    """penalty * (||q'||^2 ||k_in||^2 - est^2)+: [B, H, Q, T], est the sign estimate of <q', k_in> [B, H, Q, T].

    With penalty = scaling * sketch_variance / 2 (sketch_attention), this is half the variance of each scaled
    logit: softmax over noisy logits weights a token by exp(l + var/2) on average
    (QJLConfig.sketch_softmax_correction)."""
    n2 = key_norms.float().square().unsqueeze(2)  # [B, H, 1, T]
    q2 = q_sketch.square().sum(-1, keepdim=True)  # [B, H, Q, 1]
    return (q2 * n2 - est.square()).clamp_min(0.0) * penalty


def int_value_sum(w: Tensor, codes: Tensor, scales: Tensor, mins: Tensor, bits: int, group: int) -> Tensor:
    """w [B, H, Q, T] -> sum_t w_t v_t: [B, H, Q, D] float32, from `bits`-bit codes with an fp16 scale and
    minimum per group of channels: sum_t w_t v_tc = sum_t (w_t s_tg) code_tc + sum_t w_t z_tg (c in group g)."""
    w = w.float()
    B, H, Q, T = w.shape
    D = codes.shape[-1] * 8 // bits
    ng, gb = D // group, group * bits // 8
    out = w @ mins.float()  # sum_t w_t z_tg: [B, H, Q, ng]
    out = (out.expand(B, H, Q, D) if ng == 1 else out.repeat_interleave(group, dim=-1)).contiguous()
    levels = byte_table(bits, torch.arange(1 << bits, dtype=torch.float32, device=w.device))
    s = scales.float()
    for g in range(ng):
        ws = w * s[..., g].unsqueeze(2)  # [B, H, Q, T]
        out[..., g * group:(g + 1) * group] += lookup_weighted_sum(ws, [codes[..., g * gb:(g + 1) * gb]], [levels])
    return out


@torch.library.custom_op("qjl::sketch_attention", mutates_args=())
def sketch_attention(q: Tensor, exact_k: list[Tensor], exact_v: list[Tensor], signs: Tensor, key_norms: Tensor,
                     projection: Tensor, sketch_scale: float, channels: Optional[Tensor],
                     outlier_values: Optional[Tensor], outlier_scales: Optional[Tensor],
                     outlier_mins: Optional[Tensor], outlier_index: Optional[Tensor], outlier_bits: int,
                     group_size: int, key_mean: Optional[Tensor], sketch_variance: float, value_codes: Tensor,
                     value_scales: Tensor, value_mins: Tensor, value_bits: int, value_group: int,
                     scaling: float) -> Tensor:
    """--kv qjl attention for q [B, Hq, L, D]; layouts in docs/ARCHITECTURE.md. sketch_variance: the sign
    estimate's variance per unit of ||q'||^2 ||k_in||^2 - <q',k_in>^2, times the correction (0: none); each
    compressed logit is lowered by half its variance (sketch_penalty)."""
    penalty = 0.5 * scaling * sketch_variance
    if q.shape[2] >= dense.MIN_ROWS:  # a long chunk: decoded keys and values, one SDPA (qjl/ops/dense.py)
        k, k_in = dense.sketch_keys(signs, key_norms, projection, sketch_scale, channels, outlier_values,
                                    outlier_scales, outlier_mins, outlier_index, outlier_bits, group_size, key_mean)
        v = dense.int_values(value_codes, value_scales, value_mins, value_bits, value_group)
        if not penalty:
            return dense.sdpa_chunk(q, [k, *exact_k], [v, *exact_v], scaling)

        def bias(qf):  # the penalty of query rows qf [B, H, n, D] (folded as in attend): scaled, negated
            q_sketch = _without(qf, channels)
            return -scaling * sketch_penalty(q_sketch, q_sketch @ k_in.transpose(2, 3), key_norms, penalty)

        return dense.sdpa_chunk(q, [k, *exact_k], [v, *exact_v], scaling, bias)

    def keys(qf):
        return sketch_key_scores(qf, signs, key_norms, projection, sketch_scale, channels, outlier_values,
                                 outlier_scales, outlier_mins, outlier_index, outlier_bits, group_size, key_mean,
                                 penalty)

    def values(w):
        return int_value_sum(w, value_codes, value_scales, value_mins, value_bits, value_group)

    return attend(q, exact_k, exact_v, scaling, keys, values)
