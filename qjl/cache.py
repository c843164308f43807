"""The compressed KV cache: per-layer storage, exact windows, rollback, byte accounting.

A layer holds, in token order:
  sink        the first `sink_tokens` document tokens, exact: they draw a large share of attention
              in most heads (attention sinks), so their error is not averaged away;
  compressed  whole groups of document tokens, as key/value codec states;
  window      the most recent document tokens, exact (at most buffer + group - 1 once flushed);
  tail        question and answer tokens, exact, added after the document is frozen.
Rolling back drops the tail: the document part is never touched after `freeze_document`.

`update()` only appends; the attention function (attention.py) reads all three
parts and then calls `compress_excess()`, so a prefill chunk always attends to
itself exactly and its K/V are compressed as soon as that layer is done with them.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache

from .config import ConfigError, QJLConfig
from .keys import QJLKeys
from .turbo import TurboKeys, TurboValues
from .values import QuantValues

# Per-model matrices a codec's params() may hold (each codec names its own in shared_seeds()): shared by the
# layers of a class, counted (and stored) once per seed, never per layer.
SHARED_PARAMS = ("projection", "rotation", "value_rotation")
COMPRESSED_MODES = ("qjl", "turbo")


def make_codecs(config: QJLConfig, layer_idx: int, head_dim: int):
    """(key codec, value codec) of a layer for config.kv: the only place that branches on the mode."""
    if config.kv == "turbo":
        return TurboKeys.for_layer(config, layer_idx, head_dim), TurboValues.for_layer(config, layer_idx, head_dim)
    return QJLKeys.for_layer(config, layer_idx, head_dim), QuantValues.for_layer(config, layer_idx, head_dim)


def shared_seeds(layer) -> dict[str, int]:
    """{name: seed} of the per-model matrices a layer's two codecs hold (names are unique across the pair)."""
    return {**layer.key_codec.shared_seeds(), **layer.value_codec.shared_seeds()}


def set_shared(layer, name: str, matrix: torch.Tensor) -> None:
    """Give the codec that declares `name` among its shared matrices this one (from a cache file)."""
    codec = layer.key_codec if name in layer.key_codec.shared_seeds() else layer.value_codec
    codec.set_shared(name, matrix)


def _cat(a: torch.Tensor | None, b: torch.Tensor | None, dim: int = 2) -> torch.Tensor | None:
    if a is None:
        return b
    if b is None:
        return a
    return torch.cat([a, b], dim=dim)


def _cat_states(a: dict | None, b: dict) -> dict:
    return b if a is None else {name: torch.cat([a[name], b[name]], dim=2) for name in b}


def _state_bytes(state: dict | None) -> int:
    return 0 if state is None else sum(t.numel() * t.element_size() for t in state.values())


def _tensor_bytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


class QJLLayer(CacheLayerMixin):
    is_compileable = False
    is_sliding = False

    def __init__(self, config: QJLConfig, layer_idx: int, head_dim: int, num_kv_heads: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = head_dim
        self.num_kv_heads = num_kv_heads
        self.key_codec, self.value_codec = make_codecs(config, layer_idx, head_dim)
        self.key_state: dict[str, torch.Tensor] | None = None
        self.value_state: dict[str, torch.Tensor] | None = None
        self.n_compressed = 0
        self.sink_k: torch.Tensor | None = None  # [B, H, <= sink_tokens, D], storage dtype
        self.sink_v: torch.Tensor | None = None
        self.window_k: torch.Tensor | None = None  # [B, H, n, D], storage dtype
        self.window_v: torch.Tensor | None = None
        self.tail_k: torch.Tensor | None = None  # [B, H, n, D], model dtype
        self.tail_v: torch.Tensor | None = None
        self.frozen = False
        self.storage_dtype: torch.dtype | None = None

    # --- transformers' layer interface ---------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        # Exact document tokens are kept in 16 bits even for an fp32 model: a 16-bit cache is the baseline.
        self.storage_dtype = torch.float16 if key_states.dtype == torch.float32 else key_states.dtype
        self.key_codec.to(self.device)
        self.value_codec.to(self.device)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append new exact K/V ([B, H, L, D]); return this layer twice as the handle attention reads."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if key_states.shape[1] != self.num_kv_heads or key_states.shape[-1] != self.head_dim:
            raise ValueError(f"layer {self.layer_idx}: got K/V of shape {tuple(key_states.shape)}, expected "
                             f"{self.num_kv_heads} heads of {self.head_dim}")
        if self.frozen:
            self.tail_k = _cat(self.tail_k, key_states)
            self.tail_v = _cat(self.tail_v, value_states)
        else:
            self.window_k = _cat(self.window_k, key_states.to(self.storage_dtype))
            self.window_v = _cat(self.window_v, value_states.to(self.storage_dtype))
        return self, self

    def get_seq_length(self) -> int:
        return self.n_compressed + self.exact_length()

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.__init__(self.config, self.layer_idx, self.head_dim, self.num_kv_heads)

    # --- what attention reads -------------------------------------------------------------
    def exact_length(self) -> int:
        return sum(0 if t is None else t.shape[2] for t in (self.sink_k, self.window_k, self.tail_k))

    def exact_kv(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The exact part (sink, window, tail) in `dtype`: [B, H, n_exact, D] each, in token order but for the
        compressed tokens between sink and window, which attention scores apart (order matters only to the
        causal mask, and that concerns the last tokens alone)."""
        parts_k = [t for t in (self.sink_k, self.window_k, self.tail_k) if t is not None]
        parts_v = [t for t in (self.sink_v, self.window_v, self.tail_v) if t is not None]
        k = torch.cat([t.to(dtype) for t in parts_k], dim=2) if len(parts_k) > 1 else parts_k[0].to(dtype)
        v = torch.cat([t.to(dtype) for t in parts_v], dim=2) if len(parts_v) > 1 else parts_v[0].to(dtype)
        return k, v

    def compress_excess(self, query: torch.Tensor | None = None) -> None:
        """Move whole groups from the front of the window into the compressed part, keeping `buffer` exact.

        query: [B, Hq, L, D], the queries that just attended (the attention function passes them); their
        channel energies steer the choice of outlier channels at the first flush.
        """
        if self.frozen or self.window_k is None:
            return
        self._fill_sink()
        if self.window_k is None:
            return
        G, keep = self.config.group_size, self.config.exact_buffer()
        n = self.window_k.shape[2]
        n_flush = (n - keep) // G * G if n - keep >= G else 0
        if n_flush <= 0:
            return
        k_old, v_old = self.window_k[:, :, :n_flush], self.window_v[:, :, :n_flush]
        qe = None
        if query is not None and self.config.query_aware_outliers:  # [B, Hq, L, D] -> [B, H, D]
            B, Hq, L, D = query.shape
            qe = query.float().pow(2).reshape(B, self.num_kv_heads, -1, D).mean(dim=2)
        self.key_state = _cat_states(self.key_state, self.key_codec.encode(k_old, qe))
        self.value_state = _cat_states(self.value_state, self.value_codec.encode(v_old))
        self.window_k = self.window_k[:, :, n_flush:].clone()
        self.window_v = self.window_v[:, :, n_flush:].clone()
        self.n_compressed += n_flush

    def _fill_sink(self) -> None:
        """Move the document's first tokens from the window to the sink until it holds sink_tokens."""
        have = 0 if self.sink_k is None else self.sink_k.shape[2]
        take = min(self.config.sink_tokens - have, self.window_k.shape[2])
        if take <= 0:
            return
        self.sink_k = _cat(self.sink_k, self.window_k[:, :, :take].clone())
        self.sink_v = _cat(self.sink_v, self.window_v[:, :, :take].clone())
        rest = self.window_k.shape[2] - take
        self.window_k = self.window_k[:, :, take:].clone() if rest else None
        self.window_v = self.window_v[:, :, take:].clone() if rest else None

    # --- document / tail ------------------------------------------------------------------
    def freeze(self) -> None:
        self.frozen = True

    def rollback(self) -> None:
        self.tail_k = self.tail_v = None

    def document_tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor of the document segment of this layer, by name (what a cache file stores)."""
        out: dict[str, torch.Tensor] = {}
        for name, t in (self.key_state or {}).items():
            out[name] = t
        for name, t in (self.value_state or {}).items():
            out[name] = t
        for name, t in {**self.key_codec.params(), **self.value_codec.params()}.items():
            out[name] = t
        if self.sink_k is not None:
            out["sink_keys"], out["sink_values"] = self.sink_k, self.sink_v
        if self.window_k is not None:
            out["window_keys"], out["window_values"] = self.window_k, self.window_v
        elif self.sink_k is not None:  # a document no longer than the sink: an empty window, for the file's shapes
            out["window_keys"], out["window_values"] = self.sink_k[:, :, :0], self.sink_v[:, :, :0]
        return out

    def document_nbytes(self, count_projection: bool = True) -> int:
        total = _state_bytes(self.key_state) + _state_bytes(self.value_state)
        total += _tensor_bytes(self.window_k) + _tensor_bytes(self.window_v)
        total += _tensor_bytes(self.sink_k) + _tensor_bytes(self.sink_v)
        for name, t in {**self.key_codec.params(), **self.value_codec.params()}.items():
            if name not in SHARED_PARAMS or count_projection:
                total += _tensor_bytes(t)
        return total

    def document_length(self) -> int:
        return self.n_compressed + sum(0 if t is None else t.shape[2] for t in (self.sink_k, self.window_k))


def kv_geometry(model_config) -> tuple[int, int, int]:
    """(layers, KV heads, head_dim) of a transformers config: what shapes a KV cache."""
    head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // model_config.num_attention_heads
    n_kv = getattr(model_config, "num_key_value_heads", None) or model_config.num_attention_heads
    return int(model_config.num_hidden_layers), int(n_kv), int(head_dim)


class QJLCache(Cache):
    """A transformers Cache whose layers keep K/V compressed; use with attn_implementation="qjl"."""

    def __init__(self, model_config, config: QJLConfig | None = None):
        config = config or QJLConfig()
        if config.kv not in COMPRESSED_MODES:
            raise ConfigError(f"QJLCache holds --kv qjl or turbo caches, not {config.kv!r}")
        n_layers, n_kv, head_dim = kv_geometry(model_config)
        if head_dim % 8:
            raise ConfigError(f"head_dim {head_dim} is not a multiple of 8")
        self.config = config
        self.head_dim, self.num_kv_heads, self.num_layers = head_dim, n_kv, n_layers
        super().__init__(layers=[QJLLayer(config, i, head_dim, n_kv) for i in range(n_layers)])

    # --- document segment and tail ---------------------------------------------------------
    def freeze_document(self) -> None:
        """Everything cached so far is the document; later tokens go to the tail."""
        for layer in self.layers:
            layer.freeze()

    def rollback(self) -> None:
        """Drop every question/answer token: back to the document state, exactly."""
        for layer in self.layers:
            layer.rollback()

    @property
    def document_tokens(self) -> int:
        return self.layers[0].document_length()

    # --- accounting -----------------------------------------------------------------------
    def document_nbytes(self) -> int:
        """All bytes of the document segment, projections and rotations counted once per distinct matrix."""
        total = sum(layer.document_nbytes(count_projection=False) for layer in self.layers)
        seen = {}
        for layer in self.layers:
            params = {**layer.key_codec.params(), **layer.value_codec.params()}
            for name, seed in shared_seeds(layer).items():
                p = params[name]
                seen[(name, seed, tuple(p.shape))] = _tensor_bytes(p)
        return total + sum(seen.values())

    def bits_per_number(self) -> float:
        """8 * bytes held for the document / (2 * tokens * layers * kv_heads * head_dim) (DESIGN.md §3)."""
        tokens = self.document_tokens
        if tokens == 0:
            return 0.0
        numbers = 2 * tokens * self.num_layers * self.num_kv_heads * self.head_dim
        return 8 * self.document_nbytes() / numbers

    def fp16_nbytes(self) -> int:
        """What a 16-bit cache of the same document tokens would take."""
        return 2 * 2 * self.document_tokens * self.num_layers * self.num_kv_heads * self.head_dim


class ExactCache(DynamicCache):
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
        held = sum(_tensor_bytes(t) for layer in self.layers for t in (layer.keys, layer.values)
                   if isinstance(t, torch.Tensor))
        return held * self.document_tokens // total if total else 0

    bits_per_number = QJLCache.bits_per_number
    fp16_nbytes = QJLCache.fp16_nbytes


def make_cache(model_config, config: QJLConfig):
    """A fresh cache for config.kv: ExactCache for "exact", else a QJLCache."""
    return ExactCache(model_config, config) if config.kv == "exact" else QJLCache(model_config, config)
