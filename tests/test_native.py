"""The CPU kernels (qjl/native) against the ops' torch code, and their fallbacks."""

from __future__ import annotations

import warnings

import pytest
import torch

from attention_inputs import exact_parts, layer_args
from qjl import native
from qjl.config import TURBO_PRESETS, QJLConfig
from qjl.ops import pack_codes, unpack_codes, vq_nearest
from qjl.ops.attention import turbo_attention

pytestmark = pytest.mark.skipif(native.library() is None, reason="no C compiler: the CPU kernels are off")

SETTINGS = {
    "default": QJLConfig(),
    "scalar K3, vq4 V2, fp16 norms (format 4's default)": QJLConfig(turbo_key_codebook="scalar", turbo_value_bits=2,
                                                                     turbo_norm_bits=16),
    "scalar V2": QJLConfig(turbo_value_codebook="scalar", turbo_value_bits=2),
    "K2.5/V2.25 scalar, fp16 norms": QJLConfig(turbo_key_bits=2.5, turbo_value_bits=2.25,
                                               turbo_value_codebook="scalar", turbo_norm_bits=16),
    "K4/V3": QJLConfig(turbo_key_bits=4, turbo_value_bits=3),
    "turbo-2.5 preset (K2 + 16 apart, V2 vq4)": QJLConfig(**TURBO_PRESETS["2.5"]),
    "K1/V1, no channels apart": QJLConfig(turbo_key_bits=1, turbo_value_bits=1, turbo_outlier_fraction=0.0),
    "8-bit channels apart": QJLConfig(outlier_bits=8),
}


@pytest.mark.parametrize("label", sorted(SETTINGS))
@pytest.mark.parametrize("D,H,g,L,groups,exact", [(64, 3, 3, 1, 9, (4, 1)), (128, 2, 4, 3, 3, (4, 7)),
                                                  (64, 4, 1, 3, 1, (0, 3)), (128, 1, 3, 1, 17, (4, 0, 2)),
                                                  (64, 2, 3, 33, 2, (4, 64, 40)), (128, 1, 4, 17, 9, (0, 70))])
def test_turbo_attention_matches_the_torch_op(label, D, H, g, L, groups, exact, one_thread):
    """Any GQA ratio (1, 3, 4), head_dim 64/128, decode (L=1) and chunks with the causal mask on the exact part,
    token counts that are not a block multiple (the kernel splits compressed tokens in blocks of 256), 3 or 12 query
    rows (decode steps, a short chunk) and 99 or 68 (a question's chunk: several columns of 8 in the tables)."""
    assert g * L <= native.MAX_ROWS  # the kernel's own path, not the torch fallback
    args, gen = layer_args(SETTINGS[label], D, H, groups, seed=D + g + L)
    ek, ev = exact_parts(gen, H, D, L, exact)
    q = torch.randn(1, H * g, L, D, generator=gen)
    ref = turbo_attention._init_fn(q, ek, ev, scaling=D ** -0.5, **args)
    got = native.turbo_attention_cpu(q, ek, ev, scaling=D ** -0.5, **args)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


def test_turbo_attention_in_half_precision_returns_the_query_dtype():
    args, gen = layer_args(QJLConfig(), 64, 2, 2, seed=3)
    ek, ev = [torch.randn(1, 2, 3, 64, generator=gen).bfloat16()], [torch.randn(1, 2, 3, 64, generator=gen).bfloat16()]
    q = torch.randn(1, 6, 1, 64, generator=gen).bfloat16()
    got = native.turbo_attention_cpu(q, ek, ev, scaling=0.125, **args)
    ref = turbo_attention._init_fn(q, ek, ev, scaling=0.125, **args)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), ref.float(), rtol=2e-2, atol=2e-2)


def test_vq_nearest_picks_the_same_codes():
    gen = torch.Generator().manual_seed(0)
    y, cb = torch.randn(3, 5, 64, generator=gen), torch.randn(256, 4, generator=gen)
    got = native.vq_nearest_cpu(y, cb)
    assert got.shape == (3, 5, 16) and got.dtype == torch.uint8
    assert torch.equal(got, vq_nearest._init_fn(y, cb))


def test_vq_nearest_of_512_points_gives_int16_codes():
    gen = torch.Generator().manual_seed(1)
    y, cb = torch.randn(3, 5, 64, generator=gen), torch.randn(512, 4, generator=gen)
    got = native.vq_nearest_cpu(y, cb)
    assert got.dtype == torch.int16 and int(got.max()) > 255
    assert torch.equal(got, vq_nearest._init_fn(y, cb))


@pytest.mark.parametrize("K,C", [(13, 4), (256, 2), (100, 8), (1, 4), (300, 4)])
def test_vq_nearest_on_any_codebook_size_and_ties_pick_the_first(K, C):
    """Codebooks that are not a multiple of the kernel's 8 lanes, and repeated codewords: the lowest index wins,
    as torch's argmax picks it."""
    gen = torch.Generator().manual_seed(K + C)
    cb = torch.randn(K, C, generator=gen)
    y = torch.randn(4, 6 * C, generator=gen)
    if K > 8:
        cb[K - 1] = cb[2]  # a tie across lanes: index 2 must win
        cb[9] = cb[1]
        y = torch.cat([y, cb[[2, 1, K - 1, 9, 2, 1]].reshape(1, 6 * C)])
    got = native.vq_nearest_cpu(y, cb)
    assert torch.equal(got, vq_nearest._init_fn(y, cb))
    if K > 8:
        assert got[-1].tolist() == [2, 1, 2, 1, 2, 1]


def test_the_ops_dispatch_to_the_kernels_on_cpu(monkeypatch):
    calls = []
    monkeypatch.setattr(native, "library", lambda: calls.append(1) or None)  # seen, then the torch code
    y, cb = torch.randn(2, 8), torch.randn(256, 4)
    assert torch.equal(vq_nearest(y, cb), vq_nearest._init_fn(y, cb)) and calls


def test_without_a_compiler_one_warning_and_the_torch_code(monkeypatch, tmp_path):
    monkeypatch.setenv("QJL_HOME", str(tmp_path))
    monkeypatch.setattr(native, "_compiler", lambda: None)
    native.library.cache_clear()
    try:
        with pytest.warns(UserWarning, match="no C compiler"):
            assert native.library() is None
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert native.library() is None  # cached: the warning is said once
        y, cb = torch.randn(4, 8), torch.randn(256, 4)
        assert torch.equal(native.vq_nearest_cpu(y, cb), vq_nearest._init_fn(y, cb))
    finally:
        native.library.cache_clear()


def test_a_failing_compiler_is_one_warning(monkeypatch, tmp_path):
    monkeypatch.setenv("QJL_HOME", str(tmp_path))
    monkeypatch.setattr(native, "FLAGS", native.FLAGS + ["-DQJL_BREAK", "-include", "/nonexistent.h"])
    native.library.cache_clear()
    try:
        with pytest.warns(UserWarning, match="could not be built"):
            assert native.library() is None
        assert not list((tmp_path / "native").glob("*.so"))  # nothing half-written left behind
    finally:
        native.library.cache_clear()


def test_qjl_native_0_turns_them_off(monkeypatch):
    monkeypatch.setenv("QJL_NATIVE", "0")
    native.library.cache_clear()
    try:
        assert native.library() is None
    finally:
        native.library.cache_clear()


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_pack_codes_is_bit_exact(bits):
    gen = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 1 << bits, (2, 3, 5, 64), generator=gen, dtype=torch.uint8)
    got = native.pack_codes_cpu(codes, bits)
    assert torch.equal(got, pack_codes._init_fn(codes, bits))
    assert torch.equal(unpack_codes(got, bits), codes)
