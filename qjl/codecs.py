"""The codec contract, and the one place that maps a mode to its codecs and its attention op.

A codec turns one layer's keys (or values) into a *state*: a dict of tensors, each laid out [B, H, N, ...]
where N counts tokens or token groups, so states of consecutive chunks concatenate along dim 2. Alongside,
it may hold per-layer parameters fixed by its first encode (`params`, e.g. the outlier channels) and per-model
matrices shared by every layer of a class (`shared_seeds`: the JL projection, the rotations), which cache files
store once per seed. `state_spec` and `param_spec` describe what a state and the parameters look like for n
tokens without encoding anything: the cache-file writer and checker both use them (qjl/store.py).
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from .config import QJLConfig
from . import kernels, native
from .keys import QJLKeys
from .ops import sketch_attention, turbo_attention
from .turbo import TurboKeys, TurboValues
from .values import QuantValues

Spec = dict[str, tuple[torch.dtype, tuple[int, ...]]]


class _Codec(Protocol):
    def to(self, device) -> "_Codec": ...
    def params(self) -> dict[str, Tensor]:
        """Per-layer tensors that are not per token, shared matrices included (by their shared name)."""
    def set_params(self, params: dict[str, Tensor]) -> None:
        """Restore what params() returned, less the shared matrices (from a cache file)."""
    def shared_seeds(self) -> dict[str, int]:
        """{name: seed} of the per-model matrices this codec holds."""
    def set_shared(self, name: str, matrix: Tensor) -> None: ...
    def state_spec(self, batch: int, heads: int, tokens: int) -> Spec: ...
    def param_spec(self, batch: int, heads: int) -> Spec:
        """The non-shared params() once something is encoded."""
    def op_args(self, state: dict[str, Tensor]) -> dict:
        """The arguments of the mode's attention op (qjl/ops/attention.py) this codec supplies."""


class KeyCodec(_Codec, Protocol):
    def encode(self, k: Tensor, query_energy: Tensor | None = None) -> dict[str, Tensor]: ...
    def scores(self, q: Tensor, state: dict[str, Tensor]) -> Tensor:
        """q [B, H, Q, D] (query heads of a KV head folded into Q) -> logits <q, k> [B, H, Q, T] float32."""
    def decode(self, state: dict[str, Tensor]) -> Tensor:
        """A dense [B, H, T, D] float32 stand-in for the keys (tests only; QJL's sketched part is left out)."""


class ValueCodec(_Codec, Protocol):
    def encode(self, v: Tensor) -> dict[str, Tensor]: ...
    def weighted_sum(self, w: Tensor, state: dict[str, Tensor]) -> Tensor:
        """w [B, H, Q, T] -> sum_t w_t v_t [B, H, Q, D] float32, from the codes."""
    def decode(self, state: dict[str, Tensor]) -> Tensor: ...


def make_codecs(config: QJLConfig, layer_idx: int, head_dim: int) -> tuple[KeyCodec, ValueCodec]:
    """(key codec, value codec) of a layer for config.kv."""
    if config.kv == "turbo":
        return TurboKeys.for_layer(config, layer_idx, head_dim), TurboValues.for_layer(config, layer_idx, head_dim)
    return QJLKeys.for_layer(config, layer_idx, head_dim), QuantValues.for_layer(config, layer_idx, head_dim)


# The fused attention op of each compressed mode: arguments from both codecs' op_args.
ATTENTION_OPS = {"turbo": turbo_attention, "qjl": sketch_attention}

native.register()  # CPU kernels beneath the ops where a C compiler is at hand (qjl/native)
kernels.register()  # CUDA kernels beneath the ops, built at the first CUDA call (qjl/kernels.py)
