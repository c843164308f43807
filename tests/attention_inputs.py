"""Inputs of the fused attention ops for tests: one layer's op arguments from random K/V, and exact parts.

Shared by the CPU-kernel tests (test_native, test_native_sketch) and the dense-path tests (test_dense)."""

from __future__ import annotations

import torch

from qjl.codecs import make_codecs
from qjl.config import QJLConfig


def layer_args(config: QJLConfig, D: int, H: int, groups: int, seed: int, key_offset: float = 0.0):
    """(op arguments of both codecs for `groups` token groups of random K/V, the generator to go on with)."""
    keys, values = make_codecs(config, 0, D)
    gen = torch.Generator().manual_seed(seed)
    T = groups * config.group_size
    ks = keys.encode(torch.randn(1, H, T, D, generator=gen) * 2 + key_offset, torch.rand(1, H, D, generator=gen))
    vs = values.encode(torch.randn(1, H, T, D, generator=gen))
    return keys.op_args(ks) | values.op_args(vs), gen


def exact_parts(gen: torch.Generator, H: int, D: int, L: int, parts: tuple) -> tuple[list, list]:
    """Exact keys and values of the given sizes (zeros left out; the first fp16 as the sink/window are, the rest
    float32); the last part holds at least the L queries' own tokens."""
    sizes = [n for n in parts if n] or [L]
    sizes[-1] = max(sizes[-1], L)  # the queries are the last L exact tokens
    ek = [torch.randn(1, H, n, D, generator=gen).to(torch.float16 if i == 0 else torch.float32)
          for i, n in enumerate(sizes)]
    return ek, [torch.randn(1, H, n, D, generator=gen).to(t.dtype) for n, t in zip(sizes, ek)]
