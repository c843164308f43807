"""CPU kernels of the ops (qjl_cpu.c, qjl_cpu_sketch.c, sharing qjl_cpu.h): built with the system's C compiler at
first use, called through ctypes.

`register()` puts them beneath the ops `qjl::turbo_attention`, `qjl::sketch_attention` (its wrapper in
sketch.py), `qjl::vq_nearest` and `qjl::pack_codes` for CPU tensors (qjl/ops stays the specification;
tests/test_native.py and tests/test_native_sketch.py hold the two together). The shared library is compiled once
per source, compiler and CPU into QJL_HOME/native/ (about a second) and reused. Where there is no compiler,
or it fails, or QJL_NATIVE=0, the ops keep their torch code and one warning says why. Configurations the
kernels do not cover (turbo's fp16 outlier channels, the residual sketch, long query chunks) go to the
torch code too, without a warning: that is the kernel's scope, not a failure.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

from ..ops import attention as attention_ops
from ..ops import codes as codes_ops
from ..ops import encode as encode_ops
from .cargs import Pointers, threads
from .sketch import sketch_attention_cpu

HERE = Path(__file__).parent
SOURCES = [HERE / "qjl_cpu.c", HERE / "qjl_cpu_sketch.c"]  # compiled together; qjl_cpu.h is included by both
HEADER = HERE / "qjl_cpu.h"
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=gnu11"]
MAX_PARTS = 2
# Query rows (GQA group x chunk) the kernel takes: decode steps and question chunks up to the dense path's 64
# queries (qjl/ops/dense.py) at GQA 4. With the key tables laid out [entry][row] (one look-up adds 8 rows) it
# measured 0.37x the torch code's time at 3 rows and 0.65-0.99x from 12 to 189 rows (one thread, 3 KV heads of
# 64, 4k-8k tokens; BENCHMARKS.md "CPU kernels").
MAX_ROWS = 256
MAX_HEAD_DIM = 512  # the kernel's per-token buffers (qjl_cpu.c compressed_block)
MAX_CHANNELS = 64


class TurboArgs(ctypes.Structure):
    """Mirror of turbo_args in qjl_cpu.c (same order)."""

    P = ctypes.c_void_p
    _fields_ = [(n, ctypes.c_int) for n in ("B", "H", "R", "L", "D", "dim", "T", "Ne")] + [
        ("q", P), ("ke", P), ("ve", P), ("nkp", ctypes.c_int),
        ("kbits", ctypes.c_int * MAX_PARTS), ("knb", ctypes.c_int * MAX_PARTS), ("klen", ctypes.c_int * MAX_PARTS),
        ("kcodes", P * MAX_PARTS), ("kcent", P * MAX_PARTS), ("kpair", ctypes.c_int * MAX_PARTS),
        ("knorms", P), ("kncodes", P), ("knsteps", P),
        ("krot", P),
        ("r", ctypes.c_int), ("channels", P), ("rest", P), ("ocodes", P), ("oscales", P), ("omins", P),
        ("obits", ctypes.c_int), ("G", ctypes.c_int), ("nvp", ctypes.c_int),
        ("vbits", ctypes.c_int * MAX_PARTS), ("vnb", ctypes.c_int * MAX_PARTS), ("vper", ctypes.c_int * MAX_PARTS),
        ("vcodes", P * MAX_PARTS), ("vtab", P * MAX_PARTS), ("vnorms", P), ("vncodes", P), ("vnsteps", P),
        ("NG", ctypes.c_int), ("vrot", P),
        ("scaling", ctypes.c_float), ("out", P)]


def _cache_dir() -> Path:
    from ..models import qjl_home

    return qjl_home() / "native"


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def _key(cc: str) -> str:
    """What the built library depends on: source, compiler, flags, and the CPU (-march=native)."""
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    cpu = platform.machine() + platform.processor()
    try:
        cpu += next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        pass
    texts = [p.read_text() for p in (*SOURCES, HEADER)]
    return hashlib.sha256("\n".join([*texts, version, " ".join(FLAGS), cpu]).encode()).hexdigest()[:16]


def _build(cc: str, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    try:
        run = subprocess.run([cc, *FLAGS, "-o", tmp, *map(str, SOURCES), "-lm"], capture_output=True, text=True,
                             timeout=300)
        if run.returncode:
            raise OSError((run.stderr.strip().splitlines() or ["compiler failed"])[-1])
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@functools.lru_cache(maxsize=1)
def library() -> ctypes.CDLL | None:
    """The compiled kernels, built on first use; None (with one warning) where they cannot be had."""
    if os.environ.get("QJL_NATIVE", "1").strip() == "0":
        return None
    cc = _compiler()
    if cc is None:
        warnings.warn("no C compiler found (cc, gcc or clang): the CPU kernels are off and the torch code runs "
                      "instead (slower); install one (e.g. apt-get install gcc) to use them", stacklevel=2)
        return None
    try:
        dest = _cache_dir() / f"qjl_cpu-{_key(cc)}.so"
        if not dest.is_file():
            _build(cc, dest)
        lib = ctypes.CDLL(str(dest))
    except (OSError, subprocess.SubprocessError) as e:
        warnings.warn(f"the CPU kernels could not be built ({' '.join(str(e).split())[:200]}); the torch code "
                      f"runs instead (slower)", stacklevel=2)
        return None
    lib.qjl_vq_nearest.argtypes = [ctypes.c_int64, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                                   ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
    lib.qjl_turbo_attention.argtypes = [ctypes.POINTER(TurboArgs), ctypes.c_int]
    lib.qjl_sketch_attention.argtypes = [ctypes.c_void_p, ctypes.c_int]  # a SketchArgs (qjl/native/sketch.py)
    lib.qjl_pack_codes.argtypes = [ctypes.c_int64, ctypes.c_int64, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                                   ctypes.c_int]
    return lib


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


# --- vq_nearest --------------------------------------------------------------------------------------
def vq_nearest_cpu(y: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    lib = library()
    c = codebook.shape[1]
    if (lib is None or y.dtype != torch.float32 or codebook.dtype != torch.float32 or codebook.shape[0] > 512
            or c > 8 or y.shape[-1] % c):
        return encode_ops.vq_nearest._init_fn(y, codebook)
    y, cb = y.contiguous(), codebook.contiguous()
    half = (0.5 * (cb * cb).sum(-1)).contiguous()  # as the torch op computes it
    dtype = torch.uint8 if cb.shape[0] <= 256 else torch.int16  # as the torch op
    out = torch.empty(*y.shape[:-1], y.shape[-1] // c, dtype=dtype)
    if lib.qjl_vq_nearest(out.numel(), c, cb.shape[0], _ptr(y), _ptr(cb), _ptr(half), _ptr(out), threads()):
        raise RuntimeError("qjl_vq_nearest refused its arguments")
    return out


# --- pack_codes ----------------------------------------------------------------------------------------
def pack_codes_cpu(codes: torch.Tensor, bits: int) -> torch.Tensor:
    lib = library()
    n = codes.shape[-1] if codes.dim() else 0
    per = 8 if bits == 3 else 8 // bits if bits in (1, 2, 4, 8) else 0
    if lib is None or codes.dtype != torch.uint8 or not per or n % per or codes.numel() == 0:
        return codes_ops.pack_codes._init_fn(codes, bits)
    codes = codes.contiguous()
    out = torch.empty(*codes.shape[:-1], n * bits // 8, dtype=torch.uint8)
    if lib.qjl_pack_codes(codes.numel() // n, n, bits, _ptr(codes), _ptr(out), threads()):
        raise RuntimeError("qjl_pack_codes refused its arguments")
    return out


# --- turbo attention ---------------------------------------------------------------------------------
def _norms_covered(norms, steps, other_steps) -> bool:
    """fp16 scales, or uint8 codes with fp16 steps over the same token groups as the other side's."""
    if steps is None:
        return norms.dtype == torch.float16 and other_steps is None
    return (norms.dtype == torch.uint8 and steps.dtype == torch.float16 and other_steps is not None
            and steps.shape == other_steps.shape and steps.shape[2] > 0 and norms.shape[2] % steps.shape[2] == 0)


def _covered(q, exact_k, key_codes, key_bits, key_centroids, key_norms, key_norm_steps, channels, outlier_bits,
             outlier_scales, residual_projection, value_codes, value_norms, value_norm_steps) -> bool:
    B, Hq, L, D = q.shape
    rows = Hq // exact_k[0].shape[1] * L
    return (residual_projection is None and rows <= MAX_ROWS and D <= MAX_HEAD_DIM and len(key_codes) <= MAX_PARTS
            and all(c.dim() == 1 or (b == 3 and tuple(c.shape) == (64, 2))  # centroids, or a 3-bit pair codebook
                    for b, c in zip(key_bits, key_centroids))
            and (channels is None or channels.shape[-1] <= MAX_CHANNELS)
            and len(value_codes) <= MAX_PARTS and _norms_covered(key_norms, key_norm_steps, value_norm_steps)
            and _norms_covered(value_norms, value_norm_steps, key_norm_steps)
            and (channels is None or (outlier_bits in (2, 4, 8) and outlier_scales.dtype == torch.float16))
            and q.dtype in (torch.float32, torch.float16, torch.bfloat16))


def turbo_attention_cpu(q, exact_k, exact_v, key_codes, key_bits, key_centroids, key_norms, key_norm_steps,
                        key_rotation, channels, rest, outlier_values, outlier_scales, outlier_mins, outlier_bits,
                        group_size, residual_signs, residual_norms, residual_projection, residual_scale, value_codes,
                        value_bits, value_tables, value_norms, value_norm_steps, value_rotation, scaling):
    lib = library()
    if lib is None or not _covered(q, exact_k, key_codes, key_bits, key_centroids, key_norms, key_norm_steps,
                                   channels, outlier_bits, outlier_scales, residual_projection, value_codes,
                                   value_norms, value_norm_steps):
        return attention_ops.turbo_attention._init_fn(
            q, exact_k, exact_v, key_codes, key_bits, key_centroids, key_norms, key_norm_steps, key_rotation,
            channels, rest, outlier_values, outlier_scales, outlier_mins, outlier_bits, group_size, residual_signs,
            residual_norms, residual_projection, residual_scale, value_codes, value_bits, value_tables, value_norms,
            value_norm_steps, value_rotation, scaling)
    B, Hq, L, D = q.shape
    H = exact_k[0].shape[1]
    c = Pointers()  # every tensor handed to C stays referenced until the call returns

    a = TurboArgs(B=B, H=H, R=Hq // H * L, L=L, D=D, dim=key_rotation.shape[0], T=key_norms.shape[2],
                  Ne=sum(t.shape[2] for t in exact_k), nkp=len(key_codes), nvp=len(value_codes),
                  r=0 if channels is None else channels.shape[-1], obits=outlier_bits, G=group_size,
                  scaling=float(scaling))
    a.q = c(q.reshape(B, H, a.R, D), torch.float32)
    a.ke, a.ve = c(attention_ops._exact(exact_k)), c(attention_ops._exact(exact_v))
    for p, (codes, bits, cent) in enumerate(zip(key_codes, key_bits, key_centroids)):
        a.kbits[p], a.knb[p], a.klen[p] = bits, codes.shape[-1], codes.shape[-1] * 8 // bits
        a.kcodes[p], a.kcent[p], a.kpair[p] = c(codes), c(cent, torch.float32), int(cent.dim() == 2)
    if key_norm_steps is None:
        a.knorms, a.vnorms = c(key_norms), c(value_norms)
    else:
        a.kncodes, a.knsteps = c(key_norms), c(key_norm_steps)
        a.vncodes, a.vnsteps = c(value_norms), c(value_norm_steps)
        a.NG = key_norms.shape[2] // key_norm_steps.shape[2]
    a.krot = c(key_rotation, torch.float32)
    if channels is not None:
        a.channels, a.rest = c(channels, torch.int64), c(rest, torch.int64)
        a.ocodes, a.oscales, a.omins = c(outlier_values), c(outlier_scales), c(outlier_mins)
    for p, (codes, bits, table) in enumerate(zip(value_codes, value_bits, value_tables)):
        a.vbits[p], a.vnb[p], a.vper[p] = bits, codes.shape[-1], table.shape[1]
        a.vcodes[p], a.vtab[p] = c(codes), c(table, torch.float32)
    a.vrot = c(value_rotation, torch.float32)
    out = torch.empty(B, H, a.R, D)
    a.out = out.data_ptr()
    if lib.qjl_turbo_attention(ctypes.byref(a), threads()):
        raise RuntimeError("qjl_turbo_attention refused its arguments")
    return out.reshape(B, Hq, L, D).to(q.dtype)


@functools.lru_cache(maxsize=1)
def register() -> None:
    """Put the CPU kernels beneath their ops (idempotent). The library itself is built at the first call."""
    encode_ops.vq_nearest.register_kernel("cpu")(vq_nearest_cpu)
    codes_ops.pack_codes.register_kernel("cpu")(pack_codes_cpu)
    attention_ops.turbo_attention.register_kernel("cpu")(turbo_attention_cpu)
    attention_ops.sketch_attention.register_kernel("cpu")(sketch_attention_cpu)
