"""The value codec (qjl/values.py): code packing, quantisation error, and the weighted sum on codes."""

from __future__ import annotations

import pytest
import torch

from qjl import ops as values_mod
from qjl.ops import pack_codes, unpack_codes
from qjl.values import QuantValues


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("shape", [(8,), (3, 64), (2, 2, 5, 128)])
def test_pack_unpack_codes_round_trip(bits, shape):
    gen = torch.Generator().manual_seed(bits * 100 + len(shape))
    codes = torch.randint(0, 1 << bits, shape, generator=gen).to(torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (*shape[:-1], shape[-1] * bits // 8)
    assert torch.equal(unpack_codes(packed, bits), codes)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_unpack_codes_float_equals_unpack_codes(bits):
    unpack_float = getattr(values_mod, "unpack_codes_float", None)
    if unpack_float is None:
        pytest.skip("no unpack_codes_float in this version")
    packed = torch.randint(0, 256, (2, 3, 7, 16), generator=torch.Generator().manual_seed(bits)).to(torch.uint8)
    got = unpack_float(packed, bits)
    assert got.dtype == torch.float32
    assert torch.equal(got, unpack_codes(packed, bits).float())


def test_pack_codes_layout():
    # Code j of a byte sits at bits j*b..: [1, 2, 3, 0] at 2 bits -> 1 + 2<<2 + 3<<4 = 57.
    assert pack_codes(torch.tensor([1, 2, 3, 0], dtype=torch.uint8), 2).tolist() == [57]
    assert pack_codes(torch.tensor([15, 1], dtype=torch.uint8), 4).tolist() == [31]


def _values(B, H, T, D, seed):
    gen = torch.Generator().manual_seed(seed)
    # Channels of different scales and offsets, as real values have.
    return torch.randn(B, H, T, D, generator=gen) * torch.rand(D, generator=gen) * 3 + torch.randn(D, generator=gen)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("group", [32, 64])
def test_decode_error_is_at_most_half_a_step(bits, group):
    B, H, T, D = 1, 2, 50, 64
    v = _values(B, H, T, D, seed=bits + group)
    codec = QuantValues(bits, group, D)
    state = codec.encode(v)
    ng = D // group
    assert state["value_codes"].shape == (B, H, T, D * bits // 8)
    assert state["value_scales"].shape == (B, H, T, ng) and state["value_scales"].dtype == torch.float16
    assert state["value_mins"].shape == (B, H, T, ng) and state["value_mins"].dtype == torch.float16
    dec = codec.decode(state)
    err = (dec - v).abs().view(B, H, T, ng, group)
    vg = v.view(B, H, T, ng, group)
    scale = state["value_scales"].float().unsqueeze(-1)
    # Codes are chosen against the fp16-rounded scale and minimum, so |error| <= scale/2 up to clamping at the
    # ends, where fp16 rounding of the minimum and of levels*scale (relative 2^-11 each) can add a little:
    # slack 2^-10 of the group's magnitude.
    slack = 2.0 ** -10 * vg.abs().amax(-1, keepdim=True) + 1e-6
    assert (err <= scale / 2 + slack).all(), (err - scale / 2).max()
    # The scale is the group's range over 2^bits - 1 levels, in fp16.
    levels = (1 << bits) - 1
    torch.testing.assert_close(scale.squeeze(-1), (vg.amax(-1) - vg.amin(-1)) / levels, rtol=2e-3, atol=1e-6)
    # And the error is not trivially small either: quantisation does happen at 2 bits.
    if bits == 2:
        assert err.mean() > 0.1 * scale.mean()


def test_decode_of_a_constant_group_is_exact_up_to_fp16():
    # Exactly representable constants: zero range, scale 0, decoded exactly (no division by a zero scale).
    v = torch.full((1, 1, 4, 32), 1.25)
    v[0, 0, 1] = -7.0
    codec = QuantValues(2, 32, 32)
    state = codec.encode(v)
    assert (state["value_scales"] == 0).all()
    assert torch.equal(codec.decode(state), v)
    # A constant fp16 cannot hold: the minimum rounds, a tiny scale makes up the difference; within fp16 rounding.
    v = torch.full((1, 1, 4, 32), 1.2345)
    dec = QuantValues(2, 32, 32).decode(QuantValues(2, 32, 32).encode(v))
    assert torch.isfinite(dec).all()
    assert (dec - v).abs().max() <= 1.2345 * 2.0 ** -11


@pytest.mark.parametrize("bits", [2, 4])
def test_fitted_codes_halve_the_error_without_shrinking_the_group(bits):
    """int_quantize(fit=True), the qjl mode's default (value_fit): less squared error than min/max codes, and each
    group's decoded values keep their projection on the group's own centred values (no least-squares shrinkage)."""
    B, H, T, D, group = 1, 2, 300, 64, 64
    v = _values(B, H, T, D, seed=7 + bits)
    plain, fitted = QuantValues(bits, group, D), QuantValues(bits, group, D, fit=True)
    err_plain = (plain.decode(plain.encode(v)) - v).pow(2).sum()
    dec = fitted.decode(fitted.encode(v))
    err_fit = (dec - v).pow(2).sum()
    assert err_fit < (0.75 if bits == 2 else 0.95) * err_plain, (err_fit, err_plain)
    vc = v - v.mean(-1, keepdim=True)
    proj = (vc * (dec - v.mean(-1, keepdim=True))).sum(-1) / vc.pow(2).sum(-1)
    torch.testing.assert_close(proj, torch.ones_like(proj), atol=5e-3, rtol=0)  # fp16 scale and minimum
    # the group's mean is kept too (the line passes through it), up to fp16 rounding
    torch.testing.assert_close(dec.mean(-1), v.mean(-1), atol=5e-3 * v.abs().max().item(), rtol=0)


def test_fitted_codes_use_every_level_and_keep_constant_groups():
    v = _values(1, 1, 40, 32, seed=3)
    v[0, 0, 5] = 0.75  # a constant group: no line to fit, decoded as it is
    codec = QuantValues(2, 32, 32, fit=True)
    state = codec.encode(v)
    dec = codec.decode(state)
    assert torch.isfinite(dec).all()
    assert torch.equal(dec[0, 0, 5], torch.full((32,), 0.75))
    codes = values_mod.unpack_codes(state["value_codes"], 2)
    assert set(codes.unique().tolist()) == {0, 1, 2, 3}


def test_value_fit_follows_the_config():
    from qjl.config import QJLConfig

    assert QuantValues.for_layer(QJLConfig(kv="qjl"), 0, 64).fit is True
    assert QuantValues.for_layer(QJLConfig(kv="qjl", value_fit=False), 0, 64).fit is False


# Token counts below, across and at twice the internal block of weighted_sum (whatever its size: it was 1024,
# then 4096), so partial and whole blocks are both summed.
_B = values_mod.VALUE_BLOCK


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("T,Q", [(100, 1), (_B + 476, 3), (2 * _B, 2)])
def test_weighted_sum_equals_weights_times_decoded_values(bits, T, Q):
    B, H, D, group = 2, 2, 64, 32
    v = _values(B, H, T, D, seed=T + bits)
    codec = QuantValues(bits, group, D)
    state = codec.encode(v)
    gen = torch.Generator().manual_seed(Q)
    w = torch.softmax(torch.randn(B, H, Q, T, generator=gen) * 3, dim=-1)
    got = codec.weighted_sum(w, state)
    ref = w.double() @ codec.decode(state).double()
    assert got.shape == (B, H, Q, D) and got.dtype == torch.float32
    # float32 accumulation over T terms against a float64 reference: 1e-4 of the output's magnitude.
    torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def test_weighted_sum_blocks_are_all_counted():
    # Weight only on tokens in the second and third internal blocks: a sum that dropped a block would be 0 there.
    B, H, T, D = 1, 1, 2 * values_mod.VALUE_BLOCK + 10, 32
    v = _values(B, H, T, D, seed=5)
    codec = QuantValues(4, 32, D)
    state = codec.encode(v)
    dec = codec.decode(state)
    for t in (values_mod.VALUE_BLOCK - 1, values_mod.VALUE_BLOCK, 2 * values_mod.VALUE_BLOCK + 9):
        w = torch.zeros(B, H, 1, T)
        w[..., t] = 1.0
        torch.testing.assert_close(codec.weighted_sum(w, state), dec[:, :, t:t + 1], rtol=1e-5, atol=1e-5)


def test_weighted_sum_with_arbitrary_signed_weights():
    # Not only softmax rows: linearity holds for any weights (the attention passes a slice of a softmax row).
    B, H, T, D = 1, 3, 300, 128
    v = _values(B, H, T, D, seed=8)
    codec = QuantValues(2, 64, D)
    state = codec.encode(v)
    w = torch.randn(B, H, 5, T, generator=torch.Generator().manual_seed(9))
    ref = w.double() @ codec.decode(state).double()
    torch.testing.assert_close(codec.weighted_sum(w, state).double(), ref, rtol=1e-4,
                               atol=1e-4 * ref.abs().max().item())


def test_group_must_divide_head_dim():
    with pytest.raises(ValueError):
        QuantValues(2, 48, 64)
