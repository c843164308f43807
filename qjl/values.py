"""Value codec: per-token asymmetric integer quantisation (KIVI's value scheme).

Each token's value vector is split into groups of `group` channels; each group
keeps an fp16 scale and minimum and `bits`-bit codes packed into bytes.
The attention-weighted sum is computed from the codes a block of tokens at a
time, so a dequantised copy of the whole V never exists:

    sum_t w_t v_tc = sum_t (w_t s_tg) code_tc + sum_t w_t z_tg      (c in group g)
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

# Tokens unpacked at once in weighted_sum: bounds the temporary to block * D floats per head.
_BLOCK = 4096


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [..., n] with values < 2**bits -> uint8 [..., n*bits/8]; code j sits at bits j*b.. of its byte."""
    per_byte = 8 // bits
    *lead, n = codes.shape
    c = codes.reshape(*lead, n // per_byte, per_byte).to(torch.uint8)
    shifts = (torch.arange(per_byte, device=codes.device, dtype=torch.uint8) * bits)
    return (c << shifts).sum(dim=-1, dtype=torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """The inverse of pack_codes: uint8 [..., n*bits/8] -> uint8 [..., n]."""
    per_byte = 8 // bits
    shifts = (torch.arange(per_byte, device=packed.device, dtype=torch.uint8) * bits)
    mask = (1 << bits) - 1
    codes = (packed.unsqueeze(-1) >> shifts) & mask
    return codes.reshape(*packed.shape[:-1], packed.shape[-1] * per_byte)


@functools.lru_cache(maxsize=16)
def _code_table(bits: int, device: str) -> torch.Tensor:
    """[256, 8/bits] float32: the codes of every byte value, so unpacking is one embedding look-up."""
    return unpack_codes(torch.arange(256, dtype=torch.uint8).unsqueeze(-1), bits).float().to(device)


def unpack_codes_float(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """unpack_codes(...).float(), by table look-up (3x faster on a CPU than shifts and masks)."""
    table = _code_table(bits, str(packed.device))
    codes = F.embedding(packed.to(torch.int32), table)  # [..., n*bits/8, 8/bits]
    return codes.reshape(*packed.shape[:-1], packed.shape[-1] * table.shape[1])


class QuantValues:
    """Values of one layer: `bits`-bit codes per channel, fp16 scale and minimum per group of channels."""

    def __init__(self, bits: int, group: int, head_dim: int):
        if head_dim % group:
            raise ValueError(f"value group {group} does not divide head_dim {head_dim}")
        self.bits = bits
        self.group = group
        self.head_dim = head_dim

    @classmethod
    def for_layer(cls, config, layer_idx: int, head_dim: int) -> "QuantValues":
        return cls(config.value_bits, config.value_group_for(head_dim), head_dim)

    def encode(self, v: torch.Tensor) -> dict[str, torch.Tensor]:
        """v: [B, H, T, D] -> state with codes [B,H,T,D*bits/8], scales and mins [B,H,T,D/group]."""
        B, H, T, D = v.shape
        vg = v.float().view(B, H, T, D // self.group, self.group)
        # Round scale and minimum to fp16 first, then quantise against the rounded ones:
        # the codes are then the best for what is actually stored.
        vmin = vg.amin(dim=-1).to(torch.float16)
        vmax = vg.amax(dim=-1)
        levels = (1 << self.bits) - 1
        scale = ((vmax - vmin.float()) / levels).to(torch.float16)
        safe = torch.where(scale.float() > 0, scale.float(), torch.ones_like(vmax))
        codes = ((vg - vmin.float().unsqueeze(-1)) / safe.unsqueeze(-1)).round().clamp_(0, levels)
        return {
            "value_codes": pack_codes(codes.to(torch.uint8).view(B, H, T, D), self.bits),
            "value_scales": scale,
            "value_mins": vmin,
        }

    def decode(self, state: dict[str, torch.Tensor]) -> torch.Tensor:
        """Dequantised values [B, H, T, D] float32: the reference for tests, never used by attention."""
        codes = unpack_codes_float(state["value_codes"], self.bits)
        B, H, T, D = codes.shape
        cg = codes.view(B, H, T, D // self.group, self.group)
        v = cg * state["value_scales"].float().unsqueeze(-1) + state["value_mins"].float().unsqueeze(-1)
        return v.view(B, H, T, D)

    def weighted_sum(self, w: torch.Tensor, state: dict[str, torch.Tensor]) -> torch.Tensor:
        """w: [B, H, Q, T] attention weights -> sum_t w_t v_t: [B, H, Q, D] float32."""
        w = w.float()
        B, H, Q, T = w.shape
        ng = self.head_dim // self.group
        scales = state["value_scales"].float()  # [B, H, T, ng]
        out = w @ state["value_mins"].float()  # sum_t w_t z_tg: [B, H, Q, ng]
        out = out.expand(B, H, Q, self.head_dim) if ng == 1 else out.repeat_interleave(self.group, dim=-1)
        out = out.contiguous()
        for start in range(0, T, _BLOCK):
            end = min(T, start + _BLOCK)
            codes = unpack_codes_float(state["value_codes"][:, :, start:end], self.bits)  # [B, H, t, D]
            for g in range(ng):
                cols = slice(g * self.group, (g + 1) * self.group)
                ws = w[..., start:end] * scales[:, :, start:end, g].unsqueeze(2)  # [B, H, Q, t]
                out[..., cols] += ws @ codes[..., cols]
        return out

    def to(self, device) -> "QuantValues":
        return self  # no per-layer tensors: scales and minimums travel with each state

    def params(self) -> dict[str, torch.Tensor]:
        return {}

    def shared_seeds(self) -> dict[str, int]:
        return {}
