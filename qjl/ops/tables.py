"""Look-up tables that turn a query (or a codebook) into what the scoring and summing ops read.

Built per query with one small matmul against a fixed 0/1 or +-1 matrix, so scoring a packed key is a sum of
table entries, one per code byte, instead of a multiply-add per coordinate.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from .codes import unpack_codes


@functools.lru_cache(maxsize=16)
def byte_codes(bits: int, device: str) -> Tensor:
    """[256, 8/bits] long: the codes every byte value holds (bits 1, 2, 4, 8)."""
    return unpack_codes(torch.arange(256, dtype=torch.uint8).unsqueeze(-1), bits).long().to(device)


def byte_table(bits: int, levels: Tensor) -> Tensor:
    """[256, 8/bits] float32: the level of each code of every byte value (bits 1, 2, 4, 8), the table that
    lookup_weighted_sum reads packed bytes with."""
    return levels[byte_codes(bits, str(levels.device))]


@functools.lru_cache(maxsize=8)
def pair_onehot(device: str) -> torch.Tensor:
    """[2 * 8, 64] float32: entry (s * 8 + c, w) is 1 if 3-bit code s of the 6-bit index w is c."""
    w = torch.arange(64)
    codes = torch.stack([w & 7, w >> 3], dim=1)  # [64, 2]
    m = torch.zeros(16, 64)
    m[torch.arange(2) * 8 + codes, w.unsqueeze(1).expand(64, 2)] = 1.0
    return m.to(device)


@functools.lru_cache(maxsize=16)
def byte_onehot(bits: int, device: str) -> torch.Tensor:
    """[per * 2^b, 256] float32: entry (s * 2^b + c, byte) is 1 if code s of the byte is c (bits 1, 2, 4)."""
    codes = byte_codes(bits, "cpu")  # [256, per]
    per, K = codes.shape[1], 1 << bits
    rows = torch.arange(per).unsqueeze(0) * K + codes  # [256, per]
    m = torch.zeros(per * K, 256)
    m[rows, torch.arange(256).unsqueeze(1).expand(256, per)] = 1.0
    return m.to(device)


def byte_sign_table(proj: torch.Tensor) -> torch.Tensor:
    """Per byte of sign bits, the sum of +-proj over its 8 bits, for all 256 byte values.

    proj: [..., m] float -> table [..., m/8, 256] with
    table[..., i, b] = sum_j (+1 if bit j of b else -1) * proj[..., 8i + j].
    Scoring a packed key is then m/8 table look-ups instead of m multiply-adds.
    """
    *lead, m = proj.shape
    p = proj.reshape(*lead, m // 8, 8)
    return p @ _byte_signs(str(proj.device), proj.dtype)  # [..., m/8, 256]


@functools.lru_cache(maxsize=16)
def _byte_signs(device: str, dtype: torch.dtype) -> torch.Tensor:
    """[8, 256]: entry (j, b) is +1 if bit j of byte b is set, else -1."""
    bits = unpack_codes(torch.arange(256, dtype=torch.uint8).unsqueeze(-1), 1)  # [256, 8]: bit j of each byte
    return (bits.to(dtype) * 2 - 1).T.contiguous().to(device)
