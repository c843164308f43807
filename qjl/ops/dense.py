"""Long chunks (a document's prefill): the compressed tokens decoded to dense K/V, then one fused SDPA call.

Every score the fused ops compute from codes is an inner product of the query with a vector that the codes
determine (turbo: the rotated centroids times the norm, plus the residual sketch's c·‖r‖·sign(S r)ᵀS; qjl: the
sketch's c·‖k‖·sign(S k)ᵀS, the outlier channels, the mean), and every value sum is a weighted sum of decoded
vectors. So attention over a chunk of L queries equals SDPA over [decoded compressed tokens, exact tokens] with
the causal mask aligned to the last L keys. For a long chunk that is the fast way on every device: decoding
costs O(T·D²) once per chunk, where scoring from tables costs O(L·T·D) look-ups and materialises the
[heads, L, T] logits in fp32 (the GPU prefill's 2x peak memory); SDPA (flash or memory-efficient attention)
never does. A decode step (L = 1) keeps reading codes: decoding every token for one query would read and write
more bytes than the exact cache holds. docs/ARCHITECTURE.md, "The ops".
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.bias import causal_lower_right

from .codes import pair_index, unpack_codes

# Query chunks of at least this many rows take the dense path (question chunks and decode steps stay on codes).
MIN_ROWS = 64


def causal_mask(q_len: int, kv_len: int, device) -> Tensor:
    """bool [q_len, kv_len]: query i (the last q_len positions) sees keys j <= kv_len - q_len + i."""
    i = torch.arange(q_len, device=device).unsqueeze(1)
    j = torch.arange(kv_len, device=device).unsqueeze(0)
    return j <= (kv_len - q_len) + i


# Floats of the additive mask a biased chunk builds at once (query rows x heads x keys): 256 MiB.
BIAS_FLOATS = 1 << 26


def sdpa_chunk(q: Tensor, keys: list[Tensor], values: list[Tensor], scaling: float,
               bias: Optional[Callable[[Tensor], Tensor]] = None) -> Tensor:
    """q [B, Hq, L, D] over keys/values [B, H, n, D] given in token order, the last L being the queries' own:
    query i sees every key up to its own position. Computed in q's dtype; GQA by head groups.

    bias(rows [B, H, g*l, D] float32, the query heads of a KV head folded as in qjl.ops.attention.attend) ->
    [B, H, g*l, n0]: added to the scaled scores of the first part, keys[0] (the compressed tokens); the queries
    then go in blocks of rows so the mask stays under BIAS_FLOATS."""
    dtype = q.dtype
    if bias is not None and keys[0].shape[2]:
        return _biased_chunk(q, keys, values, scaling, bias)
    keys, values = [t for t in keys if t.shape[2]], [t for t in values if t.shape[2]]  # nothing compressed yet
    k = torch.cat([t.to(dtype) for t in keys], dim=2) if len(keys) > 1 else keys[0].to(dtype)
    v = torch.cat([t.to(dtype) for t in values], dim=2) if len(values) > 1 else values[0].to(dtype)
    L, N, g = q.shape[2], k.shape[2], q.shape[1] // k.shape[1]
    if L == N:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, enable_gqa=g > 1)
    if g > 1:  # the lower-right causal bias has no GQA path: one layer's K/V repeated, transiently
        k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(L, N), scale=scaling)


def _biased_chunk(q: Tensor, keys: list[Tensor], values: list[Tensor], scaling: float,
                  bias: Callable[[Tensor], Tensor]) -> Tensor:
    """sdpa_chunk with a bias on keys[0]: an explicit float mask (bias, then the causal part), by row blocks."""
    B, Hq, L, D = q.shape
    dtype = q.dtype
    k = torch.cat([t.to(dtype) for t in keys if t.shape[2]], dim=2)
    v = torch.cat([t.to(dtype) for t in values if t.shape[2]], dim=2)
    H, n0, N = k.shape[1], keys[0].shape[2], k.shape[2]
    g = Hq // H
    if g > 1:
        k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    rows = max(1, BIAS_FLOATS // (B * Hq * N))
    seen = causal_mask(L, N, q.device)
    out = []
    for a in range(0, L, rows):
        qb = q[:, :, a:a + rows]
        n = qb.shape[2]
        mask = torch.zeros(B, Hq, n, N, device=q.device)
        mask[..., :n0] = bias(qb.float().reshape(B, H, g * n, D)).reshape(B, Hq, n, n0)
        mask.masked_fill_(~seen[a:a + n], float("-inf"))
        out.append(F.scaled_dot_product_attention(qb, k, v, attn_mask=mask.to(dtype), scale=scaling))
    return torch.cat(out, dim=2) if len(out) > 1 else out[0]


def signs_dense(signs: Tensor, projection: Tensor) -> Tensor:
    """sign(S k)ᵀ S as vectors: packed signs [B, H, T, m/8] (bit j of byte i: row 8i+j) -> [B, H, T, d] float32."""
    s = unpack_codes(signs, 1).float() * 2 - 1  # [B, H, T, m]: +1 where the bit is set
    return s @ projection.float()


def outliers_dense(values: Tensor, scales: Optional[Tensor], mins: Optional[Tensor], bits: int,
                   group_size: int, r: int) -> Tensor:
    """The r channels kept apart, per token: [B, H, T, r] float32 (fp16 values, or codes per (group, channel))."""
    if bits >= 16:
        return values.float()
    B, H, rows, _ = values.shape
    NG = rows // r
    codes = unpack_codes(values, bits).float()  # [B, H, NG*r, G]
    k = codes * scales.float() + mins.float()  # s_gj c_gjt + z_gj
    return k.view(B, H, NG, r, group_size).transpose(3, 4).reshape(B, H, NG * group_size, r)


def _place(rest_part: Tensor, channels: Tensor, rest: Optional[Tensor], apart: Tensor) -> Tensor:
    """Channels `rest` from rest_part and `channels` from apart, into [B, H, T, D]."""
    B, H, T, _ = rest_part.shape
    D = rest_part.shape[-1] + channels.shape[-1]
    k = torch.zeros(B, H, T, D, device=rest_part.device)
    k.scatter_(3, rest.unsqueeze(2).expand(B, H, T, -1), rest_part)
    return k.scatter_(3, channels.unsqueeze(2).expand(B, H, T, -1), apart)


def turbo_keys(key_codes: list[Tensor], key_bits: list[int], key_centroids: list[Tensor], key_norms: Tensor,
               key_rotation: Tensor, channels: Optional[Tensor], rest: Optional[Tensor],
               outlier_values: Optional[Tensor], outlier_scales: Optional[Tensor], outlier_mins: Optional[Tensor],
               outlier_bits: int, group_size: int, residual_signs: Optional[Tensor],
               residual_norms: Optional[Tensor], residual_projection: Optional[Tensor],
               residual_scale: float) -> Tensor:
    """The keys whose inner products qjl.ops.attention.turbo_key_scores computes: [B, H, T, D] float32.
    key_norms: the per-token scales [B, H, T] (qjl.ops.attention.scales)."""
    # c [64, 2]: a pair codebook (a 6-bit pair index names 2 coordinates), else one centroid a code
    y = torch.cat([c.float()[pair_index(p).long()].flatten(-2) if c.dim() == 2 else
                   c.float()[unpack_codes(p, b).long()] for p, b, c in zip(key_codes, key_bits, key_centroids)], dim=-1)
    k = (y * key_norms.float().unsqueeze(-1)) @ key_rotation.float()  # <q Rᵀ, y> = <q, y R>
    if residual_projection is not None:
        k = k + signs_dense(residual_signs, residual_projection) * (
            residual_scale * residual_norms.float().unsqueeze(-1))
    if channels is None:
        return k
    apart = outliers_dense(outlier_values, outlier_scales, outlier_mins, outlier_bits, group_size,
                           channels.shape[-1])
    return _place(k, channels, rest, apart)


def turbo_values(value_codes: list[Tensor], value_bits: list[int], value_tables: list[Tensor], value_norms: Tensor,
                 value_rotation: Tensor) -> Tensor:
    """The values whose weighted sums qjl.ops.attention.turbo_value_sum computes: [B, H, T, D] float32."""
    B, H, T = value_norms.shape
    parts = []
    for packed, bits, table in zip(value_codes, value_bits, value_tables):
        index = unpack_codes(packed, bits) if bits in (3, 9) else packed
        parts.append(F.embedding(index.long(), table.float()).reshape(B, H, T, index.shape[-1] * table.shape[1]))
    y = torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]
    return (y * value_norms.float().unsqueeze(-1)) @ value_rotation.float()


def sketch_keys(signs: Tensor, key_norms: Tensor, projection: Tensor, sketch_scale: float,
                channels: Optional[Tensor], outlier_values: Optional[Tensor], outlier_scales: Optional[Tensor],
                outlier_mins: Optional[Tensor], outlier_index: Optional[Tensor], outlier_bits: int, group_size: int,
                key_mean: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """The keys whose inner products qjl.ops.attention.sketch_key_scores computes, and their sketch part alone
    (c ||k_in|| sign(S k_in)ᵀ S, whose product with the query less its kept channels is the sign estimate): both
    [B, H, T, D] float32."""
    k_in = signs_dense(signs, projection) * (sketch_scale * key_norms.float().unsqueeze(-1))
    k = k_in
    B, H, T, D = k.shape
    if channels is not None:  # the query's outlier channels are left out of the sketch's estimate
        apart = outliers_dense(outlier_values, outlier_scales, outlier_mins, outlier_bits, group_size,
                               channels.shape[-1])
        k = k.scatter(3, channels.unsqueeze(2).expand(B, H, T, -1), apart)
    elif outlier_index is not None:
        idx = outlier_index.long()  # [B, H, NG, r]
        NG, r = idx.shape[2], idx.shape[3]
        G = T // NG
        vals = outlier_values.float().view(B, H, NG, G, r)
        k = k.view(B, H, NG, G, D).scatter_add(4, idx.unsqueeze(3).expand(B, H, NG, G, r), vals).view(B, H, T, D)
    if key_mean is not None:
        k = k + key_mean.float().unsqueeze(2)
    return k, k_in


def int_values(codes: Tensor, scales: Tensor, mins: Tensor, bits: int, group: int) -> Tensor:
    """The values whose weighted sums qjl.ops.attention.int_value_sum computes: [B, H, T, D] float32."""
    c = unpack_codes(codes, bits).float()  # [B, H, T, D]
    return c * scales.float().repeat_interleave(group, dim=-1) + mins.float().repeat_interleave(group, dim=-1)
