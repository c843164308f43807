"""The CUDA kernels (csrc/, qjl/kernels.py) against the torch ops they implement. Skipped without CUDA.

Tolerances (max |kernel - torch| / max |torch|, qjl.kernels.ATTENTION_TOL): attention 1e-4 for float32
queries, 4e-3 for float16, 2e-2 for bfloat16 (the kernels sum in float32 in another order; a 16-bit output
rounds once more). Packed codes are bit-exact (sign_bits, scalar_quantize, int_quantize, turbo_encode's scalar
codes), but int_quantize's `fit` (sums in another order) may differ in 1 of 1000 codes or fp16 roundings;
vq_nearest (4-D and the [64, 2] pair codebook) may break a float32 tie the other way in at most 1 of 1000 codes;
turbo_encode's fp16 scales within 1e-3.

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
# turbo layouts: the default (3-bit keys of the [64, 2] pair codebook, 9-bit vq4 values of 512 points, 8-bit
# norms: cache format 5) and the one before it (Lloyd-Max keys, a vq4 byte per 4 values, fp16 norms)
LAYOUTS = {"v2.25-n8": {}, "v2-n16": {"value_bits": 2, "norm_bits": 16, "key_codebook": "scalar"}}


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
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("g", GQA)
@pytest.mark.parametrize("D", [64, 128])
def test_turbo_decode(D, g, dtype, layout):
    _one(K.turbo_case(D, 2, g, 1, 32 * 17, 37, dtype, "cuda", seed=D * g, **LAYOUTS[layout]))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("g", GQA)
@pytest.mark.parametrize("D", [64, 128])
def test_turbo_chunk(D, g, dtype, layout):
    _one(K.turbo_case(D, 2, g, 7, 32 * 9, 45, dtype, "cuda", seed=D * g + 1, **LAYOUTS[layout]))


@pytest.mark.parametrize("norm_bits", [8, 16])
@pytest.mark.parametrize("value_bits", [2, 2.25, 3, 4])
@pytest.mark.parametrize("outliers", [True, False])
@pytest.mark.parametrize("D", [64, 128])
def test_turbo_value_widths_norms_and_no_outliers(D, value_bits, outliers, norm_bits):
    # 8-bit norms and outlier groups need whole groups of 32 tokens; fp16 norms without outliers any count
    Tc = 333 if norm_bits == 16 and not outliers else 32 * 11
    _one(K.turbo_case(D, 3, 4, 1, Tc, 5, torch.bfloat16, "cuda", seed=int(4 * value_bits), value_bits=value_bits,
                      outliers=outliers, norm_bits=norm_bits))


def test_turbo_9bit_values_reach_every_index():
    """Codes with the ninth bit set in every position of a byte, and indices 0 and 511: the table look-up of
    all 512 points (random values rarely use every one)."""
    case = K.turbo_case(128, 2, 4, 1, 32 * 20, 9, torch.float32, "cuda", seed=5)
    args = list(case.args)
    codes = args[20][0]
    n = 128 // 4
    T = codes.shape[2]
    idx = (torch.arange(2 * T * n, device="cuda").view(1, 2, T, n) * 37) % 512  # every index, ninth bits mixed
    from qjl.ops import pack_codes

    args[20] = [pack_codes(idx.to(torch.int16), 9)]
    assert args[20][0].shape == codes.shape
    _one(K.Case(case.op, case.shape + " all indices", case.dtype, tuple(args), case.compare, case.tol))


@pytest.mark.parametrize("key_codebook", ["vq2", "scalar"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D", [64, 128])
def test_turbo_key_codebooks(D, dtype, key_codebook):
    """Both 3-bit key forms with the default values and norms: the pair table filled from [64, 2] or [8]."""
    _one(K.turbo_case(D, 2, 4, 1, 32 * 13, 21, dtype, "cuda", seed=D + 3, key_codebook=key_codebook))
    _one(K.turbo_case(D, 2, 3, 6, 32 * 5, 17, dtype, "cuda", seed=D + 4, key_codebook=key_codebook))


@pytest.mark.parametrize("key_codebook", ["vq2", "scalar"])
def test_turbo_keys_reach_every_pair_index(key_codebook):
    """Key codes whose 6-bit pair indices take all 64 values in each of the 4 positions of a 24-bit word: every
    entry of the kernel's pair table (random keys rarely use every point in every position)."""
    from qjl.ops import pack_codes

    case = K.turbo_case(128, 2, 4, 1, 32 * 20, 9, torch.float32, "cuda", seed=6, key_codebook=key_codebook)
    args = list(case.args)
    codes = args[3][0]
    B, H, T, nb = codes.shape
    n = nb * 8 // 3  # coded coordinates
    words = torch.arange(B * H * T * n // 8, device="cuda").view(B, H, T, n // 8, 1)
    w = ((words * 29 + 17 * torch.arange(4, device="cuda")) % 64).reshape(B, H, T, n // 2)  # 29 odd: all 64
    args[3] = [pack_codes(torch.stack([w & 7, w >> 3], dim=-1).reshape(B, H, T, n).to(torch.uint8), 3)]
    assert args[3][0].shape == codes.shape
    _one(K.Case(case.op, case.shape + " all pair indices", case.dtype, tuple(args), case.compare, case.tol))


def test_turbo_no_compressed_tokens():
    """Only exact tokens (a layer before its first group is compressed): empty codes, norms and steps."""
    for layout in LAYOUTS.values():
        case = K.turbo_case(64, 2, 4, 1, 32, 12, torch.float16, "cuda", seed=2, **layout)
        args = list(case.args)
        for i in (3, 20):  # key_codes, value_codes
            args[i] = [t[:, :, :0].contiguous() for t in args[i]]
        for i in (6, 7, 11, 12, 13, 23, 24):  # norms, steps, outlier codes/scales/minimums
            if args[i] is not None:
                args[i] = args[i][:, :, :0].contiguous()
        _one(K.Case(case.op, case.shape + " T0", case.dtype, tuple(args), case.compare, case.tol))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("L", [1, 3, 33])
def test_turbo_long_and_short(L, layout):
    _one(K.turbo_case(128, 8, 4, L, 32 * 130, 31 + L, torch.bfloat16, "cuda", seed=L, **LAYOUTS[layout]))
    # one group, only the queries exact
    _one(K.turbo_case(128, 2, 4, L, 32, L, torch.float16, "cuda", seed=L + 1, **LAYOUTS[layout]))


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
    case = K.turbo_case(64, 2, 2, 1, 64, 5, torch.float16, "cuda")  # 8-bit norms: codes [6] and steps [7]
    args = list(case.args)
    args[6] = args[6].cpu()  # key_norms on the CPU
    with pytest.raises(ValueError, match="key_norms is on cpu"):
        K.turbo_attention_cuda(*args)
    args = list(case.args)
    args[6] = args[6].float()
    with pytest.raises(TypeError, match=r"key_norms \(8-bit codes, with key_norm_steps\) must be uint8"):
        K.turbo_attention_cuda(*args)
    args = list(case.args)
    args[24] = args[24][:, :, :1]  # value_norm_steps of too few groups
    with pytest.raises(ValueError, match="value_norms"):
        K.turbo_attention_cuda(*args)
    old = list(K.turbo_case(64, 2, 2, 1, 64, 5, torch.float16, "cuda", value_bits=2, norm_bits=16).args)
    old[6] = old[6].float()
    with pytest.raises(TypeError, match="key_norms must be float16"):
        K.turbo_attention_cuda(*old)
    torch.cuda.synchronize()  # nothing was launched that could have failed


# --- encode -----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rows", [2, 66, 1002])
@pytest.mark.parametrize("D", [64, 128])
def test_encode_ops(D, rows):
    for case in K.encode_cases(D, rows, "cuda", seed=rows + D):
        _one(case)


def test_vq_nearest_512_gives_int16_and_the_first_of_equal_points():
    """Codes above 255 come back int16, as the torch op's; a point repeated later in the codebook never wins
    (strict argmax: the first of equal scores), also across the 256 boundary."""
    from qjl.codebooks import vq4_on

    book = vq4_on(64, "cuda", 512).clone()
    book[300] = book[20]
    book[511] = book[400]
    y = torch.randn(50, 64, device="cuda") / 8
    y[:, :4] = book[20]
    y[:, 4:8] = book[400]
    got = K.vq_nearest_cuda(y, book)
    assert got.dtype == torch.int16 and got.shape == (50, 16)
    assert (got[:, 0] == 20).all() and (got[:, 1] == 400).all()
    with K.torch_only():
        ref = K.TORCH_IMPL["qjl::vq_nearest"](y, book)
    assert (got[:, 2:] != ref[:, 2:]).float().mean().item() <= 1e-3  # cuBLAS may round the forced ties apart
    assert int(got.max()) > 255  # some codes use the ninth bit


def test_turbo_encode_9bit_layout():
    """turbo_encode with 512 points: one part of n + n/8 bytes, pack_codes(codes, 9) of the nearest points."""
    from qjl.codebooks import rotation, vq4_on
    from qjl.ops import unpack_codes

    D = 128
    x = torch.randn(3, 40, D, device="cuda")
    rot, book = rotation(D, 3).cuda(), vq4_on(D, "cuda", 512)
    (packed,), scales = K.turbo_encode_cuda(x, rot, [2], [D], [], [], book)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 40, D // 4 + D // 32)
    norms = x.norm(dim=-1, keepdim=True)
    y = ((x / norms) @ rot.T).contiguous()
    with K.torch_only():
        near = K.TORCH_IMPL["qjl::vq_nearest"](y, book)
    assert (unpack_codes(packed, 9) != near).float().mean().item() <= 1e-3
    assert scales.dtype == torch.float16 and scales.shape == (3, 40)


def test_turbo_encode_pair_layout():
    """turbo_encode with the [64, 2] pair codebook: 3-bit codes [..., 3D/8] whose pair indices are the nearest
    points (vq_nearest) but for rare float32 ties, and the least-squares scales of those points."""
    from qjl.codebooks import pair_codebook_on, rotation
    from qjl.ops import pair_index

    for D in (64, 128):
        x = torch.randn(3, 40, D, device="cuda")
        rot, book = rotation(D, 3).cuda(), pair_codebook_on(D, "cuda")
        (packed,), scales = K.turbo_encode_cuda(x, rot, [3], [D], [], [], book)
        assert packed.dtype == torch.uint8 and packed.shape == (3, 40, 3 * D // 8)
        norms = x.norm(dim=-1, keepdim=True)
        y = ((x / norms) @ rot.T).contiguous()
        with K.torch_only():
            near = K.TORCH_IMPL["qjl::vq_nearest"](y, book)
            (ref,), ref_scales = K.TORCH_IMPL["qjl::turbo_encode"](x, rot, [3], [D], [], [], book)
        assert near.dtype == torch.uint8 and near.shape == (3, 40, D // 2)
        assert (pair_index(packed) != near.int()).float().mean().item() <= 1e-3
        assert (pair_index(packed) != pair_index(ref)).float().mean().item() <= 1e-3
        assert scales.dtype == torch.float16 and scales.shape == (3, 40)
        assert ((scales.float() - ref_scales.float()).abs().max() / ref_scales.float().abs().max()).item() <= 1e-3


def test_vq_nearest_pair_codebook_gives_uint8_and_the_first_of_equal_points():
    """[64, 2]: one uint8 index per 2 numbers, as the torch op's; a point repeated later never wins."""
    from qjl.codebooks import pair_codebook_on

    book = pair_codebook_on(64, "cuda").clone()
    book[50] = book[7]
    y = torch.randn(50, 64, device="cuda") / 8
    y[:, :2] = book[7]
    got = K.vq_nearest_cuda(y, book)
    assert got.dtype == torch.uint8 and got.shape == (50, 32)
    assert (got[:, 0] == 7).all()
    with K.torch_only():
        ref = K.TORCH_IMPL["qjl::vq_nearest"](y, book)
    assert (got[:, 1:] != ref[:, 1:]).float().mean().item() <= 1e-3


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

    settings = {"turbo-v2-n16": dict(kv="turbo", turbo_key_codebook="scalar", turbo_value_bits=2, turbo_norm_bits=16),
                "turbo-kscalar": dict(kv="turbo", turbo_key_codebook="scalar")}.get(kv, dict(kv=kv))
    cache = QJLCache(cfg, QJLConfig(**settings))
    model(ids[:, :-8], past_key_values=cache)
    cache.freeze_document()
    logits = model(ids[:, -8:], past_key_values=cache).logits[:, -1]
    out = []
    for _ in range(steps):
        nxt = logits.argmax(-1, keepdim=True)
        out.append(int(nxt))
        logits = model(nxt, past_key_values=cache).logits[:, -1]
    return out


@pytest.mark.parametrize("kv", ["turbo", "turbo-kscalar", "turbo-v2-n16", "qjl"])
@pytest.mark.parametrize("head_dim,heads,kv_heads", [(64, 8, 2), (128, 6, 2)])
def test_greedy_tokens_equal_with_and_without_kernels(kv, head_dim, heads, kv_heads, monkeypatch):
    model, cfg = _model(head_dim, heads, kv_heads)  # test_gpu.py's tiny Llama, q/k scaled so keys matter
    model = model.cuda()
    ids = torch.randint(0, 256, (1, 900), generator=torch.Generator().manual_seed(1)).cuda()
    with_kernels = _greedy(model, cfg, ids, kv)
    monkeypatch.setenv(K.ENV, "0")
    without = _greedy(model, cfg, ids, kv)
    assert with_kernels == without
