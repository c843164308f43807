"""The attention function registered with transformers as "qjl".

With a QJLLayer (--kv turbo or qjl) it calls the layer's `attend`, the mode's fused op over the compressed
tokens and the exact ones (sink, window, tail, the current chunk), then lets the layer compress what left the
window. With an ordinary tensor cache (ExactCache, transformers' own caches) or none it computes exact
attention, so one model object serves every mode. Causality: the current chunk is the last L tokens;
everything before it is visible. Batch size 1 with no padding is what the CLI uses; batches without padding
work, and padded ones fall back to transformers' mask on the exact path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from .cache import QJLLayer
from .ops import causal_mask

ATTN_IMPLEMENTATION = "qjl"


def exact_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float) -> torch.Tensor:
    """q: [B, Hq, L, D], k/v: [B, H, S, D] with the L queries the last L of the S positions -> [B, Hq, L, D]."""
    L, S = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if L == S:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, enable_gqa=gqa)
    mask = None if L == 1 else causal_mask(L, S, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling, enable_gqa=gqa)


def qjl_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention interface: returns ([B, L, Hq, D], None)."""
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    if isinstance(key, QJLLayer):
        layer, where = key, query.device
        query = query.to(layer.device)  # a no-op but for a CPU-offloaded layer computed on a GPU: CPU ops then
        if layer.n_compressed == 0:
            k, v = layer.exact_kv(query.dtype)
            out = exact_attention(query, k, v, scaling)
        else:
            out = layer.attend(query, scaling)
        layer.compress_excess(query)
        out = out.to(where)
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
