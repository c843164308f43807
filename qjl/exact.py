"""What every cache shares (geometry, 16-bit reference sizes), and `--kv exact`'s cache."""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache

from .config import QJLConfig


def kv_geometry(model_config) -> tuple[int, int, int]:
    """(layers, KV heads, head_dim) of a transformers config: what shapes a KV cache."""
    head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // model_config.num_attention_heads
    n_kv = getattr(model_config, "num_key_value_heads", None) or model_config.num_attention_heads
    return int(model_config.num_hidden_layers), int(n_kv), int(head_dim)


def tensor_bytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


class DocumentSizes:
    """Sizes of a cache's document segment, from document_tokens, the geometry and document_nbytes()."""

    num_layers: int
    num_kv_heads: int
    head_dim: int

    def numbers(self) -> int:
        """Numbers a cache of the document holds: keys and values of every token, layer, KV head and channel."""
        return 2 * self.document_tokens * self.num_layers * self.num_kv_heads * self.head_dim

    def bits_per_number(self) -> float:
        """8 * bytes held for the document / numbers(): everything counted (docs/ARCHITECTURE.md)."""
        numbers = self.numbers()
        return 8 * self.document_nbytes() / numbers if numbers else 0.0

    def fp16_nbytes(self) -> int:
        """What a 16-bit cache of the same document tokens would take."""
        return 2 * self.numbers()


class ExactCache(DocumentSizes, DynamicCache):
    """--kv exact: transformers' ordinary cache with QJLCache's document/tail interface, so the session and the
    benchmarks treat every mode alike. The document is everything cached up to `freeze_document`; rollback
    crops back to it."""

    def __init__(self, model_config, config: QJLConfig | None = None):
        super().__init__(config=model_config)
        self.config = config or QJLConfig(kv="exact")
        self.num_layers, self.num_kv_heads, self.head_dim = kv_geometry(model_config)
        self._document_tokens: int | None = None

    def freeze_document(self) -> None:
        self._document_tokens = self.get_seq_length()

    def rollback(self) -> None:
        extra = self.get_seq_length() - self.document_tokens
        if extra > 0:
            self.crop(-extra)

    @property
    def document_tokens(self) -> int:
        return self.get_seq_length() if self._document_tokens is None else self._document_tokens

    def document_nbytes(self) -> int:
        """Bytes of the document's keys and values (in the model's dtype: 32 bits a number for an fp32 model)."""
        total = self.get_seq_length()
        held = sum(tensor_bytes(t) for layer in self.layers for t in (layer.keys, layer.values)
                   if isinstance(t, torch.Tensor))
        return held * self.document_tokens // total if total else 0
