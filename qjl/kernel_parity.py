"""Parity of the CUDA kernels with the torch ops: the self-test after a build, `qjl kernels check`, and the
GPU tests' grid (tests/test_gpu_kernels.py)."""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from . import kernels as _k
from .ops import attention as _attention
from .ops import encode as _encode

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


def _pair_encode_err(a, b) -> float:
    """turbo_encode with a pair codebook: the fraction of pair indices that differ (one index spans 2 codes and
    up to 2 bytes: counting bytes would double a tie's weight), or the scales' relative error if worse."""
    from .ops import pair_index

    if len(a[0]) != 1 or len(b[0]) != 1 or a[0][0].shape != b[0][0].shape:
        return 1.0
    return max(_mismatch(pair_index(a[0][0]), pair_index(b[0][0])), _rel_err(a[1], b[1]))


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
               value_bits: float = 2.25, outliers: bool = True, norm_bits: int = 8,
               key_codebook: str = "vq2") -> Case:
    """A turbo layer's attention: random keys and values through the real codecs (qjl/turbo.py). The defaults
    are the default layout (cache format 5): 3-bit keys of the [64, 2] pair codebook, 9-bit vq4 values of 512
    points, 8-bit norms (Tc whole groups of 32); key_codebook="scalar", value_bits=2, norm_bits=16 is the layout
    before it (Lloyd-Max keys, one vq4 byte per 4 numbers, fp16 norms)."""
    from .config import QJLConfig
    from .turbo import TurboKeys, TurboValues

    gen = torch.Generator().manual_seed(seed)
    cfg = QJLConfig(turbo_value_bits=value_bits, turbo_outlier_fraction=0.125 if outliers else 0.0,
                    turbo_norm_bits=norm_bits, turbo_key_codebook=key_codebook)
    keys, values = TurboKeys.for_layer(cfg, 0, D).to(device), TurboValues.for_layer(cfg, 0, D).to(device)
    k = torch.randn(1, H, Tc, D, generator=gen) * (1 + 3 * (torch.rand(D, generator=gen) > 0.9))
    v = torch.randn(1, H, Tc, D, generator=gen)
    q = (torch.randn(1, H * g, L, D, generator=gen) * (1 + 3 * (torch.rand(D, generator=gen) > 0.9))).to(device, dtype)
    with _k.torch_only():
        state = keys.encode(k.to(device), q.float().pow(2).reshape(1, H, -1, D).mean(2)) | values.encode(v.to(device))
    args = keys.op_args(state) | values.op_args(state)
    ek, ev = _exact_parts_for(H, Ne, L, D, dtype, device, gen)
    full = (q, ek, ev, args["key_codes"], args["key_bits"], args["key_centroids"], args["key_norms"],
            args["key_norm_steps"], args["key_rotation"], args["channels"], args["rest"], args["outlier_values"],
            args["outlier_scales"], args["outlier_mins"], args["outlier_bits"], args["group_size"],
            args["residual_signs"], args["residual_norms"], args["residual_projection"], args["residual_scale"],
            args["value_codes"], args["value_bits"], args["value_tables"], args["value_norms"],
            args["value_norm_steps"], args["value_rotation"], D ** -0.5)
    shape = (f"D{D} H{H} g{g} L{L} T{Tc}+{Ne} K{key_codebook} V{value_bits} N{norm_bits}"
             f"{'' if outliers else ' r0'}")
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
    with _k.torch_only():
        state = keys.encode(k.to(device)) | values.encode(v.to(device))
    a = keys.op_args(state) | values.op_args(state)
    ek, ev = _exact_parts_for(H, Ne, L, D, dtype, device, gen)
    full = (q, ek, ev, a["signs"], a["key_norms"], a["projection"], a["sketch_scale"], a["channels"],
            a["outlier_values"], a["outlier_scales"], a["outlier_mins"], a["outlier_index"], a["outlier_bits"],
            a["group_size"], a["key_mean"], a["sketch_variance"], a["value_codes"], a["value_scales"],
            a["value_mins"], a["value_bits"], a["value_group"], D ** -0.5)
    shape = f"D{D} H{H} g{g} L{L} T{Tc}+{Ne} V{value_bits}{' centred' if center else ''}"
    return Case("qjl::sketch_attention", shape, str(dtype).replace("torch.", ""), full, _rel_err,
                ATTENTION_TOL[dtype])


def encode_cases(D: int, rows: int, device, seed: int = 0) -> list[Case]:
    """The encode ops on `rows` random vectors of D numbers."""
    from .codebooks import codebook_on, pair_codebook_on, rotation, split_bits, vq4_on

    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(2, rows // 2, D, generator=gen) * 3).to(device)
    out = []
    rot = rotation(D, 5).to(device)
    dev = str(torch.device(device))
    # (bits, points of the 4-D codebook or 0 for Lloyd-Max): 512 points give 9-bit packed codes
    for bits, points in ((3, 0), (2.5, 0), (2, 256), (2.25, 512)):
        parts = split_bits(bits, D)
        books = [codebook_on(b, D, dev) for b, _, _ in parts]
        args = (x, rot, [b for b, _, _ in parts], [e - a for _, a, e in parts], [c for c, _ in books],
                [bd for _, bd in books], vq4_on(D, dev, points) if points else None)
        out.append(Case("qjl::turbo_encode", f"{rows}x{D} {f'vq4/{points}' if points else f'{bits}-bit'}", "float32",
                        args, _encode_err, 1e-3))
        if points == 512:  # the default scales 1 / <y, y_hat> (turbo_unbiased_values, _keys)
            out.append(Case("qjl::turbo_encode", f"{rows}x{D} vq4/512 unbiased", "float32", args + (True,),
                            _encode_err, 1e-3))
        if bits == 3:  # the default keys: each pair of coordinates the nearest of the [64, 2] codebook
            pair = args[:-1] + (pair_codebook_on(D, dev),)
            out.append(Case("qjl::turbo_encode", f"{rows}x{D} vq2/64", "float32", pair, _pair_encode_err, 1e-3))
    y = torch.randn(rows, D, generator=gen).to(device) / D ** 0.5
    c3, b3 = codebook_on(3, D, dev)
    out.append(Case("qjl::scalar_quantize", f"{rows}x{D} 3-bit", "float32", (y, b3, 3), _mismatch, 0.0))
    # vq: ties between two codebook points can break either way in float32: allow 1 in 1000 codes to differ.
    for points in (256, 512):  # uint8 codes, int16 codes
        out.append(Case("qjl::vq_nearest", f"{rows}x{D} {points}", "float32", (y, vq4_on(D, dev, points)),
                        _mismatch, 1e-3))
    out.append(Case("qjl::vq_nearest", f"{rows}x{D} 64x2", "float32", (y, pair_codebook_on(D, dev)), _mismatch,
                    1e-3))  # the pair codebook: uint8 indices [rows, D/2]
    v = torch.randn(1, 2, rows // 2, D, generator=gen).to(device)
    out.append(Case("qjl::int_quantize", f"{rows}x{D} 2-bit/64", "float32", (v, 2, min(64, D)), _int_err, 0.0))
    # the fit sums in another order than torch: a rare code or fp16 rounding may differ (1 in 1,000 allowed)
    out.append(Case("qjl::int_quantize", f"{rows}x{D} 2-bit/64 fit", "float32", (v, 2, min(64, D), True), _int_err,
                    1e-3))
    out.append(Case("qjl::int_quantize", f"{rows}x32 4-bit/32", "float32",
                    (torch.randn(1, 2, rows // 2, 32, generator=gen).to(device), 4, 32), _int_err, 0.0))
    for dt in _k.FLOAT_TYPES:
        s = torch.randn(rows, 2 * D, generator=gen).to(device, dt)
        out.append(Case("qjl::sign_bits", f"{rows}x{2 * D}", str(dt).replace("torch.", ""), (s,), _mismatch, 0.0))
    return out


def cases(which: str = "check", device="cuda") -> list[Case]:
    """The comparisons of the self-test ("self-test": small, every op and dtype) or of `qjl kernels check`
    ("check": a Llama-3.1-8B layer at 4k tokens too)."""
    out = []
    for D in _k.HEAD_DIMS:
        for dt in _k.FLOAT_TYPES:  # the default layout: pair-codebook keys, 9-bit values, 8-bit norms
            out.append(turbo_case(D, 2, 4, 1, 96, 9, dt, device, seed=D))
            out.append(sketch_case(D, 2, 4, 1, 96, 9, dt, device, seed=D + 1))
        # the layout before format 5 (Lloyd-Max keys, vq4 bytes, fp16 norms), Lloyd-Max keys with the default
        # values, and the other value widths, fp16 and 8-bit norms across them
        out.append(turbo_case(D, 2, 3, 5, 64, 21, torch.bfloat16, device, seed=D + 2, value_bits=2, norm_bits=16,
                              key_codebook="scalar"))
        out.append(turbo_case(D, 2, 4, 1, 64, 9, torch.float32, device, seed=D + 8, key_codebook="scalar"))
        out.append(turbo_case(D, 1, 1, 1, 37, 3, torch.float16, device, seed=D + 3, value_bits=3, outliers=False,
                              norm_bits=16))
        out.append(turbo_case(D, 2, 8, 1, 64, 5, torch.float32, device, seed=D + 4, value_bits=4))
        out.append(turbo_case(D, 2, 2, 1, 64, 7, torch.float16, device, seed=D + 6, value_bits=2))
        out.append(turbo_case(D, 1, 2, 3, 45, 5, torch.bfloat16, device, seed=D + 7, outliers=False, norm_bits=16))
        out.append(sketch_case(D, 2, 3, 4, 64, 70, torch.bfloat16, device, seed=D + 5, value_bits=4, center=True))
        out += encode_cases(D, 64, device, seed=D)
    if which == "check":
        out.append(turbo_case(128, 8, 4, 1, 4096, 36, torch.bfloat16, device, seed=7))
        out.append(turbo_case(128, 8, 4, 1, 4096, 36, torch.bfloat16, device, seed=7, value_bits=2, norm_bits=16,
                              key_codebook="scalar"))
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
    for _ in range(reps):  # CUDA events around each call
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        ts.append(start.elapsed_time(end))
    return statistics.median(ts)


def parity(case_list: list[Case], timing: bool = True, kernels: Optional[dict] = None) -> list[ParityRow]:
    """Each case's kernel output against the op's torch implementation: a row per case. `kernels` maps op
    names to implementations (default: the CUDA ones registered above)."""
    impls = kernels or {name: impl for name, (_, impl) in _k._ops().items()}
    rows = []
    for c in case_list:
        def run_kernel(c=c):
            return impls[c.op](*c.args)

        def run_torch(c=c):
            with _k.torch_only():
                return _k.TORCH_IMPL[c.op](*c.args)

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
    if not _k.enabled():
        raise _k.KernelError(f"{_k.ENV}=0: the kernels are switched off")
    if not torch.cuda.is_available():
        raise _k.KernelError("no CUDA device: the kernels are for NVIDIA GPUs; the torch ops serve this machine")
    with _k._lock:
        if _k._state["status"] != "loaded":
            _k._state.update(status="loaded", module=_k.build(), reason="")
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
