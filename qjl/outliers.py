"""Key channels kept apart from a key codec, shared by both modes (QJLKeys, TurboKeys)."""

from __future__ import annotations

import torch
from torch import Tensor

from .ops import int_quantize, packed_bytes, unpack_codes_float

PREFIX = "key_outlier_"


class OutlierChannels:
    """r channels of each KV head kept apart, chosen once per head by the first encode.

    Channel j is picked by mean k_j^2, times mean q_j^2 of the queries when they are known (the variance the
    channel would add to an estimate of <q, k>). bits 16 keeps the values in fp16; 2, 4 or 8 quantise each
    channel over a group of tokens with an fp16 scale and minimum (channels are smooth along time: KIVI's key
    axis), as rows [B, H, NG*r, G] ordered by (token group, channel). State names start with "key_outlier_".
    """

    def __init__(self, r: int, group_size: int, bits: int):
        self.r, self.group_size, self.bits = r, group_size, bits

    def choose(self, k: Tensor, query_energy: Tensor | None) -> Tensor:
        """k: [B, H, T, D] float32, query_energy: [B, H, D] or None -> channels [B, H, r], sorted."""
        energy = k.pow(2).mean(dim=2)
        if query_energy is not None:
            energy = energy * query_energy.to(energy.device)
        return energy.topk(self.r, dim=-1).indices.sort(dim=-1).values

    def encode(self, out: Tensor) -> dict[str, Tensor]:
        """out: [B, H, T, r] float32, the chosen channels of T keys (T a multiple of group_size)."""
        if self.bits >= 16:
            return {PREFIX + "values": out.to(torch.float16)}
        B, H, T, r = out.shape
        G = self.group_size
        rows = out.view(B, H, T // G, G, r).transpose(3, 4).reshape(B, H, -1, G)  # group-major [B, H, NG*r, G]
        codes, scales, mins = int_quantize(rows, self.bits, G)
        return {PREFIX + "value_codes": codes, PREFIX + "value_scales": scales, PREFIX + "value_mins": mins}

    def op_args(self, state: dict[str, Tensor]) -> dict:
        """What outlier_scores (qjl/ops/attention.py) reads."""
        if self.bits >= 16:
            return dict(outlier_values=state[PREFIX + "values"], outlier_scales=None, outlier_mins=None,
                        outlier_bits=16, group_size=self.group_size)
        return dict(outlier_values=state[PREFIX + "value_codes"], outlier_scales=state[PREFIX + "value_scales"],
                    outlier_mins=state[PREFIX + "value_mins"], outlier_bits=self.bits, group_size=self.group_size)

    def decode(self, state: dict[str, Tensor]) -> Tensor:
        """The chosen channels' values [B, H, T, r] float32 (r of D channels, so small)."""
        if self.bits >= 16:
            return state[PREFIX + "values"].float()
        rows = unpack_codes_float(state[PREFIX + "value_codes"], self.bits)  # [B, H, NG*r, G]
        rows = rows * state[PREFIX + "value_scales"].float() + state[PREFIX + "value_mins"].float()
        B, H, _, G = rows.shape
        return rows.view(B, H, -1, self.r, G).transpose(3, 4).reshape(B, H, -1, self.r)

    def state_spec(self, batch: int, heads: int, tokens: int) -> dict[str, tuple]:
        """{name: (dtype, shape)} of the state of `tokens` keys (a multiple of group_size)."""
        if self.bits >= 16:
            return {PREFIX + "values": (torch.float16, (batch, heads, tokens, self.r))}
        rows = tokens // self.group_size * self.r
        one = (torch.float16, (batch, heads, rows, 1))
        return {PREFIX + "value_codes": (torch.uint8, (batch, heads, rows, packed_bytes(self.group_size, self.bits))),
                PREFIX + "value_scales": one, PREFIX + "value_mins": one}
