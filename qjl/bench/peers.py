"""transformers' own quantized KV caches (QuantizedCache with the quanto or HQQ backend), as bench peers.

PeerCache gives a QuantizedCache the document interface of qjl's caches (freeze_document, document_nbytes,
bits_per_number, fp16_nbytes, document_tokens), counting every byte it holds: the packed codes, their scales
and zero points, and the residual window kept in the model's dtype. Its layers hand attention ordinary
tensors (the dequantised states), which the "qjl" attention function computes exactly.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import QuantizedCache

from .spec import MODES, ModeSpec


def held_nbytes(obj) -> int:
    """Bytes of every tensor inside obj: plain tensors, tensor subclasses (quanto's packed tensors, through
    __tensor_flatten__), and tuples, lists and dicts of them (HQQ's (codes, meta))."""
    if isinstance(obj, torch.Tensor):
        if type(obj) in (torch.Tensor, torch.nn.Parameter) or not hasattr(obj, "__tensor_flatten__"):
            return obj.numel() * obj.element_size()
        names, _ = obj.__tensor_flatten__()
        return sum(held_nbytes(getattr(obj, name)) for name in names)
    if isinstance(obj, dict):
        return sum(held_nbytes(v) for v in obj.values())
    if isinstance(obj, (tuple, list)):
        return sum(held_nbytes(v) for v in obj)
    return 0


class PeerCache(QuantizedCache):
    """QuantizedCache(backend, ...) with qjl's document accounting. The document is everything cached up to
    freeze_document(); its bytes are counted then. It cannot roll back (its quantised states are re-made as
    tokens come), so rollback() leaves it unusable: make a new one for the next document."""

    def __init__(self, model_config, spec: ModeSpec):
        super().__init__(spec.backend, model_config, **spec.peer_kwargs)
        from ..cache import kv_geometry

        self.spec = spec
        self.num_layers, self.num_kv_heads, self.head_dim = kv_geometry(model_config)
        self._document: tuple[int, int] | None = None  # (tokens, bytes) at freeze_document
        self._stale = False

    def held_nbytes(self) -> int:
        total = 0
        for layer in self.layers:
            total += held_nbytes(getattr(layer, "_quantized_keys", None))
            total += held_nbytes(getattr(layer, "_quantized_values", None))
            total += held_nbytes(getattr(layer, "keys", None)) + held_nbytes(getattr(layer, "values", None))
        return total

    def update(self, *args, **kwargs):
        if self._stale:
            raise RuntimeError(f"a {self.spec.name} cache cannot roll back; make a new one")
        return super().update(*args, **kwargs)

    def freeze_document(self) -> None:
        self._document = (self.get_seq_length(), self.held_nbytes())

    def rollback(self) -> None:
        if self.get_seq_length() != self.document_tokens:
            self._stale = True

    @property
    def document_tokens(self) -> int:
        return self.get_seq_length() if self._document is None else self._document[0]

    def document_nbytes(self) -> int:
        return self.held_nbytes() if self._document is None else self._document[1]

    def bits_per_number(self) -> float:
        tokens = self.document_tokens
        if tokens == 0:
            return 0.0
        return 8 * self.document_nbytes() / (2 * tokens * self.num_layers * self.num_kv_heads * self.head_dim)

    def fp16_nbytes(self) -> int:
        return 2 * 2 * self.document_tokens * self.num_layers * self.num_kv_heads * self.head_dim


def make_mode_cache(model_config, mode: str, devices=None):
    """A fresh cache for a bench mode: qjl's make_cache for turbo/qjl/exact (devices: each layer's, under a
    device map), a PeerCache for a peer (its layers stay where their K/V are computed)."""
    spec = MODES[mode]
    if spec.is_peer:
        return PeerCache(model_config, spec)
    from ..cache import make_cache
    from ..config import QJLConfig

    return make_cache(model_config, QJLConfig(kv=spec.kv, **spec.config), devices or None)
