"""Packing codes into bytes and reading them back: one layout for every codec (docs/ARCHITECTURE.md).

1, 2, 4, 8 bits: 8/bits codes a byte, code s at bits s*b of its byte. 3 bits: 8 codes in 3 bytes, a
24-bit little-endian word with code s at bits 3s; scoring reads such a word as four 6-bit pair indices.
9 bits (indices into a 512-point codebook; codes int16): n codes in n + n/8 bytes, the low 8 bits of code i in
byte i, then the ninth bits packed 8 a byte (bit j of byte n + i is code 8i + j's).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

PACK_BITS = (1, 2, 3, 4, 8, 9)
_BIT_WEIGHTS = (1, 2, 4, 8, 16, 32, 64, 128)


@torch.library.custom_op("qjl::pack_codes", mutates_args=())
def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """uint8 codes [..., n] (values < 2^bits; n a multiple of 8/bits, of 8 for 3 and 9 bits; int16 for 9 bits)
    -> uint8 [..., n*bits/8]."""
    *lead, n = codes.shape
    if bits == 9:
        c = codes.to(torch.int32)
        hi = ((c >> 8) & 1).reshape(*lead, n // 8, 8) * torch.tensor(_BIT_WEIGHTS, dtype=torch.int32,
                                                                      device=codes.device)
        return torch.cat([(c & 255).to(torch.uint8), hi.sum(-1).to(torch.uint8)], dim=-1)
    if bits != 3:
        per = 8 // bits
        c = codes.reshape(*lead, n // per, per).to(torch.uint8)
        shifts = torch.arange(per, device=codes.device, dtype=torch.uint8) * bits
        return (c << shifts).sum(dim=-1, dtype=torch.uint8)
    c = codes.reshape(*lead, n // 8, 8).to(torch.int32)
    word = (c << (torch.arange(8, device=codes.device, dtype=torch.int32) * 3)).sum(dim=-1)
    out = torch.stack([(word >> s) & 255 for s in (0, 8, 16)], dim=-1).to(torch.uint8)
    return out.reshape(*lead, n // 8 * 3)


@torch.library.custom_op("qjl::unpack_codes", mutates_args=())
def unpack_codes(packed: Tensor, bits: int) -> Tensor:
    """The inverse of pack_codes: uint8 [..., n*bits/8] -> uint8 codes [..., n] (int16 for 9 bits)."""
    if bits == 9:
        n = packed.shape[-1] * 8 // 9
        lo, hi = packed[..., :n].to(torch.int16), packed[..., n:].to(torch.int16)
        ninth = (hi.unsqueeze(-1) >> torch.arange(8, device=packed.device, dtype=torch.int16)) & 1
        return lo | (ninth.reshape(*packed.shape[:-1], n) << 8)
    if bits == 3:
        *lead, nb = packed.shape
        b = packed.reshape(*lead, nb // 3, 3).to(torch.int32)
        word = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16)
        codes = (word.unsqueeze(-1) >> (torch.arange(8, device=packed.device, dtype=torch.int32) * 3)) & 7
        return codes.to(torch.uint8).reshape(*lead, nb // 3 * 8)
    per = 8 // bits
    shifts = torch.arange(per, device=packed.device, dtype=torch.uint8) * bits
    codes = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return codes.reshape(*packed.shape[:-1], packed.shape[-1] * per)


@torch.library.custom_op("qjl::pair_index", mutates_args=())
def pair_index(packed: Tensor) -> Tensor:
    """3-bit codes packed 8 to 3 bytes [..., n*3/8] -> int32 [..., n/2]: the four 6-bit indices of each 24-bit
    word, each holding 2 codes (code s at bits 3s), so a key is scored with n/2 table entries instead of n."""
    *lead, nb = packed.shape
    b = packed.reshape(*lead, nb // 3, 3).to(torch.int32)
    word = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16)
    return torch.stack([(word >> s) & 63 for s in (0, 6, 12, 18)], dim=-1).reshape(*lead, nb // 3 * 4)


def packed_bytes(n: int, bits: int) -> int:
    """Bytes that n codes of `bits` bits take."""
    return n * bits // 8


def unpack_codes_float(packed: Tensor, bits: int) -> Tensor:
    """unpack_codes(...).float(), by one table look-up per byte (3x faster on a CPU than shifts and masks)."""
    from .tables import byte_codes

    table = byte_codes(bits, str(packed.device)).float()
    codes = F.embedding(packed.to(torch.int32), table)  # [..., n*bits/8, 8/bits]
    return codes.reshape(*packed.shape[:-1], packed.shape[-1] * table.shape[1])
