"""Input checks of the CUDA wrappers (qjl/kernels.py): every constraint named before any launch.

Each check returns None when the kernel covers the call, or the reason it does not (the wrapper then runs
the torch op with one warning); inputs no implementation could take raise ValueError or TypeError.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .kernels import _TURBO_KEYS, _TURBO_VALUES, FLOAT_TYPES, HEAD_DIMS, MAX_CODEBOOK, MAX_OUTLIERS, MAX_PAIR_CODEBOOK

# --- input checks shared by the wrappers --------------------------------------------------------------------
def _tensors_on(device_type: str, named: dict) -> None:
    """Every tensor on one device of `device_type`: a clear error otherwise (before any launch)."""
    first = None
    for name, t in named.items():
        if t is None:
            continue
        if t.device.type != device_type:
            raise ValueError(f"qjl kernels: {name} is on {t.device}, but this is the {device_type} implementation: "
                             f"pass every tensor on one {device_type} device")
        if first is None:
            first = (name, t.device)
        elif t.device != first[1]:
            raise ValueError(f"qjl kernels: {name} is on {t.device} and {first[0]} on {first[1]}; pass every tensor on "
                             f"one device")


def _dtype(t: Optional[Tensor], name: str, *dtypes: torch.dtype) -> None:
    if t is not None and t.dtype not in dtypes:
        want = " or ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"qjl kernels: {name} must be {want}, not {str(t.dtype).replace('torch.', '')}")


def _exact_parts(q: Tensor, parts: list[Tensor]) -> list[Tensor]:
    """The exact parts in q's dtype with contiguous, 16-byte aligned rows (copies only where needed)."""
    out = []
    for t in parts:
        if t.dtype != q.dtype:
            t = t.to(q.dtype)
        if (t.stride(-1) != 1 or t.data_ptr() % 16 or any(s % 8 for s in t.stride()[:-1])):
            t = t.contiguous()
        out.append(t)
    return out


def _non_contiguous(named: dict) -> Optional[str]:
    for name, t in named.items():
        if t is not None and not t.is_contiguous():
            return f"a non-contiguous {name}"
    return None


def _require(dtype: torch.dtype, named: dict) -> None:
    for name, t in named.items():
        _dtype(t, name, dtype)


def _shared_reason(q, exact_k, exact_v, channels, outlier_bits: int, group_size: int) -> Optional[str]:
    """What both attention kernels need of the queries, the exact parts and the channels kept apart."""
    if q.dtype not in FLOAT_TYPES:
        return f"queries of dtype {q.dtype}"
    if q.dim() != 4 or q.shape[-1] not in HEAD_DIMS:
        return f"head_dim {q.shape[-1]} (kernels: 64, 128)"
    if not 1 <= len(exact_k) <= 3 or len(exact_v) != len(exact_k):
        return f"{len(exact_k)} exact parts (kernels: 1 to 3)"
    if channels is not None and channels.shape[-1] > MAX_OUTLIERS:
        return f"{channels.shape[-1]} outlier channels (kernels: at most {MAX_OUTLIERS})"
    if channels is not None and outlier_bits < 16 and (outlier_bits not in (2, 4, 8) or group_size < 16):
        return f"{outlier_bits}-bit outliers over {group_size}-token groups (kernels: 2/4/8 bits, groups >= 16)"
    return None


def _norms(norms: Tensor, steps: Optional[Tensor], name: str) -> None:
    """A turbo scale tensor as qjl.ops.attention.scales reads it: fp16 [B, H, T] without steps; with steps (fp16
    [B, H, T/G]), uint8 codes [B, H, T] and T whole groups. Raises TypeError / ValueError otherwise."""
    if steps is None:
        _dtype(norms, name, torch.float16)
        return
    _dtype(norms, f"{name} (8-bit codes, with {name[:-1]}_steps)", torch.uint8)
    _dtype(steps, f"{name[:-1]}_steps", torch.float16)
    T = norms.shape[-1] if norms.dim() else 0
    if (norms.dim() != 3 or steps.dim() != 3 or steps.shape[:2] != norms.shape[:2]
            or (T > 0 and (steps.shape[2] == 0 or T % steps.shape[2]))):
        raise ValueError(f"qjl kernels: {name} {tuple(norms.shape)} with steps {tuple(steps.shape)}: want codes "
                         f"[B, H, T] and steps [B, H, T/G] over whole groups of G tokens")


def check_turbo_attention(q, exact_k, exact_v, key_codes, key_bits, key_centroids, key_norms, key_norm_steps,
                          key_rotation, channels, rest, outlier_values, outlier_scales, outlier_mins, outlier_bits,
                          group_size, residual_signs, residual_norms, residual_projection, residual_scale, value_codes,
                          value_bits, value_tables, value_norms, value_norm_steps, value_rotation, scaling,
                          device_type: str = "cuda") -> Optional[str]:
    """None if the turbo kernel takes these arguments; else what it lacks (the caller falls back to torch).
    Raises ValueError / TypeError for inputs no implementation should get (mixed devices, wrong dtypes)."""
    _tensors_on(device_type, {"q": q, "key_norms": key_norms, "key_norm_steps": key_norm_steps,
                              "key_rotation": key_rotation, "channels": channels,
                              "rest": rest, "outlier_values": outlier_values, "outlier_scales": outlier_scales,
                              "outlier_mins": outlier_mins, "value_norms": value_norms,
                              "value_norm_steps": value_norm_steps, "value_rotation": value_rotation,
                              **{f"exact_k[{i}]": t for i, t in enumerate(exact_k)},
                              **{f"exact_v[{i}]": t for i, t in enumerate(exact_v)},
                              **{f"key_codes[{i}]": t for i, t in enumerate(key_codes)},
                              **{f"key_centroids[{i}]": t for i, t in enumerate(key_centroids)},
                              **{f"value_codes[{i}]": t for i, t in enumerate(value_codes)},
                              **{f"value_tables[{i}]": t for i, t in enumerate(value_tables)}})
    _require(torch.uint8, {**{f"key_codes[{i}]": t for i, t in enumerate(key_codes)},
                           **{f"value_codes[{i}]": t for i, t in enumerate(value_codes)}})
    _norms(key_norms, key_norm_steps, "key_norms")
    _norms(value_norms, value_norm_steps, "value_norms")
    _require(torch.int64, {"channels": channels, "rest": rest})
    reason = _shared_reason(q, exact_k, exact_v, channels, outlier_bits, group_size)
    if reason:
        return reason
    if residual_projection is not None:
        return "a residual sketch (turbo_residual_ratio > 0)"
    if list(key_bits) != [3]:
        return f"{'+'.join(map(str, key_bits))}-bit keys (kernels: 3)"
    if len(key_centroids) != 1 or tuple(key_centroids[0].shape) not in _TURBO_KEYS:
        shapes = ", ".join(str(tuple(c.shape)) for c in key_centroids)
        return f"3-bit key centroids of shape {shapes} (kernels: [8] Lloyd-Max centroids or a [64, 2] pair codebook)"
    if len(value_bits) != 1 or len(value_tables) != 1:
        return f"{'+'.join(map(str, value_bits))}-bit values (kernels: one part of 2, 3, 4 or 9 bits)"
    if (value_bits[0], tuple(value_tables[0].shape)) not in _TURBO_VALUES:
        return (f"{value_bits[0]}-bit values with a {tuple(value_tables[0].shape)} table "
                f"(kernels: 2 bits with [256, 4], 4 with [256, 2], 3 with [8, 1], 9 with [512, 4])")
    return _non_contiguous({"key_codes": key_codes[0], "value_codes": value_codes[0], "key_norms": key_norms,
                            "key_norm_steps": key_norm_steps, "value_norms": value_norms,
                            "value_norm_steps": value_norm_steps, "outlier_values": outlier_values,
                            "outlier_scales": outlier_scales, "outlier_mins": outlier_mins, "channels": channels,
                            "rest": rest})


def check_sketch_attention(q, exact_k, exact_v, signs, key_norms, projection, sketch_scale, channels, outlier_values,
                           outlier_scales, outlier_mins, outlier_index, outlier_bits, group_size, key_mean,
                           sketch_variance, value_codes, value_scales, value_mins, value_bits, value_group, scaling,
                           device_type: str = "cuda") -> Optional[str]:
    """As check_turbo_attention, for the qjl mode's op."""
    _tensors_on(device_type, {"q": q, "signs": signs, "key_norms": key_norms, "projection": projection,
                              "channels": channels, "outlier_values": outlier_values,
                              "outlier_scales": outlier_scales, "outlier_mins": outlier_mins,
                              "outlier_index": outlier_index, "key_mean": key_mean, "value_codes": value_codes,
                              "value_scales": value_scales, "value_mins": value_mins,
                              **{f"exact_k[{i}]": t for i, t in enumerate(exact_k)},
                              **{f"exact_v[{i}]": t for i, t in enumerate(exact_v)}})
    _require(torch.uint8, {"signs": signs, "value_codes": value_codes})
    _require(torch.float16, {"key_norms": key_norms, "value_scales": value_scales, "value_mins": value_mins})
    _require(torch.int64, {"channels": channels})
    reason = _shared_reason(q, exact_k, exact_v, channels, outlier_bits, group_size)
    if reason:
        return reason
    if outlier_index is not None:
        return "per-group outliers (outlier_scope='group')"
    if value_bits not in (2, 4):
        return f"{value_bits}-bit values (kernels: 2, 4)"
    if key_mean is not None and key_mean.dtype != torch.float32:
        return f"a {key_mean.dtype} key mean"
    return _non_contiguous({"signs": signs, "key_norms": key_norms, "value_codes": value_codes,
                            "value_scales": value_scales, "value_mins": value_mins,
                            "outlier_values": outlier_values, "outlier_scales": outlier_scales,
                            "outlier_mins": outlier_mins, "channels": channels, "key_mean": key_mean})


def _unsupported(e: RuntimeError) -> Optional[str]:
    """The reason of a "qjl-unsupported:" error the extension raises before any launch, else None."""
    msg = str(e)
    i = msg.find("qjl-unsupported:")
    return msg[i + len("qjl-unsupported:"):].strip().splitlines()[0] if i >= 0 else None


def check_codes(y: Tensor, bits: list[int], lengths: list[int], vq_codebook: Optional[Tensor],
                device_type: str = "cuda", packed: bool = False) -> Optional[str]:
    """None if the code kernel takes y (float32 [..., dim]) with these parts or this codebook ([K <= 512, 4], or
    a pair codebook [K <= 64, 2]). `packed`: the codes are wanted in turbo_encode's layout (9-bit packed for
    more than 256 points of 4, 3-bit packed for a pair codebook), not as vq_nearest returns them (int16, uint8)."""
    _tensors_on(device_type, {"y": y, "codebook": vq_codebook})
    if y.dtype != torch.float32:
        return f"{y.dtype} input (kernels: float32)"
    if y.dim() < 1 or y.shape[-1] % 8:
        return f"{y.shape[-1] if y.dim() else 0} coordinates (kernels: a multiple of 8)"
    if vq_codebook is not None:
        K, C = (vq_codebook.shape if vq_codebook.dim() == 2 else (0, 0))
        if not ((C == 4 and 1 <= K <= MAX_CODEBOOK) or (C == 2 and 1 <= K <= MAX_PAIR_CODEBOOK)):
            return (f"a codebook of shape {tuple(vq_codebook.shape)} "
                    f"(kernels: [K <= {MAX_CODEBOOK}, 4] or [K <= {MAX_PAIR_CODEBOOK}, 2])")
        if packed and C == 4 and K > 256 and y.shape[-1] % 32:
            return f"9-bit codes of {y.shape[-1]} coordinates (kernels: a multiple of 32)"
        return None
    if not 1 <= len(bits) <= 2 or any(b not in (1, 2, 3, 4) for b in bits):
        return f"{'+'.join(map(str, bits))}-bit codes (kernels: one or two parts of 1 to 4 bits)"
    if sum(lengths) != y.shape[-1] or any(n % 8 for n in lengths):
        return f"parts of {list(lengths)} coordinates for {y.shape[-1]}"
    return None
