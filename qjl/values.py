"""QJL mode's value codec: per-token asymmetric integer quantisation (KIVI's value scheme).

Each token's value vector is split into groups of `group` channels; each group keeps an fp16 scale and
minimum and `bits`-bit codes packed into bytes (qjl/ops/codes.py); by default the scale and minimum are fitted
to the codes rather than taken from the group's range (qjl::int_quantize's `fit`). The attention-weighted sum
is computed from the codes (qjl/ops/attention.py int_value_sum), so a dequantised copy of V never exists.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .ops import int_quantize, packed_bytes, unpack_codes_float
from .ops.attention import int_value_sum
from .shared import SharedMatrices


class QuantValues(SharedMatrices):
    """Values of one layer (the ValueCodec of qjl/codecs.py): `bits`-bit codes per channel, fp16 scale and
    minimum per group of channels."""

    def __init__(self, bits: int, group: int, head_dim: int, fit: bool = False):
        if head_dim % group:
            raise ValueError(f"value group {group} does not divide head_dim {head_dim}")
        self.bits = bits
        self.group = group
        self.head_dim = head_dim
        self.fit = fit  # scale and minimum fitted to the codes, not the group's min/max (int_quantize)

    @classmethod
    def for_layer(cls, config, layer_idx: int, head_dim: int) -> "QuantValues":
        return cls(config.value_bits, config.value_group_for(head_dim), head_dim, config.value_fit)

    def encode(self, v: Tensor) -> dict[str, Tensor]:
        """v: [B, H, T, D] -> state with codes [B,H,T,D*bits/8], scales and mins [B,H,T,D/group]."""
        codes, scales, mins = int_quantize(v.float(), self.bits, self.group, self.fit)
        return {"value_codes": codes, "value_scales": scales, "value_mins": mins}

    def decode(self, state: dict[str, Tensor]) -> Tensor:
        """Dequantised values [B, H, T, D] float32: the reference for tests, never used by attention."""
        codes = unpack_codes_float(state["value_codes"], self.bits)
        B, H, T, D = codes.shape
        cg = codes.view(B, H, T, D // self.group, self.group)
        v = cg * state["value_scales"].float().unsqueeze(-1) + state["value_mins"].float().unsqueeze(-1)
        return v.view(B, H, T, D)

    def op_args(self, state: dict[str, Tensor]) -> dict:
        return dict(value_codes=state["value_codes"], value_scales=state["value_scales"],
                    value_mins=state["value_mins"], value_bits=self.bits, value_group=self.group)

    def weighted_sum(self, w: Tensor, state: dict[str, Tensor]) -> Tensor:
        """w: [B, H, Q, T] attention weights -> sum_t w_t v_t: [B, H, Q, D] float32."""
        a = self.op_args(state)
        return int_value_sum(w, a["value_codes"], a["value_scales"], a["value_mins"], self.bits, self.group)

    def to(self, device) -> "QuantValues":
        return self  # no per-layer tensors: scales and minimums travel with each state

    def set_params(self, params: dict[str, Tensor]) -> None:
        pass

    def state_spec(self, batch: int, heads: int, tokens: int) -> dict[str, tuple]:
        groups = (torch.float16, (batch, heads, tokens, self.head_dim // self.group))
        return {"value_codes": (torch.uint8, (batch, heads, tokens, packed_bytes(self.head_dim, self.bits))),
                "value_scales": groups, "value_mins": groups}

    def param_spec(self, batch: int, heads: int) -> dict[str, tuple]:
        return {}
