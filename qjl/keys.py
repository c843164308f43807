"""QJL key codec (`--kv qjl`): a 1-bit JL sketch of each key, its norm, and outlier channels apart.

A key is k = mean + k_out + k_in: the head's mean key (optional, exact, fixed at the first encode), the
outlier channels k_out (OutlierChannels, per head; or the paper's per token group, in fp16 with their
indices), and the rest k_in, stored as signs packed 8 to a byte and a scale in fp16. Scores add the three
parts: <q,k> = <q,mean> + <q,k_out> + c*scale*<Sq, signs> (qjl/ops/attention.py). The paper's signs are
sign(S k_in) with scale ||k_in||; residual signs (the default, qjl/sketch.py residual_signs) code what S's first
rows leave of k_in in its later rows, with the scale that keeps the estimate unbiased along k_in.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .ops import sign_bits
from .ops.attention import sketch_key_scores
from .outliers import OutlierChannels
from .shared import SharedMatrices
from .sketch import jl_projection, jl_projection_on, residual_constants, residual_signs, sign_estimator_scale


class QJLKeys(SharedMatrices):
    """Keys of one layer (the KeyCodec of qjl/codecs.py)."""

    SHARED_ATTRS = {"projection": "projection"}
    PARAM_ATTRS = {"key_mean": "mean", "key_head_outliers": "head_outliers"}
    CHANNEL_INDICES = {"key_head_outliers": True, "key_outlier_index": False}

    def __init__(self, projection: Tensor, head_dim: int, outliers: int, group_size: int,
                 center: bool, seed: int = 0, outlier_scope: str = "group", outlier_bits: int = 16,
                 softmax_correction: float = 0.0, residual_weight: float = 0.0):
        self.projection = projection  # S: [m, D] float32 (block-weighted by residual_weight when it is > 0)
        self.residual_weight = residual_weight
        self.seed = seed
        self.outlier_scope = outlier_scope
        self.channels = OutlierChannels(outliers, group_size, outlier_bits)  # scope "head"
        self.head_outliers: Tensor | None = None  # [B, H, r] channels, scope "head": fixed at first encode
        self.head_dim = head_dim
        self.outliers = outliers
        self.group_size = group_size
        self.center = center
        self.sketch_dim = projection.shape[0]
        # The estimate's constant c and its variance per unit of ||q'||^2 scale^2 - <q',k_in>^2: for the paper's
        # signs with orthogonal sketch rows (pi/2 - 1)/m; for residual signs measured (qjl/sketch.py). Times the
        # softmax correction (QJLConfig.sketch_softmax_correction; 0: none).
        if residual_weight > 0:
            self.scale, unit = residual_constants(self.sketch_dim, head_dim, outliers, residual_weight)
        else:
            self.scale, unit = sign_estimator_scale(self.sketch_dim, head_dim), (math.pi / 2 - 1) / self.sketch_dim
        self.variance = softmax_correction * unit
        self.mean: Tensor | None = None  # [B, H, D] float32, set by the first encode

    @classmethod
    def for_layer(cls, config, layer_idx: int, head_dim: int) -> "QJLKeys":
        m = config.sketch_dim(layer_idx, head_dim)
        # One seed per layer class (early / late), as the paper: layers of a class share S.
        seed = config.matrix_seed("early_projection" if layer_idx < config.early_layers else "projection")
        w = config.sketch_residual_weight
        return cls(jl_projection(m, head_dim, seed, w), head_dim, config.outliers(head_dim),
                   config.group_size, config.center_keys, seed, config.outlier_scope, config.outlier_bits,
                   config.sketch_softmax_correction, w)

    def to(self, device) -> "QJLKeys":
        """Move the per-layer parameters; layers of a class keep sharing one projection."""
        m, d = self.projection.shape
        self.projection = jl_projection_on(m, d, self.seed, str(torch.device(device)), self.residual_weight)
        if self.mean is not None:
            self.mean = self.mean.to(device)
        if self.head_outliers is not None:
            self.head_outliers = self.head_outliers.to(device)
        return self

    # --- encode -------------------------------------------------------------------------
    def encode(self, k: Tensor, query_energy: Tensor | None = None) -> dict[str, Tensor]:
        """k: [B, H, T, D] with T a multiple of group_size -> state.

        query_energy: [B, H, D] mean q_j^2 of the queries that attended these keys (folded over the query
        heads of each KV head); with per-head outliers, the first encode picks channels by q_j^2 k_j^2.
        """
        B, H, T, D = k.shape
        G = self.group_size
        if T % G:
            raise ValueError(f"encode takes whole groups of {G} tokens, got {T}")
        k = k.float()
        if self.center:
            if self.mean is None:
                self.mean = k.mean(dim=2)
            k = k - self.mean.unsqueeze(2)
        state: dict[str, Tensor] = {}
        r = self.outliers
        keep = None  # 1 on the channels the sketch covers (per head; per-group outliers: None, all channels count)
        if r and self.outlier_scope == "head":
            if self.head_outliers is None:
                self.head_outliers = self.channels.choose(k, query_energy)  # [B, H, r]
            hidx = self.head_outliers.unsqueeze(2).expand(B, H, T, r)
            state.update(self.channels.encode(k.gather(3, hidx)))
            k = k.scatter(3, hidx, 0.0)
            keep = torch.ones_like(k[:, :, :1]).scatter(3, self.head_outliers.unsqueeze(2), 0.0)
        elif r:
            kg = k.view(B, H, T // G, G, D)
            idx = kg.norm(dim=3).topk(r, dim=-1).indices.sort(dim=-1).values  # [B, H, NG, r]
            gidx = idx.unsqueeze(3).expand(B, H, T // G, G, r)
            state["key_outlier_values"] = kg.gather(4, gidx).reshape(B, H, T, r).to(torch.float16)
            state["key_outlier_index"] = idx.to(self._index_dtype())
            k = kg.scatter(4, gidx, 0.0).view(B, H, T, D)
        state["key_signs"], state["key_norms"] = self._sketch(k, keep)
        return state

    def _sketch(self, k: Tensor, keep: Tensor | None) -> tuple[Tensor, Tensor]:
        """Packed signs [B, H, T, m/8] and fp16 scales [B, H, T] of the sketched channels k (the rest zero)."""
        if self.residual_weight <= 0:
            return sign_bits(k @ self.projection.T), k.norm(dim=-1).to(torch.float16)
        signs, along = residual_signs(k, self.projection, keep)
        along = self.scale * along  # c <S^T signs, k>: > 0 unless k is 0
        scale = torch.where(along > 0, k.pow(2).sum(-1) / along.clamp_min(1e-30), torch.zeros_like(along))
        return sign_bits(signs), scale.to(torch.float16)

    def _index_dtype(self) -> torch.dtype:
        return torch.uint8 if self.head_dim <= 256 else torch.int16

    # --- score --------------------------------------------------------------------------
    def op_args(self, state: dict[str, Tensor]) -> dict:
        args = dict(signs=state["key_signs"], key_norms=state["key_norms"], projection=self.projection,
                    sketch_scale=self.scale, channels=self.head_outliers, key_mean=self.mean,
                    outlier_index=state.get("key_outlier_index"), sketch_variance=self.variance)
        if self.head_outliers is not None:
            return args | self.channels.op_args(state)
        return args | dict(outlier_values=state.get("key_outlier_values"), outlier_scales=None, outlier_mins=None,
                           outlier_bits=16, group_size=self.group_size)

    def scores(self, q: Tensor, state: dict[str, Tensor]) -> Tensor:
        """q: [B, H, Q, D] (query heads of a KV head folded into Q) -> logits <q,k>: [B, H, Q, T], float32 (the
        estimates themselves: the softmax correction is the attention op's)."""
        args = self.op_args(state)
        del args["sketch_variance"]
        return sketch_key_scores(q.float(), **args)

    # --- reference and accounting -------------------------------------------------------
    def decode(self, state: dict[str, Tensor]) -> Tensor:
        """A dense stand-in for the keys, for tests only: mean + outliers; the sketched part is not invertible."""
        B, H, T, _ = state["key_signs"].shape
        k = torch.zeros(B, H, T, self.head_dim)
        if self.mean is not None:
            k = k + self.mean.unsqueeze(2).cpu()
        if self.head_outliers is not None:
            idx = self.head_outliers.cpu().unsqueeze(2).expand(B, H, T, -1)
            k.scatter_add_(3, idx, self.channels.decode(state).cpu())
        elif self.outliers:
            idx = state["key_outlier_index"].long().cpu()
            NG, r = idx.shape[2], idx.shape[3]
            vals = state["key_outlier_values"].float().cpu().view(B, H, NG, -1, r)
            kg = k.view(B, H, NG, -1, self.head_dim)
            kg.scatter_add_(4, idx.unsqueeze(3).expand_as(vals), vals)
        return k

    def shared_seeds(self) -> dict[str, int]:
        """{name: seed} of the matrices this codec shares with the other layers of its class."""
        return {"projection": self.seed}

    def set_params(self, params: dict[str, Tensor]) -> None:
        self.mean = params.get("key_mean")
        self.head_outliers = params.get("key_head_outliers")

    # --- what a cache file holds ------------------------------------------------------------
    def state_spec(self, batch: int, heads: int, tokens: int) -> dict[str, tuple]:
        r, G = self.outliers, self.group_size
        spec = {}
        if r and self.outlier_scope == "head":
            spec.update(self.channels.state_spec(batch, heads, tokens))
        elif r:
            spec["key_outlier_values"] = (torch.float16, (batch, heads, tokens, r))
            spec["key_outlier_index"] = (self._index_dtype(), (batch, heads, tokens // G, r))
        spec["key_signs"] = (torch.uint8, (batch, heads, tokens, self.sketch_dim // 8))
        spec["key_norms"] = (torch.float16, (batch, heads, tokens))
        return spec

    def param_spec(self, batch: int, heads: int) -> dict[str, tuple]:
        spec = {}
        if self.center:
            spec["key_mean"] = (torch.float32, (batch, heads, self.head_dim))
        if self.outliers and self.outlier_scope == "head":
            spec["key_head_outliers"] = (torch.int64, (batch, heads, self.outliers))
        return spec
