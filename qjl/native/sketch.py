"""The CPU kernel beneath `qjl::sketch_attention` (--kv qjl; qjl_cpu_sketch.c), called through ctypes.

It covers decode steps and question chunks up to MAX_ROWS query rows per KV head, every outlier layout of
the QJL key codec (per head: quantised or fp16; per token group: fp16 with uint8 indices), a head mean or none,
2/4/8-bit values; anything else (or no library) runs the op's torch code, without a warning.
"""

from __future__ import annotations

import ctypes

import torch

from ..ops import attention as attention_ops
from .cargs import Pointers, threads

# Query rows (GQA group x chunk) the kernel takes. Measured against the torch op in one process (one thread,
# 3 KV heads of 64, 2k-8k tokens): 0.31-0.33x its time at 3 rows (decode), 0.52x at 12, 0.78-0.81x at 96-189
# (question chunks); 256 covers every chunk below dense.MIN_ROWS (64) queries up to GQA 4. Its per-query
# tables take m/8 x 256 x rows floats a KV head, as the torch op's do.
MAX_ROWS = 256
MAX_CHANNELS = 64  # qjl_cpu_sketch.c fp16_outlier_logits
SCOPE_HEAD_CODES, SCOPE_HEAD_FP16, SCOPE_GROUP_FP16 = 1, 2, 3
P, I = ctypes.c_void_p, ctypes.c_int


class SketchArgs(ctypes.Structure):
    """Mirror of sketch_args in qjl_cpu_sketch.c (same order)."""

    _fields_ = [(n, I) for n in ("B", "H", "R", "L", "D", "T", "Ne", "m")] + [
        ("q", P), ("ke", P), ("ve", P), ("signs", P), ("knorms", P), ("proj", P), ("sketch_scale", ctypes.c_float),
        ("penalty", ctypes.c_float), ("r", I), ("scope", I), ("channels", P), ("ocodes", P), ("oscales", P),
        ("omins", P), ("obits", I), ("G", I), ("ovalues", P), ("oindex", P), ("kmean", P), ("vcodes", P),
        ("vscales", P), ("vmins", P), ("vbits", I), ("vgroup", I), ("scaling", ctypes.c_float), ("out", P)]


def _scope(channels, outlier_values, outlier_scales, outlier_index, outlier_bits) -> int | None:
    """How the kept channels are laid out (SCOPE_*), 0 for none, None where the kernel does not cover it."""
    if channels is not None:
        if channels.shape[-1] > MAX_CHANNELS:
            return None
        if outlier_bits in (2, 4, 8) and outlier_scales is not None and outlier_scales.dtype == torch.float16:
            return SCOPE_HEAD_CODES
        return SCOPE_HEAD_FP16 if outlier_bits >= 16 and outlier_values.dtype == torch.float16 else None
    if outlier_index is not None:
        ok = (outlier_index.dtype == torch.uint8 and outlier_values.dtype == torch.float16
              and outlier_index.shape[-1] <= MAX_CHANNELS)
        return SCOPE_GROUP_FP16 if ok else None
    return 0


def covered(q, exact_k, signs, key_norms, value_codes, value_scales, value_bits, value_group, scope) -> bool:
    B, Hq, L, D = q.shape
    return (scope is not None and Hq // exact_k[0].shape[1] * L <= MAX_ROWS and signs.shape[2] > 0
            and signs.dtype == value_codes.dtype == torch.uint8 and key_norms.dtype == torch.float16
            and value_scales.dtype == torch.float16 and value_bits in (2, 4, 8) and D % value_group == 0
            and sum(t.shape[2] for t in exact_k) >= L and q.dtype in (torch.float32, torch.float16, torch.bfloat16))


def _fill(a: SketchArgs, c, channels, outlier_values, outlier_scales, outlier_mins, outlier_index, outlier_bits,
          key_mean, value_codes, value_scales, value_mins) -> None:
    """The kept channels, the head mean and the values into a (c: a tensor's data pointer, kept alive)."""
    if a.scope:
        a.r = (channels if channels is not None else outlier_index).shape[-1]
    if a.scope in (SCOPE_HEAD_CODES, SCOPE_HEAD_FP16):
        a.channels = c(channels, torch.int64)
    if a.scope == SCOPE_HEAD_CODES:
        a.ocodes, a.oscales, a.omins, a.obits = c(outlier_values), c(outlier_scales), c(outlier_mins), outlier_bits
    elif a.scope:
        a.ovalues, a.oindex = c(outlier_values), c(outlier_index)
    a.kmean = c(key_mean, torch.float32)
    a.vcodes, a.vscales, a.vmins = c(value_codes), c(value_scales), c(value_mins)


def sketch_attention_cpu(q, exact_k, exact_v, signs, key_norms, projection, sketch_scale, channels, outlier_values,
                         outlier_scales, outlier_mins, outlier_index, outlier_bits, group_size, key_mean,
                         sketch_variance, value_codes, value_scales, value_mins, value_bits, value_group, scaling):
    from . import library

    lib = library()
    scope = _scope(channels, outlier_values, outlier_scales, outlier_index, outlier_bits)
    if lib is None or not covered(q, exact_k, signs, key_norms, value_codes, value_scales, value_bits,
                                  value_group, scope):
        return attention_ops.sketch_attention._init_fn(
            q, exact_k, exact_v, signs, key_norms, projection, sketch_scale, channels, outlier_values,
            outlier_scales, outlier_mins, outlier_index, outlier_bits, group_size, key_mean, sketch_variance,
            value_codes, value_scales, value_mins, value_bits, value_group, scaling)
    B, Hq, L, D = q.shape
    H = exact_k[0].shape[1]
    c = Pointers()  # every tensor handed to C stays referenced until the call returns

    a = SketchArgs(B=B, H=H, R=Hq // H * L, L=L, D=D, T=signs.shape[2], Ne=sum(t.shape[2] for t in exact_k),
                   m=projection.shape[0], sketch_scale=float(sketch_scale),
                   penalty=0.5 * float(scaling) * float(sketch_variance), scope=scope, G=group_size,
                   vbits=value_bits, vgroup=value_group, scaling=float(scaling))
    a.q = c(q.reshape(B, H, a.R, D), torch.float32)
    a.ke, a.ve = c(attention_ops._exact(exact_k)), c(attention_ops._exact(exact_v))
    a.signs, a.knorms, a.proj = c(signs), c(key_norms), c(projection, torch.float32)
    _fill(a, c, channels, outlier_values, outlier_scales, outlier_mins, outlier_index, outlier_bits, key_mean,
          value_codes, value_scales, value_mins)
    out = torch.empty(B, H, a.R, D)
    a.out = out.data_ptr()
    if lib.qjl_sketch_attention(ctypes.addressof(a), threads()):
        raise RuntimeError("qjl_sketch_attention refused its arguments")
    return out.reshape(B, Hq, L, D).to(q.dtype)
