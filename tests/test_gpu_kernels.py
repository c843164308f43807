"""The CUDA kernels (csrc/, qjl/kernels.py) against the torch ops they implement. Skipped without CUDA.

Tolerances (max |kernel - torch| / max |torch|, qjl.kernels.ATTENTION_TOL): attention 1e-4 for float32
queries, 4e-3 for float16, 2e-2 for bfloat16 (the kernels sum in float32 in another order; a 16-bit output
rounds once more). Packed codes are bit-exact (sign_bits, scalar_quantize, int_quantize, turbo_encode's scalar
codes); vq_nearest may break a float32 tie the other way in at most 1 of 1000 bytes; turbo_encode's fp16
scales within 1e-3.

Under compute-sanitizer (no GPU test needs it, but csrc/gpu_check.sh runs the self-test cases under
`compute-sanitizer --tool memcheck` with the caching allocator off).
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch

import qjl.kernels as K
from test_gpu import _model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
GQA = [1, 3, 4, 8]


@pytest.fixture(scope="module", autouse=True)
def loaded():
    K.reset()
    if os.environ.get(K.ENV, "1") == "0":
        pytest.skip("QJL_KERNELS=0")
    module = K.ensure_loaded()
    if module is None:
        pytest.fail(f"the kernels did not load: {K.status()['reason']}")
    return module


def _one(case: K.Case) -> K.ParityRow:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a supported configuration never falls back
        (row,) = K.parity([case], timing=False)
    assert row.ok, f"{row.op} {row.shape} {row.dtype}: error {row.max_err:.3g} > {row.tol:.3g}"
    return row


# --- attention ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("g", GQA)
@pytest.mark.parametrize("D", [64, 128])
def test_turbo_decode(D, g, dtype):
    _one(K.turbo_case(D, 2, g, 1, 32 * 17, 37, dtype, "cuda", seed=D * g))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("g", GQA)
@pytest.mark.parametrize("D", [64, 128])
def test_turbo_chunk(D, g, dtype):
    _one(K.turbo_case(D, 2, g, 7, 32 * 9, 45, dtype, "cuda", seed=D * g + 1))


@pytest.mark.parametrize("value_bits", [2, 3, 4])
@pytest.mark.parametrize("outliers", [True, False])
@pytest.mark.parametrize("D", [64, 128])
def test_turbo_value_widths_and_no_outliers(D, value_bits, outliers):
    Tc = 32 * 11 if outliers else 333  # without outlier groups any token count
    _one(K.turbo_case(D, 3, 4, 1, Tc, 5, torch.bfloat16, "cuda", seed=value_bits, value_bits=value_bits,
                      outliers=outliers))


@pytest.mark.parametrize("L", [1, 3, 33])
def test_turbo_long_and_short(L):
    _one(K.turbo_case(128, 8, 4, L, 32 * 130, 31 + L, torch.bfloat16, "cuda", seed=L))
    _one(K.turbo_case(128, 2, 4, L, 32, L, torch.float16, "cuda", seed=L + 1))  # one group, only the queries exact


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("g", GQA)
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("L", [1, 5])
def test_sketch(D, g, dtype, L):
    _one(K.sketch_case(D, 2, g, L, 32 * 13, 37 + L, dtype, "cuda", seed=D * g + L))


@pytest.mark.parametrize("value_bits", [2, 4])
@pytest.mark.parametrize("center", [False, True])
def test_sketch_value_widths_and_mean(value_bits, center):
    _one(K.sketch_case(128, 4, 4, 1, 32 * 40, 70, torch.bfloat16, "cuda", seed=value_bits, value_bits=value_bits,
                       center=center))


def test_attention_repeats_within_rounding():
    """Twice on the same inputs: the shared-memory atomics may add in another order, never more than rounding."""
    case = K.turbo_case(128, 8, 4, 1, 32 * 64, 40, torch.float32, "cuda", seed=11)
    a, b = K.turbo_attention_cuda(*case.args), K.turbo_attention_cuda(*case.args)
    assert ((a - b).abs().max() / a.abs().max()).item() < 1e-6


def test_unsupported_configuration_falls_back_with_one_warning():
    case = K.turbo_case(64, 2, 2, 1, 64, 5, torch.float16, "cuda")
    args = list(case.args)
    args[4] = [3]
    q96 = torch.randn(1, 4, 1, 96, device="cuda", dtype=torch.float16)
    reason = K.check_turbo_attention(*([q96] + args[1:]))
    assert reason == "head_dim 96 (kernels: 64, 128)"
    K.reset()
    K.ensure_loaded()
    with pytest.warns(RuntimeWarning, match="no CUDA kernel for qjl::sketch_attention with 8-bit values") as rec:
        c = K.sketch_case(64, 2, 2, 1, 64, 5, torch.float16, "cuda", value_bits=8)
        for _ in range(3):
            out = K.sketch_attention_cuda(*c.args)
    assert len([r for r in rec if "no CUDA kernel" in str(r.message)]) == 1
    with K.torch_only():
        ref = K.TORCH_IMPL[c.op](*c.args)
    assert torch.equal(out, ref)


def test_bad_inputs_raise_before_any_launch():
    case = K.turbo_case(64, 2, 2, 1, 64, 5, torch.float16, "cuda")
    args = list(case.args)
    args[6] = args[6].cpu()  # key_norms on the CPU
    with pytest.raises(ValueError, match="key_norms is on cpu"):
        K.turbo_attention_cuda(*args)
    args = list(case.args)
    args[6] = args[6].float()
    with pytest.raises(TypeError, match="key_norms must be float16"):
        K.turbo_attention_cuda(*args)
    torch.cuda.synchronize()  # nothing was launched that could have failed


# --- encode -----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rows", [2, 66, 1002])
@pytest.mark.parametrize("D", [64, 128])
def test_encode_ops(D, rows):
    for case in K.encode_cases(D, rows, "cuda", seed=rows + D):
        _one(case)


def test_sign_bits_odd_sizes():
    for shape in [(8,), (3, 40), (2, 3, 1000)]:
        x = torch.randn(*shape, device="cuda")
        assert torch.equal(K.sign_bits_cuda(x), K.TORCH_IMPL["qjl::sign_bits"](x))
    x = torch.randn(5, 64, device="cuda")[:, ::2]  # non-contiguous: made contiguous first
    assert torch.equal(K.sign_bits_cuda(x), K.TORCH_IMPL["qjl::sign_bits"](x))


# --- a tiny random Llama: greedy tokens with and without the kernels --------------------------------------------------
@torch.no_grad()
def _greedy(model, cfg, ids, kv, steps=24):
    from qjl.cache import QJLCache
    from qjl.config import QJLConfig

    cache = QJLCache(cfg, QJLConfig(kv=kv))
    model(ids[:, :-8], past_key_values=cache)
    cache.freeze_document()
    logits = model(ids[:, -8:], past_key_values=cache).logits[:, -1]
    out = []
    for _ in range(steps):
        nxt = logits.argmax(-1, keepdim=True)
        out.append(int(nxt))
        logits = model(nxt, past_key_values=cache).logits[:, -1]
    return out


@pytest.mark.parametrize("kv", ["turbo", "qjl"])
@pytest.mark.parametrize("head_dim,heads,kv_heads", [(64, 8, 2), (128, 6, 2)])
def test_greedy_tokens_equal_with_and_without_kernels(kv, head_dim, heads, kv_heads, monkeypatch):
    model, cfg = _model(head_dim, heads, kv_heads)  # test_gpu.py's tiny Llama, q/k scaled so keys matter
    model = model.cuda()
    ids = torch.randint(0, 256, (1, 900), generator=torch.Generator().manual_seed(1)).cuda()
    with_kernels = _greedy(model, cfg, ids, kv)
    monkeypatch.setenv(K.ENV, "0")
    without = _greedy(model, cfg, ids, kv)
    assert with_kernels == without
