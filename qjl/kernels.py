"""CUDA kernels beneath the ops layer: build on first use, self-test, dispatch, fall back to torch.

`import qjl.kernels` registers a CUDA implementation under each op below (torch.library.register_kernel):

  qjl::turbo_attention   fused split-K attention, --kv turbo (3-bit keys, 2/3/4-bit or vq4 values)
  qjl::sketch_attention  fused split-K attention, --kv qjl (sign sketches, 2/4-bit integer values)
  qjl::turbo_encode      rotation (cuBLAS, as the torch op), Lloyd-Max or vq4 codes, the least-squares scale
  qjl::scalar_quantize, qjl::vq_nearest, qjl::int_quantize, qjl::sign_bits   encode steps

The first call of one of them with CUDA tensors builds the extension from csrc/ (ninja; cached under
QJL_HOME/kernels/<source hash, torch version, GPU architecture>), then runs a self-test on small shapes against
the torch ops; if the build fails or anything disagrees, the kernels are not used and one warning says why.
A configuration a kernel does not cover runs the torch op, with one warning per op and reason. `QJL_KERNELS=0`
forces the torch ops. On a machine without CUDA nothing is built and the extension is never imported: the
wrappers are only reached with CUDA tensors. Every op's torch implementation stays the specification.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import statistics
import sys
import threading
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import Tensor

from .errors import QJLError
from .ops import attention as _attention
from .ops import encode as _encode

ENV = "QJL_KERNELS"
CSRC = Path(__file__).resolve().parent.parent / "csrc"
FLOAT_TYPES = (torch.float16, torch.bfloat16, torch.float32)
HEAD_DIMS = (64, 128)
# Value kinds of the turbo kernel (csrc/attention.cu ValKind): (bits, table shape) -> kind.
_TURBO_VALUES = {(2, (256, 4)): 0, (4, (256, 2)): 1, (3, (8, 1)): 2}
MAX_OUTLIERS = 64


class KernelError(QJLError, RuntimeError):
    """The CUDA kernels cannot be built or used as asked (no CUDA device, no compiler, a failed self-test)."""


# --- state ---------------------------------------------------------------------------------------------------
_lock = threading.RLock()
_local = threading.local()
_state: dict = {"status": "untried", "reason": "", "module": None, "build": None}  # untried|off|loaded|failed
_warned: set = set()
TORCH_IMPL: dict[str, Callable] = {}  # "qjl::name" -> the op's torch implementation


def enabled() -> bool:
    """False when QJL_KERNELS=0 (or off/false/no): the torch ops serve everything."""
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "off", "false", "no")


def status() -> dict:
    """{"status": untried|off|loaded|failed, "reason": why not loaded, "build": build info or None}."""
    return {k: _state[k] for k in ("status", "reason", "build")}


def reset() -> None:
    """Forget the loaded extension and the warnings given (tests)."""
    with _lock:
        _state.update(status="untried", reason="", module=None, build=None)
        _warned.clear()


@contextlib.contextmanager
def torch_only():
    """Within this block every op runs its torch implementation (the references of the self-test)."""
    old = getattr(_local, "torch_only", False)
    _local.torch_only = True
    try:
        yield
    finally:
        _local.torch_only = old


def _warn_once(key: tuple, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def fallback(op: str, reason: str) -> None:
    """One warning per (op, reason): this configuration runs the torch op."""
    _warn_once((op, reason), f"qjl kernels: no CUDA kernel for {op} with {reason}; using the torch op")


def _ready() -> bool:
    """Whether a wrapper may call the extension now (building and self-testing it on the first call)."""
    if getattr(_local, "torch_only", False) or not enabled():
        return False
    if _state["status"] == "untried":
        ensure_loaded()
    return _state["status"] == "loaded"


# --- build ---------------------------------------------------------------------------------------------------
def _sources():
    """csrc/sources.py (the source list and flags CI compiles with), imported by path."""
    path = CSRC / "sources.py"
    if not path.is_file():
        raise KernelError(f"the CUDA sources are not installed ({CSRC} has no sources.py); use a source checkout "
                          f"(pip install -e .)")
    mod = sys.modules.get("qjl_csrc_sources")
    if mod is None or getattr(mod, "__file__", None) != str(path):
        spec = importlib.util.spec_from_file_location("qjl_csrc_sources", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        sys.modules["qjl_csrc_sources"] = mod
    return mod


def build_root() -> Path:
    """Where builds are cached: QJL_HOME/kernels, else the user cache dir's qjl/kernels."""
    env = os.environ.get("QJL_HOME")
    if env:
        return Path(env).expanduser() / "kernels"
    import platformdirs

    return Path(platformdirs.user_cache_dir("qjl")) / "kernels"


def device_arch(device=None) -> str:
    major, minor = torch.cuda.get_device_capability(device)
    return f"{major}.{minor}"


def build_key(arch: str, torch_version: str | None = None) -> str:
    """The cache key of a build: source hash (sources, headers, flags), torch version, GPU architecture."""
    return _sources().build_key(torch_version or torch.__version__, arch)


def build(verbose: bool = False):
    """Build (or load the cached build of) the extension for the current GPU; returns the module.

    Raises KernelError without CUDA or when the compiler fails."""
    if not torch.cuda.is_available():
        raise KernelError("no CUDA device: the kernels are for NVIDIA GPUs; the torch ops serve this machine")
    src = _sources()
    arch = device_arch()
    key = src.build_key(torch.__version__, arch)
    folder = build_root() / key
    cached = (folder / f"{src.NAME}.so").is_file()
    old = os.environ.get("TORCH_CUDA_ARCH_LIST")
    os.environ["TORCH_CUDA_ARCH_LIST"] = arch
    t0 = time.perf_counter()
    try:
        module = src.load(str(folder), verbose=verbose)
    except Exception as e:  # noqa: BLE001 - a compiler or linker failure: say so in one line
        lines = [line for line in str(e).strip().splitlines() if line.strip()]
        raise KernelError(f"building the CUDA kernels failed ({lines[-1] if lines else type(e).__name__}); "
                          f"rerun `qjl kernels build --verbose` for the compiler's output") from e
    finally:
        if old is None:
            os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = old
    _state["build"] = {"key": key, "folder": str(folder), "arch": arch, "cached": cached,
                       "seconds": round(time.perf_counter() - t0, 1)}
    return module


def ensure_loaded(self_test: bool = True):
    """Build, load and self-test the extension once per process; returns it, or None when the torch ops must
    serve (QJL_KERNELS=0, no CUDA, a failed build or self-test: the last two warn once, saying why)."""
    with _lock:
        if _state["status"] != "untried":
            return _state["module"]
        if not enabled():
            _state.update(status="off", reason=f"{ENV}=0")
            return None
        if not torch.cuda.is_available():
            _state.update(status="off", reason="no CUDA device")
            return None
        try:
            module = build()
        except KernelError as e:
            _state.update(status="failed", reason=str(e))
            _warn_once(("build",), f"qjl kernels: not used: {e}")
            return None
        _state.update(status="loaded", module=module)
        if self_test:
            try:
                rows = parity(cases("self-test"), timing=False)
                bad = [r for r in rows if not r.ok]
            except Exception as e:  # noqa: BLE001 - a kernel that raises is a kernel that disagrees
                bad = [f"{type(e).__name__}: {e}"]
            if bad:
                first = bad[0] if isinstance(bad[0], str) else (f"{bad[0].op} {bad[0].shape} {bad[0].dtype}: error "
                                                                f"{bad[0].max_err:.3g} > {bad[0].tol:.3g}")
                reason = f"self-test failed ({len(bad)} case(s); first: {first})"
                _state.update(status="failed", reason=reason, module=None)
                _warn_once(("self-test",), f"qjl kernels: not used: {reason}")
                return None
        return module


def _module():
    return _state["module"]


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


def check_turbo_attention(q, exact_k, exact_v, key_codes, key_bits, key_centroids, key_norms, key_rotation, channels,
                          rest, outlier_values, outlier_scales, outlier_mins, outlier_bits, group_size,
                          residual_signs, residual_norms, residual_projection, residual_scale, value_codes,
                          value_bits, value_tables, value_norms, value_rotation, scaling,
                          device_type: str = "cuda") -> Optional[str]:
    """None if the turbo kernel takes these arguments; else what it lacks (the caller falls back to torch).
    Raises ValueError / TypeError for inputs no implementation should get (mixed devices, wrong dtypes)."""
    _tensors_on(device_type, {"q": q, "key_norms": key_norms, "key_rotation": key_rotation, "channels": channels,
                              "rest": rest, "outlier_values": outlier_values, "outlier_scales": outlier_scales,
                              "outlier_mins": outlier_mins, "value_norms": value_norms,
                              "value_rotation": value_rotation,
                              **{f"exact_k[{i}]": t for i, t in enumerate(exact_k)},
                              **{f"exact_v[{i}]": t for i, t in enumerate(exact_v)},
                              **{f"key_codes[{i}]": t for i, t in enumerate(key_codes)},
                              **{f"key_centroids[{i}]": t for i, t in enumerate(key_centroids)},
                              **{f"value_codes[{i}]": t for i, t in enumerate(value_codes)},
                              **{f"value_tables[{i}]": t for i, t in enumerate(value_tables)}})
    for i, t in enumerate(key_codes):
        _dtype(t, f"key_codes[{i}]", torch.uint8)
    for i, t in enumerate(value_codes):
        _dtype(t, f"value_codes[{i}]", torch.uint8)
    _dtype(key_norms, "key_norms", torch.float16)
    _dtype(value_norms, "value_norms", torch.float16)
    _dtype(channels, "channels", torch.int64)
    _dtype(rest, "rest", torch.int64)
    if q.dtype not in FLOAT_TYPES:
        return f"queries of dtype {q.dtype}"
    if q.dim() != 4 or q.shape[-1] not in HEAD_DIMS:
        return f"head_dim {q.shape[-1]} (kernels: 64, 128)"
    if not 1 <= len(exact_k) <= 3 or len(exact_v) != len(exact_k):
        return f"{len(exact_k)} exact parts (kernels: 1 to 3)"
    if residual_projection is not None:
        return "a residual sketch (turbo_residual_ratio > 0)"
    if list(key_bits) != [3]:
        return f"{'+'.join(map(str, key_bits))}-bit keys (kernels: 3)"
    if channels is not None and channels.shape[-1] > MAX_OUTLIERS:
        return f"{channels.shape[-1]} outlier channels (kernels: at most {MAX_OUTLIERS})"
    if channels is not None and outlier_bits < 16 and (outlier_bits not in (2, 4, 8) or group_size < 16):
        return f"{outlier_bits}-bit outliers over {group_size}-token groups (kernels: 2/4/8 bits, groups >= 16)"
    if len(value_bits) != 1 or len(value_tables) != 1:
        return f"{'+'.join(map(str, value_bits))}-bit values (kernels: one part of 2, 3 or 4 bits)"
    if (value_bits[0], tuple(value_tables[0].shape)) not in _TURBO_VALUES:
        return f"{value_bits[0]}-bit values with a {tuple(value_tables[0].shape)} table"
    return _non_contiguous({"key_codes": key_codes[0], "value_codes": value_codes[0], "key_norms": key_norms,
                            "value_norms": value_norms, "outlier_values": outlier_values,
                            "outlier_scales": outlier_scales, "outlier_mins": outlier_mins, "channels": channels,
                            "rest": rest})


def check_sketch_attention(q, exact_k, exact_v, signs, key_norms, projection, sketch_scale, channels, outlier_values,
                           outlier_scales, outlier_mins, outlier_index, outlier_bits, group_size, key_mean,
                           value_codes, value_scales, value_mins, value_bits, value_group, scaling,
                           device_type: str = "cuda") -> Optional[str]:
    """As check_turbo_attention, for the qjl mode's op."""
    _tensors_on(device_type, {"q": q, "signs": signs, "key_norms": key_norms, "projection": projection,
                              "channels": channels, "outlier_values": outlier_values,
                              "outlier_scales": outlier_scales, "outlier_mins": outlier_mins,
                              "outlier_index": outlier_index, "key_mean": key_mean, "value_codes": value_codes,
                              "value_scales": value_scales, "value_mins": value_mins,
                              **{f"exact_k[{i}]": t for i, t in enumerate(exact_k)},
                              **{f"exact_v[{i}]": t for i, t in enumerate(exact_v)}})
    _dtype(signs, "signs", torch.uint8)
    _dtype(value_codes, "value_codes", torch.uint8)
    _dtype(key_norms, "key_norms", torch.float16)
    _dtype(value_scales, "value_scales", torch.float16)
    _dtype(value_mins, "value_mins", torch.float16)
    _dtype(channels, "channels", torch.int64)
    if q.dtype not in FLOAT_TYPES:
        return f"queries of dtype {q.dtype}"
    if q.dim() != 4 or q.shape[-1] not in HEAD_DIMS:
        return f"head_dim {q.shape[-1]} (kernels: 64, 128)"
    if not 1 <= len(exact_k) <= 3 or len(exact_v) != len(exact_k):
        return f"{len(exact_k)} exact parts (kernels: 1 to 3)"
    if outlier_index is not None:
        return "per-group outliers (outlier_scope='group')"
    if channels is not None and channels.shape[-1] > MAX_OUTLIERS:
        return f"{channels.shape[-1]} outlier channels (kernels: at most {MAX_OUTLIERS})"
    if channels is not None and outlier_bits < 16 and (outlier_bits not in (2, 4, 8) or group_size < 16):
        return f"{outlier_bits}-bit outliers over {group_size}-token groups (kernels: 2/4/8 bits, groups >= 16)"
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


# --- the CUDA implementations --------------------------------------------------------------------------------
def turbo_attention_cuda(q, exact_k, exact_v, key_codes, key_bits, key_centroids, key_norms, key_rotation, channels,
                         rest, outlier_values, outlier_scales, outlier_mins, outlier_bits, group_size, residual_signs,
                         residual_norms, residual_projection, residual_scale, value_codes, value_bits, value_tables,
                         value_norms, value_rotation, scaling):
    args = (q, exact_k, exact_v, key_codes, key_bits, key_centroids, key_norms, key_rotation, channels, rest,
            outlier_values, outlier_scales, outlier_mins, outlier_bits, group_size, residual_signs, residual_norms,
            residual_projection, residual_scale, value_codes, value_bits, value_tables, value_norms,
            value_rotation, scaling)
    torch_impl = TORCH_IMPL["qjl::turbo_attention"]
    if not _ready():
        return torch_impl(*args)
    reason = check_turbo_attention(*args)
    if reason is None:
        try:
            table = value_tables[0]
            return _module().turbo_attention(
                q, _exact_parts(q, exact_k), _exact_parts(q, exact_v), key_codes[0],
                key_centroids[0].float().contiguous(), key_norms, key_rotation.float().contiguous(), channels, rest,
                outlier_values, outlier_scales, outlier_mins, int(outlier_bits), int(group_size), value_codes[0],
                _TURBO_VALUES[(value_bits[0], tuple(table.shape))], table.float().reshape(-1).contiguous(),
                value_norms, value_rotation.float().contiguous(), float(scaling))
        except RuntimeError as e:
            reason = _unsupported(e)
            if reason is None:
                raise
    fallback("qjl::turbo_attention", reason)
    return torch_impl(*args)


def sketch_attention_cuda(q, exact_k, exact_v, signs, key_norms, projection, sketch_scale, channels, outlier_values,
                          outlier_scales, outlier_mins, outlier_index, outlier_bits, group_size, key_mean, value_codes,
                          value_scales, value_mins, value_bits, value_group, scaling):
    args = (q, exact_k, exact_v, signs, key_norms, projection, sketch_scale, channels, outlier_values, outlier_scales,
            outlier_mins, outlier_index, outlier_bits, group_size, key_mean, value_codes, value_scales, value_mins,
            value_bits, value_group, scaling)
    torch_impl = TORCH_IMPL["qjl::sketch_attention"]
    if not _ready():
        return torch_impl(*args)
    reason = check_sketch_attention(*args)
    if reason is None:
        try:
            return _module().sketch_attention(
                q, _exact_parts(q, exact_k), _exact_parts(q, exact_v), signs, key_norms,
                projection.float().contiguous(), float(sketch_scale), channels, outlier_values, outlier_scales,
                outlier_mins, int(outlier_bits), int(group_size), key_mean, value_codes, value_scales, value_mins,
                int(value_bits), int(value_group), float(scaling))
        except RuntimeError as e:
            reason = _unsupported(e)
            if reason is None:
                raise
    fallback("qjl::sketch_attention", reason)
    return torch_impl(*args)


def check_codes(y: Tensor, bits: list[int], lengths: list[int], vq_codebook: Optional[Tensor],
                device_type: str = "cuda") -> Optional[str]:
    """None if the code kernel takes y (float32 [..., dim]) with these parts or this codebook."""
    _tensors_on(device_type, {"y": y, "codebook": vq_codebook})
    if y.dtype != torch.float32:
        return f"{y.dtype} input (kernels: float32)"
    if y.dim() < 1 or y.shape[-1] % 8:
        return f"{y.shape[-1] if y.dim() else 0} coordinates (kernels: a multiple of 8)"
    if vq_codebook is not None:
        if vq_codebook.dim() != 2 or vq_codebook.shape[1] != 4 or not 1 <= vq_codebook.shape[0] <= 256:
            return f"a codebook of shape {tuple(vq_codebook.shape)} (kernels: [K <= 256, 4])"
        return None
    if not 1 <= len(bits) <= 2 or any(b not in (1, 2, 3, 4) for b in bits):
        return f"{'+'.join(map(str, bits))}-bit codes (kernels: one or two parts of 1 to 4 bits)"
    if sum(lengths) != y.shape[-1] or any(n % 8 for n in lengths):
        return f"parts of {list(lengths)} coordinates for {y.shape[-1]}"
    return None


def turbo_encode_cuda(x, rotation, bits, lengths, centroids, boundaries, vq_codebook):
    args = (x, rotation, bits, lengths, centroids, boundaries, vq_codebook)
    torch_impl = TORCH_IMPL["qjl::turbo_encode"]
    if not _ready():
        return torch_impl(*args)
    _tensors_on("cuda", {"x": x, "rotation": rotation, "codebook": vq_codebook})
    reason = None if x.dtype == torch.float32 else f"{x.dtype} input (kernels: float32)"
    if reason is None:
        # The rotation exactly as the torch op computes it (cuBLAS), so both code the same numbers.
        norms = x.norm(dim=-1)
        safe = torch.where(norms > 0, norms, torch.ones_like(norms))
        y = ((x / safe.unsqueeze(-1)) @ rotation.T).contiguous()
        reason = check_codes(y, bits, lengths, vq_codebook)
        if reason is None:
            book = None if vq_codebook is None else vq_codebook.float().contiguous()
            packed, fit = _module().encode_codes(y, list(bits), list(lengths),
                                                 [b.float().contiguous() for b in boundaries],
                                                 [c.float().contiguous() for c in centroids], book, True)
            return list(packed), (norms * fit).to(torch.float16)
    fallback("qjl::turbo_encode", reason)
    return torch_impl(*args)


def scalar_quantize_cuda(y, boundaries, bits):
    torch_impl = TORCH_IMPL["qjl::scalar_quantize"]
    if not _ready():
        return torch_impl(y, boundaries, bits)
    _tensors_on("cuda", {"y": y, "boundaries": boundaries})
    reason = check_codes(y, [bits], [y.shape[-1]] if y.dim() else [0], None)
    if reason is None and boundaries.numel() != (1 << bits) - 1:
        reason = f"{boundaries.numel()} boundaries for {bits}-bit codes"
    if reason is None:
        packed, _ = _module().encode_codes(y.contiguous(), [int(bits)], [int(y.shape[-1])],
                                           [boundaries.float().contiguous()], [], None, False)
        return packed[0]
    fallback("qjl::scalar_quantize", reason)
    return torch_impl(y, boundaries, bits)


def vq_nearest_cuda(y, codebook):
    torch_impl = TORCH_IMPL["qjl::vq_nearest"]
    if not _ready():
        return torch_impl(y, codebook)
    reason = check_codes(y, [], [], codebook)
    if reason is None:
        packed, _ = _module().encode_codes(y.contiguous(), [], [], [], [], codebook.float().contiguous(), False)
        return packed[0]
    fallback("qjl::vq_nearest", reason)
    return torch_impl(y, codebook)


def int_quantize_cuda(v, bits, group):
    torch_impl = TORCH_IMPL["qjl::int_quantize"]
    if not _ready():
        return torch_impl(v, bits, group)
    _tensors_on("cuda", {"v": v})
    reason = None
    if v.dim() != 4:
        reason = f"a {v.dim()}-d input (kernels: [B, H, T, D])"
    elif bits not in (1, 2, 4, 8) or v.shape[-1] % group or group * bits % 8:
        reason = f"{bits}-bit codes in groups of {group} of {v.shape[-1]} channels"
    if reason is None:
        return tuple(_module().int_quantize(v.float().contiguous(), int(bits), int(group)))
    fallback("qjl::int_quantize", reason)
    return torch_impl(v, bits, group)


def sign_bits_cuda(x):
    torch_impl = TORCH_IMPL["qjl::sign_bits"]
    if not _ready():
        return torch_impl(x)
    if x.dim() < 1 or x.shape[-1] % 8:
        return torch_impl(x)  # the torch op raises its own error
    if x.dtype not in FLOAT_TYPES:
        fallback("qjl::sign_bits", f"{x.dtype} input")
        return torch_impl(x)
    return _module().sign_bits(x.contiguous())


# --- registration --------------------------------------------------------------------------------------------
def _ops() -> dict:
    from . import turbo

    return {"qjl::turbo_attention": (_attention.turbo_attention, turbo_attention_cuda),
            "qjl::sketch_attention": (_attention.sketch_attention, sketch_attention_cuda),
            "qjl::turbo_encode": (turbo.turbo_encode, turbo_encode_cuda),
            "qjl::scalar_quantize": (_encode.scalar_quantize, scalar_quantize_cuda),
            "qjl::vq_nearest": (_encode.vq_nearest, vq_nearest_cuda),
            "qjl::int_quantize": (_encode.int_quantize, int_quantize_cuda),
            "qjl::sign_bits": (_encode.sign_bits, sign_bits_cuda)}


def register() -> None:
    """Register the CUDA implementations (idempotent; registering builds nothing and needs no GPU)."""
    with _lock:
        if TORCH_IMPL:
            return
        for name, (op, impl) in _ops().items():
            TORCH_IMPL[name] = op._init_fn  # the torch implementation: the specification and the fallback
            op.register_kernel("cuda", impl)


register()


# --- parity: the self-test, `qjl kernels check` and the GPU tests ------------------------------------------------
@dataclass
class ParityRow:
    op: str
    shape: str
    dtype: str
    max_err: float
    tol: float
    ok: bool
    kernel_ms: Optional[float] = None
    torch_ms: Optional[float] = None

    @property
    def speedup(self) -> Optional[float]:
        if self.kernel_ms and self.torch_ms:
            return self.torch_ms / self.kernel_ms
        return None

    def as_dict(self) -> dict:
        return asdict(self) | {"speedup": self.speedup}


@dataclass
class Case:
    """One comparison: `op` ("qjl::name") on `args`, compared by `compare(kernel_out, torch_out) -> error`
    against `tol`."""
    op: str
    shape: str
    dtype: str
    args: tuple
    compare: Callable
    tol: float


# Output tolerances (max |kernel - torch| / max |torch|) of the attention ops by query dtype: float32 sums in a
# different order; fp16 and bf16 outputs round once more (2^-11, 2^-8 relative) where the sums differ.
ATTENTION_TOL = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 2e-2}


def _rel_err(a, b) -> float:
    a, b = a.float(), b.float()
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def _mismatch(a, b) -> float:
    """The fraction of bytes that differ (packed codes: 0 when bit-exact)."""
    if isinstance(a, (list, tuple)):
        return max(_mismatch(x, y) for x, y in zip(a, b)) if len(a) == len(b) else 1.0
    if a.shape != b.shape or a.dtype != b.dtype:
        return 1.0
    return (a != b).float().mean().item()


def _encode_err(a, b) -> float:
    """turbo_encode: the worst of the code mismatch and the scales' relative error."""
    return max(_mismatch(a[0], b[0]), _rel_err(a[1], b[1]))


def _int_err(a, b) -> float:
    return max(_mismatch(a[0], b[0]), _mismatch(a[1], b[1]), _mismatch(a[2], b[2]))


def _exact_parts_for(H: int, Ne: int, L: int, D: int, dtype, device, gen) -> tuple[list, list]:
    """Sink (4), window, tail (at least L) parts, as the cache holds them; the tail a strided view."""
    sink = min(4, Ne - L)
    window = (Ne - L - sink) // 2
    tail = Ne - sink - window
    ks, vs = [], []
    for n, strided in ((sink, False), (window, False), (tail, True)):
        if n <= 0:
            continue
        k = torch.randn(1, n, H, D, generator=gen).to(device, dtype)
        v = torch.randn(1, n, H, D, generator=gen).to(device, dtype)
        if strided:  # [B, n, H, D] transposed to [B, H, n, D]: a model's K/V before any copy
            ks.append(k.transpose(1, 2))
            vs.append(v.transpose(1, 2))
        else:
            ks.append(k.transpose(1, 2).contiguous())
            vs.append(v.transpose(1, 2).contiguous())
    return ks, vs


def turbo_case(D: int, H: int, g: int, L: int, Tc: int, Ne: int, dtype, device, seed: int = 0,
               value_bits: float = 2, outliers: bool = True) -> Case:
    """A turbo layer's attention: random keys and values through the real codecs (qjl/turbo.py)."""
    from .config import QJLConfig
    from .turbo import TurboKeys, TurboValues

    gen = torch.Generator().manual_seed(seed)
    cfg = QJLConfig(turbo_value_bits=value_bits, turbo_outlier_fraction=0.125 if outliers else 0.0)
    keys, values = TurboKeys.for_layer(cfg, 0, D).to(device), TurboValues.for_layer(cfg, 0, D).to(device)
    k = torch.randn(1, H, Tc, D, generator=gen) * (1 + 3 * (torch.rand(D, generator=gen) > 0.9))
    v = torch.randn(1, H, Tc, D, generator=gen)
    q = (torch.randn(1, H * g, L, D, generator=gen) * (1 + 3 * (torch.rand(D, generator=gen) > 0.9))).to(device, dtype)
    with torch_only():
        state = keys.encode(k.to(device), q.float().pow(2).reshape(1, H, -1, D).mean(2)) | values.encode(v.to(device))
    args = keys.op_args(state) | values.op_args(state)
    ek, ev = _exact_parts_for(H, Ne, L, D, dtype, device, gen)
    full = (q, ek, ev, args["key_codes"], args["key_bits"], args["key_centroids"], args["key_norms"],
            args["key_rotation"], args["channels"], args["rest"], args["outlier_values"], args["outlier_scales"],
            args["outlier_mins"], args["outlier_bits"], args["group_size"], args["residual_signs"],
            args["residual_norms"], args["residual_projection"], args["residual_scale"], args["value_codes"],
            args["value_bits"], args["value_tables"], args["value_norms"], args["value_rotation"], D ** -0.5)
    shape = f"D{D} H{H} g{g} L{L} T{Tc}+{Ne} V{value_bits}{'' if outliers else ' r0'}"
    return Case("qjl::turbo_attention", shape, str(dtype).replace("torch.", ""), full, _rel_err,
                ATTENTION_TOL[dtype])


def sketch_case(D: int, H: int, g: int, L: int, Tc: int, Ne: int, dtype, device, seed: int = 0,
                value_bits: int = 2, center: bool = False) -> Case:
    """A qjl-mode layer's attention: random keys and values through QJLKeys (per-head 4-bit outliers) and
    QuantValues."""
    from .config import QJLConfig
    from .keys import QJLKeys
    from .values import QuantValues

    gen = torch.Generator().manual_seed(seed)
    cfg = QJLConfig(kv="qjl", value_bits=value_bits, center_keys=center)
    keys, values = QJLKeys.for_layer(cfg, 0, D).to(device), QuantValues.for_layer(cfg, 0, D).to(device)
    k = torch.randn(1, H, Tc, D, generator=gen) * (1 + 3 * (torch.rand(D, generator=gen) > 0.9))
    v = torch.randn(1, H, Tc, D, generator=gen)
    q = torch.randn(1, H * g, L, D, generator=gen).to(device, dtype)
    with torch_only():
        state = keys.encode(k.to(device)) | values.encode(v.to(device))
    a = keys.op_args(state) | values.op_args(state)
    ek, ev = _exact_parts_for(H, Ne, L, D, dtype, device, gen)
    full = (q, ek, ev, a["signs"], a["key_norms"], a["projection"], a["sketch_scale"], a["channels"],
            a["outlier_values"], a["outlier_scales"], a["outlier_mins"], a["outlier_index"], a["outlier_bits"],
            a["group_size"], a["key_mean"], a["value_codes"], a["value_scales"], a["value_mins"], a["value_bits"],
            a["value_group"], D ** -0.5)
    shape = f"D{D} H{H} g{g} L{L} T{Tc}+{Ne} V{value_bits}{' centred' if center else ''}"
    return Case("qjl::sketch_attention", shape, str(dtype).replace("torch.", ""), full, _rel_err,
                ATTENTION_TOL[dtype])


def encode_cases(D: int, rows: int, device, seed: int = 0) -> list[Case]:
    """The encode ops on `rows` random vectors of D numbers."""
    from .codebooks import codebook_on, rotation, split_bits, vq4_on

    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(2, rows // 2, D, generator=gen) * 3).to(device)
    out = []
    rot = rotation(D, 5).to(device)
    for bits, vq in ((3, False), (2.5, False), (2, True)):
        parts = split_bits(bits, D)
        books = [codebook_on(b, D, str(torch.device(device))) for b, _, _ in parts]
        args = (x, rot, [b for b, _, _ in parts], [e - a for _, a, e in parts], [c for c, _ in books],
                [bd for _, bd in books], vq4_on(D, str(torch.device(device))) if vq else None)
        out.append(Case("qjl::turbo_encode", f"{rows}x{D} {'vq4' if vq else f'{bits}-bit'}", "float32", args,
                        _encode_err, 1e-3))
    y = torch.randn(rows, D, generator=gen).to(device) / D ** 0.5
    c3, b3 = codebook_on(3, D, str(torch.device(device)))
    out.append(Case("qjl::scalar_quantize", f"{rows}x{D} 3-bit", "float32", (y, b3, 3), _mismatch, 0.0))
    # vq: ties between two codebook points can break either way in float32: allow 1 in 1000 bytes to differ.
    out.append(Case("qjl::vq_nearest", f"{rows}x{D}", "float32", (y, vq4_on(D, str(torch.device(device)))),
                    _mismatch, 1e-3))
    v = torch.randn(1, 2, rows // 2, D, generator=gen).to(device)
    out.append(Case("qjl::int_quantize", f"{rows}x{D} 2-bit/64", "float32", (v, 2, min(64, D)), _int_err, 0.0))
    out.append(Case("qjl::int_quantize", f"{rows}x32 4-bit/32", "float32",
                    (torch.randn(1, 2, rows // 2, 32, generator=gen).to(device), 4, 32), _int_err, 0.0))
    for dt in FLOAT_TYPES:
        s = torch.randn(rows, 2 * D, generator=gen).to(device, dt)
        out.append(Case("qjl::sign_bits", f"{rows}x{2 * D}", str(dt).replace("torch.", ""), (s,), _mismatch, 0.0))
    return out


def cases(which: str = "check", device="cuda") -> list[Case]:
    """The comparisons of the self-test ("self-test": small, every op and dtype) or of `qjl kernels check`
    ("check": a Llama-3.1-8B layer at 4k tokens too)."""
    out = []
    for D in HEAD_DIMS:
        for dt in FLOAT_TYPES:
            out.append(turbo_case(D, 2, 4, 1, 96, 9, dt, device, seed=D))
            out.append(sketch_case(D, 2, 4, 1, 96, 9, dt, device, seed=D + 1))
        out.append(turbo_case(D, 2, 3, 5, 64, 21, torch.bfloat16, device, seed=D + 2))
        out.append(turbo_case(D, 1, 1, 1, 37, 3, torch.float16, device, seed=D + 3, value_bits=3, outliers=False))
        out.append(turbo_case(D, 2, 8, 1, 64, 5, torch.float32, device, seed=D + 4, value_bits=4))
        out.append(sketch_case(D, 2, 3, 4, 64, 70, torch.bfloat16, device, seed=D + 5, value_bits=4, center=True))
        out += encode_cases(D, 64, device, seed=D)
    if which == "check":
        out.append(turbo_case(128, 8, 4, 1, 4096, 36, torch.bfloat16, device, seed=7))
        out.append(turbo_case(128, 8, 4, 64, 4096, 600, torch.bfloat16, device, seed=8))
        out.append(sketch_case(128, 8, 4, 1, 4096, 100, torch.bfloat16, device, seed=9))
        out += encode_cases(128, 8 * 4096, device, seed=10)
    return out


def _time_ms(fn: Callable, reps: int = 20) -> float:
    """The median of `reps` timed calls (CUDA events when on a GPU), after two warm-ups."""
    for _ in range(2):
        fn()
    if not torch.cuda.is_available():
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(ts)
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    return statistics.median(ts)


def parity(case_list: list[Case], timing: bool = True, kernels: Optional[dict] = None) -> list[ParityRow]:
    """Each case's kernel output against the op's torch implementation: a row per case. `kernels` maps op
    names to implementations (default: the CUDA ones registered above)."""
    impls = kernels or {name: impl for name, (_, impl) in _ops().items()}
    rows = []
    for c in case_list:
        def run_kernel(c=c):
            return impls[c.op](*c.args)

        def run_torch(c=c):
            with torch_only():
                return TORCH_IMPL[c.op](*c.args)

        got, ref = run_kernel(), run_torch()
        err = c.compare(got, ref)
        row = ParityRow(c.op, c.shape, c.dtype, err, c.tol, bool(err <= c.tol))
        if timing:
            row.kernel_ms, row.torch_ms = _time_ms(run_kernel), _time_ms(run_torch)
        rows.append(row)
    return rows


def check() -> list[ParityRow]:
    """`qjl kernels check`: build (or load), then the parity table of every op with timings. Raises
    KernelError without CUDA, with QJL_KERNELS=0, or when the build fails."""
    if not enabled():
        raise KernelError(f"{ENV}=0: the kernels are switched off")
    if not torch.cuda.is_available():
        raise KernelError("no CUDA device: the kernels are for NVIDIA GPUs; the torch ops serve this machine")
    with _lock:
        if _state["status"] != "loaded":
            _state.update(status="loaded", module=build(), reason="")
    return parity(cases("check"))


def format_table(rows: list[ParityRow]) -> str:
    """The parity table as aligned text, one row per comparison and a summary line."""
    head = ("op", "shape", "dtype", "max err", "tol", "ok", "kernel ms", "torch ms", "speedup")
    body = [(r.op.replace("qjl::", ""), r.shape, r.dtype, f"{r.max_err:.2e}", f"{r.tol:.0e}" if r.tol else "0",
             "pass" if r.ok else "FAIL", "-" if r.kernel_ms is None else f"{r.kernel_ms:.3f}",
             "-" if r.torch_ms is None else f"{r.torch_ms:.3f}",
             "-" if r.speedup is None else f"{r.speedup:.1f}x") for r in rows]
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
    lines = ["  ".join(x[i].ljust(widths[i]) for i in range(len(head))).rstrip() for x in [head, *body]]
    failed = sum(not r.ok for r in rows)
    lines.append(f"{len(rows) - failed} of {len(rows)} pass" + (f"; {failed} FAIL" if failed else ""))
    return "\n".join(lines)
