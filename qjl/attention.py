"""The attention function registered with transformers as "qjl".

It reads a QJLLayer directly: logits of compressed tokens from the key codec,
logits of exact tokens (window, tail, the current chunk) by matmul, one softmax
over both, values from the value codec plus the exact part. Causality: the
current chunk is the last L exact tokens; everything before it is visible.
Batch size 1 with no padding is what the CLI uses; batches without padding work.

With an ordinary tensor cache (or none) it computes exact attention, so one
model object serves both `--kv exact` and `--kv qjl`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from .cache import QJLLayer

ATTN_IMPLEMENTATION = "qjl"


def _causal_mask(q_len: int, kv_len: int, device) -> torch.Tensor:
    """bool [q_len, kv_len]: query i (the last q_len positions) sees keys j <= kv_len - q_len + i."""
    i = torch.arange(q_len, device=device).unsqueeze(1)
    j = torch.arange(kv_len, device=device).unsqueeze(0)
    return j <= (kv_len - q_len) + i


def exact_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float) -> torch.Tensor:
    """q: [B, Hq, L, D], k/v: [B, H, S, D] with the L queries the last L of the S positions -> [B, Hq, L, D]."""
    L, S = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if L == S:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, enable_gqa=gqa)
    mask = None if L == 1 else _causal_mask(L, S, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling, enable_gqa=gqa)


def compressed_attention(layer: QJLLayer, q: torch.Tensor, scaling: float) -> torch.Tensor:
    """q: [B, Hq, L, D] against a layer with compressed tokens -> [B, Hq, L, D] in q's dtype."""
    B, Hq, L, D = q.shape
    H = layer.num_kv_heads
    g = Hq // H
    qf = q.float().reshape(B, H, g * L, D)  # query heads sharing a KV head read its keys once
    logits_c = layer.key_codec.scores(qf, layer.key_state) * scaling  # [B, H, gL, Nc]
    k_e, v_e = layer.exact_kv(torch.float32)  # [B, H, Ne, D]
    logits_e = (qf @ k_e.transpose(2, 3)) * scaling  # [B, H, gL, Ne]
    if L > 1:
        mask = _causal_mask(L, k_e.shape[2], q.device).repeat(g, 1)  # row r is query position r % L
        logits_e = logits_e.masked_fill(~mask, float("-inf"))
    n_c = logits_c.shape[-1]
    weights = torch.softmax(torch.cat([logits_c, logits_e], dim=-1), dim=-1)
    out = layer.value_codec.weighted_sum(weights[..., :n_c], layer.value_state)
    out = out + weights[..., n_c:] @ v_e
    return out.reshape(B, Hq, L, D).to(q.dtype)


def qjl_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention interface: returns ([B, L, Hq, D], None)."""
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    if isinstance(key, QJLLayer):
        layer = key
        if layer.n_compressed == 0:
            k, v = layer.exact_kv(query.dtype)
            out = exact_attention(query, k, v, scaling)
        else:
            out = compressed_attention(layer, query, scaling)
        layer.compress_excess(query)
    else:
        if attention_mask is not None:
            # A padded batch from outside the CLI: honour the mask transformers built.
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=scaling,
                                                 enable_gqa=query.shape[1] != key.shape[1])
        else:
            out = exact_attention(query, key, value, scaling)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Make attn_implementation="qjl" available to every transformers model (idempotent)."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, qjl_attention_forward)


register()
