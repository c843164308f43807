"""CUDA kernels beneath the ops layer: build on first use, self-test, dispatch, fall back to torch.

`import qjl.kernels` registers a CUDA implementation under each op below (torch.library.register_kernel):

  qjl::turbo_attention   fused split-K attention, --kv turbo (3-bit keys, Lloyd-Max or of the 2-D pair
                         codebook; 2/3/4-bit or vq4 values of 256 or 512 points; fp16 or 8-bit norms)
  qjl::sketch_attention  fused split-K attention, --kv qjl (sign sketches, 2/4-bit integer values)
  qjl::turbo_encode      rotation (cuBLAS, as the torch op), Lloyd-Max, vq4 (9-bit packed for 512 points) or
                         pair codes (the [64, 2] codebook as 3-bit codes), the least-squares or unbiased scale
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
from .ops import dense

ENV = "QJL_KERNELS"
CSRC = Path(__file__).resolve().parent.parent / "csrc"
FLOAT_TYPES = (torch.float16, torch.bfloat16, torch.float32)
HEAD_DIMS = (64, 128)
# Value kinds of the turbo kernel (csrc/attention.cu ValKind): (bits, table shape) -> kind.
_TURBO_VALUES = {(2, (256, 4)): 0, (4, (256, 2)): 1, (3, (8, 1)): 2, (9, (512, 4)): 4}
# Key centroids the turbo kernel takes for 3-bit keys: 8 Lloyd-Max centroids, or the [64, 2] pair codebook
# (qjl.codebooks.pair_codebook_on: each 6-bit pair index of the packed codes names one point).
_TURBO_KEYS = {(8,): "scalar", (64, 2): "pair"}
MAX_CODEBOOK = 512  # points of a 4-D vq codebook the code kernel takes (9-bit indices)
MAX_PAIR_CODEBOOK = 64  # points of a 2-D (pair) codebook: 6-bit indices, written as two 3-bit codes
MAX_OUTLIERS = 64


class KernelError(QJLError, RuntimeError):
    """The CUDA kernels cannot be built or used as asked (no CUDA device, no compiler, a failed self-test)."""


# --- state ---------------------------------------------------------------------------------------------------
_lock = threading.RLock()
_local = threading.local()
_state: dict = {"status": "untried", "reason": "", "module": None, "build": None}  # untried|off|loaded|failed
_warned: set = set()
LONG_CHUNK_OPS = ("qjl::turbo_attention", "qjl::sketch_attention")  # chunks of >= dense.MIN_ROWS queries
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


# --- the CUDA implementations --------------------------------------------------------------------------------
def _dispatch(name: str, args: tuple, check: Callable, launch: Callable):
    """The kernel when it is ready and covers args (check -> None), else the torch op (with one warning)."""
    torch_impl = TORCH_IMPL[name]
    if not _ready():
        return torch_impl(*args)
    if name in LONG_CHUNK_OPS and args[0].shape[2] >= dense.MIN_ROWS:  # by design: decoded K/V + SDPA
        return torch_impl(*args)
    reason = check(*args)
    if reason is None:
        try:
            return launch()
        except RuntimeError as e:
            reason = _unsupported(e)
            if reason is None:
                raise
    fallback(name, reason)
    return torch_impl(*args)


def turbo_attention_cuda(q, exact_k, exact_v, key_codes, key_bits, key_centroids, key_norms, key_norm_steps,
                         key_rotation, channels, rest, outlier_values, outlier_scales, outlier_mins, outlier_bits,
                         group_size, residual_signs, residual_norms, residual_projection, residual_scale, value_codes,
                         value_bits, value_tables, value_norms, value_norm_steps, value_rotation, scaling):
    args = (q, exact_k, exact_v, key_codes, key_bits, key_centroids, key_norms, key_norm_steps, key_rotation,
            channels, rest, outlier_values, outlier_scales, outlier_mins, outlier_bits, group_size, residual_signs,
            residual_norms, residual_projection, residual_scale, value_codes, value_bits, value_tables, value_norms,
            value_norm_steps, value_rotation, scaling)

    def launch():
        table = value_tables[0]
        return _module().turbo_attention(
            q, _exact_parts(q, exact_k), _exact_parts(q, exact_v), key_codes[0],
            key_centroids[0].float().contiguous(), key_norms, key_norm_steps, key_rotation.float().contiguous(),
            channels, rest, outlier_values, outlier_scales, outlier_mins, int(outlier_bits), int(group_size),
            value_codes[0], _TURBO_VALUES[(value_bits[0], tuple(table.shape))],
            table.float().reshape(-1).contiguous(), value_norms, value_norm_steps,
            value_rotation.float().contiguous(), float(scaling))

    return _dispatch("qjl::turbo_attention", args, check_turbo_attention, launch)


def sketch_attention_cuda(q, exact_k, exact_v, signs, key_norms, projection, sketch_scale, channels, outlier_values,
                          outlier_scales, outlier_mins, outlier_index, outlier_bits, group_size, key_mean,
                          sketch_variance, value_codes, value_scales, value_mins, value_bits, value_group, scaling):
    args = (q, exact_k, exact_v, signs, key_norms, projection, sketch_scale, channels, outlier_values, outlier_scales,
            outlier_mins, outlier_index, outlier_bits, group_size, key_mean, sketch_variance, value_codes,
            value_scales, value_mins, value_bits, value_group, scaling)

    def launch():
        return _module().sketch_attention(
            q, _exact_parts(q, exact_k), _exact_parts(q, exact_v), signs, key_norms,
            projection.float().contiguous(), float(sketch_scale), channels, outlier_values, outlier_scales,
            outlier_mins, int(outlier_bits), int(group_size), key_mean, float(sketch_variance), value_codes,
            value_scales, value_mins, int(value_bits), int(value_group), float(scaling))

    return _dispatch("qjl::sketch_attention", args, check_sketch_attention, launch)


def turbo_encode_cuda(x, rotation, bits, lengths, centroids, boundaries, vq_codebook, unbiased=False):
    args = (x, rotation, bits, lengths, centroids, boundaries, vq_codebook, unbiased)
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
        reason = check_codes(y, bits, lengths, vq_codebook, packed=True)
        if reason is None:
            book = None if vq_codebook is None else vq_codebook.float().contiguous()
            packed, fit = _module().encode_codes(y, list(bits), list(lengths),
                                                 [b.float().contiguous() for b in boundaries],
                                                 [c.float().contiguous() for c in centroids], book, True, True,
                                                 bool(unbiased))
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
                                           [boundaries.float().contiguous()], [], None, False, False, False)
        return packed[0]
    fallback("qjl::scalar_quantize", reason)
    return torch_impl(y, boundaries, bits)


def vq_nearest_cuda(y, codebook):
    torch_impl = TORCH_IMPL["qjl::vq_nearest"]
    if not _ready():
        return torch_impl(y, codebook)
    reason = check_codes(y, [], [], codebook)
    if reason is None:
        # int16 codes for more than 256 points, as the torch op returns them (uint8 for a pair codebook)
        packed, _ = _module().encode_codes(y.contiguous(), [], [], [], [], codebook.float().contiguous(), False,
                                           False, False)
        return packed[0]
    fallback("qjl::vq_nearest", reason)
    return torch_impl(y, codebook)


def int_quantize_cuda(v, bits, group, fit=False):
    torch_impl = TORCH_IMPL["qjl::int_quantize"]
    if not _ready():
        return torch_impl(v, bits, group, fit)
    _tensors_on("cuda", {"v": v})
    reason = None
    if v.dim() != 4:
        reason = f"a {v.dim()}-d input (kernels: [B, H, T, D])"
    elif bits not in (1, 2, 4, 8) or v.shape[-1] % group or group * bits % 8:
        reason = f"{bits}-bit codes in groups of {group} of {v.shape[-1]} channels"
    if reason is None:
        return tuple(_module().int_quantize(v.float().contiguous(), int(bits), int(group), bool(fit)))
    fallback("qjl::int_quantize", reason)
    return torch_impl(v, bits, group, fit)


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


from .kernel_checks import (_dtype, _exact_parts, _non_contiguous, _tensors_on, _unsupported,  # noqa: E402,F401
                            check_codes, check_sketch_attention, check_turbo_attention)
from .kernel_parity import (ATTENTION_TOL, Case, ParityRow, cases, check, encode_cases, format_table,  # noqa: E402,F401
                            parity, sketch_case, turbo_case)
