"""The compressed KV cache: per-layer storage, exact windows, rollback, byte accounting.

A layer holds, in token order:
  sink        the first `sink_tokens` document tokens, exact: they draw a large share of attention
              in most heads (attention sinks), so their error is not averaged away;
  compressed  whole groups of document tokens, as key/value codec states;
  window      the most recent document tokens, exact (at most buffer + group - 1 once flushed);
  tail        question and answer tokens, exact, added after the document is frozen.
Rolling back drops the tail: the document part is never touched after `freeze_document`.

`update()` only appends; the attention function (attention.py) reads all four
parts through `attend()` and then calls `compress_excess()`, so a prefill chunk always
attends to itself exactly and its K/V are compressed as soon as that layer is done with them.
Cache files hold what `document_tensors()` and `shared_matrices()` give and are read back with
`load_tensors()`, checked against `expected_tensors()` (qjl/store.py; docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .codecs import ATTENTION_OPS, make_codecs
from .config import ConfigError, QJLConfig
from .exact import DocumentSizes, ExactCache, kv_geometry, tensor_bytes

COMPRESSED_MODES = ("qjl", "turbo")
_EXACT_NAMES = ("sink_keys", "sink_values", "window_keys", "window_values")
# Names of the per-model matrices (QJLLayer.shared_matrices), which document_tensors() leaves out.
SHARED_PARAMS = ("projection", "rotation", "value_rotation")


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


class QJLLayer(CacheLayerMixin):
    is_compileable = False
    is_sliding = False

    def __init__(self, config: QJLConfig, layer_idx: int, head_dim: int, num_kv_heads: int,
                 home: torch.device | str | None = None):
        super().__init__()
        self.config = config
        # The device this layer's cache lives on: its weights' device under a device map (a CPU-offloaded layer's
        # cache stays in CPU memory and its attention runs on the CPU ops; qjl/attention.py moves q there and the
        # result back); None: wherever its first K/V arrive.
        self.home = None if home is None else torch.device(home)
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
        self.dtype, self.device = key_states.dtype, self.home or key_states.device
        # Exact document tokens are kept in 16 bits even for an fp32 model: a 16-bit cache is the baseline.
        self.storage_dtype = torch.float16 if key_states.dtype == torch.float32 else key_states.dtype
        self.key_codec.to(self.device)
        self.value_codec.to(self.device)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append new exact K/V ([B, H, L, D]); return this layer twice as the handle attention reads."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if key_states.device != self.device:  # a layer that computes on a GPU with its cache in CPU memory
            key_states, value_states = key_states.to(self.device), value_states.to(self.device)
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
        self.__init__(self.config, self.layer_idx, self.head_dim, self.num_kv_heads, self.home)

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

    def attend(self, q: torch.Tensor, scaling: float) -> torch.Tensor:
        """Attention of q [B, Hq, L, D] (the last L exact tokens) over every token of this layer, compressed
        ones included, by the mode's fused op (qjl/ops/attention.py) -> [B, Hq, L, D] in q's dtype."""
        ks = [t for t in (self.sink_k, self.window_k, self.tail_k) if t is not None]
        vs = [t for t in (self.sink_v, self.window_v, self.tail_v) if t is not None]
        args = self.key_codec.op_args(self.key_state) | self.value_codec.op_args(self.value_state)
        return ATTENTION_OPS[self.config.kv](q, ks, vs, scaling=scaling, **args)

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

    # --- the document's tensors: what cache files hold ---------------------------------------
    def _codecs(self):
        return (self.key_codec, self.value_codec)

    def shared_matrices(self) -> dict[str, tuple[int, torch.Tensor]]:
        """{name: (seed, matrix)} of the per-model matrices this layer's codecs hold (projection, rotations):
        the same for every layer of a class, so they are stored and counted once per seed."""
        out = {}
        for codec in self._codecs():
            params = codec.params()
            out.update({name: (seed, params[name]) for name, seed in codec.shared_seeds().items()})
        return out

    def _own_params(self) -> dict[str, torch.Tensor]:
        shared = self.shared_matrices()
        return {n: t for codec in self._codecs() for n, t in codec.params().items() if n not in shared}

    def document_tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor of this layer's document segment by name, less the shared matrices: codec states, the
        codecs' own parameters (e.g. `key_head_outliers`), sink and window."""
        out: dict[str, torch.Tensor] = {**(self.key_state or {}), **(self.value_state or {}), **self._own_params()}
        if self.sink_k is not None:
            out["sink_keys"], out["sink_values"] = self.sink_k, self.sink_v
        if self.window_k is not None:
            out["window_keys"], out["window_values"] = self.window_k, self.window_v
        elif self.sink_k is not None:  # a document no longer than the sink: an empty window, for the file's shapes
            out["window_keys"], out["window_values"] = self.sink_k[:, :, :0], self.sink_v[:, :, :0]
        return out

    def expected_tensors(self, batch: int, n_compressed: int, n_sink: int, n_window: int,
                         storage_dtype: torch.dtype) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        """{name: (dtype, shape)} that document_tensors() has for these token counts (the codecs' specs)."""
        out: dict[str, tuple] = {}
        if n_compressed:
            for codec in self._codecs():
                out |= codec.state_spec(batch, self.num_kv_heads, n_compressed)
                out |= codec.param_spec(batch, self.num_kv_heads)
        if n_sink:
            out["sink_keys"] = out["sink_values"] = (storage_dtype, (batch, self.num_kv_heads, n_sink, self.head_dim))
        out["window_keys"] = out["window_values"] = (storage_dtype, (batch, self.num_kv_heads, n_window,
                                                                     self.head_dim))
        return out

    def channel_indices(self) -> dict[str, bool]:
        """Names of the tensors that hold channel numbers -> whether each row must strictly ascend."""
        return {**self.key_codec.CHANNEL_INDICES, **self.value_codec.CHANNEL_INDICES}

    def load_tensors(self, tensors: dict[str, torch.Tensor], shared: dict[str, torch.Tensor],
                     dtype: torch.dtype | None = None) -> None:
        """Fill this (new) layer with a frozen document: `tensors` as document_tensors() gave them (checked
        against expected_tensors), `shared` the per-model matrices by name. The file's matrices are used,
        never the RNG's."""
        params = set()
        for codec in self._codecs():
            for name in codec.shared_seeds():
                codec.set_shared(name, shared[name])
            spec = codec.param_spec(1, 1)
            codec.set_params({n: t for n, t in tensors.items() if n in spec})
            params |= set(spec)
        states = {n: t for n, t in tensors.items() if n not in params and n not in _EXACT_NAMES}
        self.key_state = {n: t for n, t in states.items() if n.startswith("key_")} or None
        self.value_state = {n: t for n, t in states.items() if n.startswith("value_")} or None
        self.n_compressed = 0 if self.key_state is None else int(self.key_state["key_norms"].shape[2])
        self.window_k, self.window_v = tensors["window_keys"], tensors["window_values"]
        self.sink_k, self.sink_v = tensors.get("sink_keys"), tensors.get("sink_values")
        self.storage_dtype = self.window_k.dtype
        self.dtype, self.device = dtype or self.storage_dtype, self.window_k.device
        self.home = self.device
        self.is_initialized = True
        self.freeze()

    @classmethod
    def from_tensors(cls, config: QJLConfig, geometry: tuple[int, int, int], layer_idx: int,
                     tensors: dict[str, torch.Tensor], shared: dict[str, torch.Tensor],
                     dtype: torch.dtype | None = None) -> "QJLLayer":
        """The frozen layer `tensors` (document_tensors() of a layer) and `shared` describe."""
        _, n_kv, head_dim = geometry
        layer = cls(config, layer_idx, head_dim, n_kv)
        layer.load_tensors(tensors, shared, dtype)
        return layer

    # --- accounting -------------------------------------------------------------------------
    def document_nbytes(self, count_shared: bool = True) -> int:
        total = sum(tensor_bytes(t) for t in self.document_tensors().values())
        if count_shared:
            total += sum(tensor_bytes(t) for _, t in self.shared_matrices().values())
        return total

    def document_length(self) -> int:
        return self.n_compressed + sum(0 if t is None else t.shape[2] for t in (self.sink_k, self.window_k))


class QJLCache(DocumentSizes, Cache):
    """A transformers Cache whose layers keep K/V compressed; use with attn_implementation="qjl"."""

    def __init__(self, model_config, config: QJLConfig | None = None, devices=None):
        """devices: each layer's device (its weights' under a device map: qjl/placement.layer_devices); None:
        wherever each layer's first K/V arrive."""
        config = config or QJLConfig()
        if config.kv not in COMPRESSED_MODES:
            raise ConfigError(f"QJLCache holds --kv qjl or turbo caches, not {config.kv!r}")
        n_layers, n_kv, head_dim = kv_geometry(model_config)
        if head_dim % 8:
            raise ConfigError(f"head_dim {head_dim} is not a multiple of 8")
        self.config = config
        self.head_dim, self.num_kv_heads, self.num_layers = head_dim, n_kv, n_layers
        devices = list(devices) if devices is not None else [None] * n_layers
        if len(devices) != n_layers:
            raise ConfigError(f"{len(devices)} layer devices for a model of {n_layers} layers")
        super().__init__(layers=[QJLLayer(config, i, head_dim, n_kv, devices[i]) for i in range(n_layers)])

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
        total = sum(layer.document_nbytes(count_shared=False) for layer in self.layers)
        return total + sum(tensor_bytes(t) for t in self.shared_matrices().values())

    def shared_matrices(self) -> dict[str, torch.Tensor]:
        """Every distinct per-model matrix, by its cache-file name `{name}s.{seed}` (e.g. `rotations.2`)."""
        return {f"{name}s.{seed}": t for layer in self.layers for name, (seed, t) in layer.shared_matrices().items()}


def make_cache(model_config, config: QJLConfig, devices=None):
    """A fresh cache for config.kv: ExactCache for "exact" (its layers stay where their K/V are computed), else a
    QJLCache whose layer i lives on devices[i]."""
    return ExactCache(model_config, config) if config.kv == "exact" else QJLCache(model_config, config, devices)
