"""Rotation + Lloyd-Max codecs (qjl/turbo.py) and `--kv turbo` through the cache, on tiny random Llama models."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import qjl.attention  # noqa: F401  (registers attn_implementation "qjl")
from qjl.cache import QJLCache
from qjl.config import ConfigError, QJLConfig
from qjl.sketch import jl_projection
from qjl.codebooks import codebook, rotation, solve_lloyd_max
from qjl.ops import pack_codes as pack, unpack_codes as unpack
from qjl.turbo import TurboKeys, TurboValues

pytestmark = pytest.mark.usefixtures("one_thread")

# Lloyd-Max quantisers of N(0, 1) (Max 1960), positive half.
GAUSSIAN = {1: [0.7979], 2: [0.4528, 1.510], 3: [0.2451, 0.7560, 1.344, 2.152]}


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# --- codebooks and rotation ---------------------------------------------------------------------
@pytest.mark.parametrize("bits", [1, 2, 3])
def test_solver_gives_the_known_gaussian_lloyd_max_values(bits):
    c, b = solve_lloyd_max(bits, 0)
    half = c[len(c) // 2:]
    assert half == pytest.approx(GAUSSIAN[bits], abs=6e-4)
    assert c[: len(c) // 2] == pytest.approx(-half[::-1], abs=1e-9)  # symmetric
    assert b == pytest.approx((c[1:] + c[:-1]) / 2)


@pytest.mark.parametrize("bits", [1, 2, 3])
def test_sphere_codebook_times_sqrt_d_is_close_to_the_gaussian_one(bits):
    c, _ = codebook(bits, 128)
    half = (c * math.sqrt(128))[len(c) // 2:].tolist()
    assert half == pytest.approx(GAUSSIAN[bits], rel=0.012)  # the sphere's tails are a little lighter


def test_rotation_is_orthogonal_and_preserves_inner_products():
    R = rotation(64, 7).double()
    assert torch.allclose(R @ R.T, torch.eye(64, dtype=torch.float64), atol=1e-6)
    x, y = torch.randn(50, 64, generator=_gen(1), dtype=torch.float64), torch.randn(50, 64, generator=_gen(2),
                                                                                      dtype=torch.float64)
    assert torch.allclose((x @ R.T) @ (y @ R.T).T, x @ y.T, atol=1e-5)
    assert torch.equal(rotation(64, 7), rotation(64, 7)) and not torch.allclose(rotation(64, 7), rotation(64, 8))


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_pack_round_trip(bits):
    codes = torch.randint(0, 1 << bits, (2, 3, 5, 64), generator=_gen(bits)).to(torch.uint8)
    packed = pack(codes, bits)
    assert packed.shape[-1] == 64 * bits // 8 and packed.dtype == torch.uint8
    assert torch.equal(unpack(packed, bits), codes)


def test_three_bit_pair_indices_hold_two_codes_each():
    from qjl.ops import pair_index as _pair_index
    from qjl.ops.tables import pair_onehot as _pair_onehot
    codes = torch.randint(0, 8, (2, 3, 5, 56), generator=_gen(9)).to(torch.uint8)
    idx = _pair_index(pack(codes, 3))
    assert idx.shape == (2, 3, 5, 28) and idx.dtype == torch.int32
    assert torch.equal(idx, (codes[..., 0::2].int() | (codes[..., 1::2].int() << 3)))
    onehot = _pair_onehot("cpu")  # column w has a 1 at code s of w, for s = 0, 1
    assert torch.equal(onehot.sum(0), torch.full((64,), 2.0)) and onehot[3, 3] == 1 and onehot[8 + 1, 8] == 1


# --- scores and weighted sums from codes --------------------------------------------------------
def _keys(bits, d=64, m=0, pseed=5):
    proj = jl_projection(m, d, pseed) if m else None
    return TurboKeys(rotation(d, 3), bits, d, 3, proj, pseed)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_table_scores_equal_dequantise_then_matmul(bits):
    """Tolerance: 1e-5 of the logits' scale (float32 sums in another order; the table holds q_j * c exactly)."""
    codec = _keys(bits)
    k = torch.randn(1, 2, 96, 64, generator=_gen(1)) * 3
    q = torch.randn(1, 2, 7, 64, generator=_gen(2))
    state = codec.encode(k)
    ref = q @ codec.decode(state).transpose(2, 3)
    got = codec.scores(q, state)
    assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()
    # and the codes are good ones: the relative error of k_hat falls with the bits (Lloyd-Max MSE, d=64)
    err = ((codec.decode(state) - k).norm(dim=-1) / k.norm(dim=-1)).pow(2).mean().item()
    assert err < {1: 0.40, 2: 0.13, 3: 0.04, 4: 0.012}[bits]


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_weighted_sum_equals_weights_times_dequantised_values(bits):
    codec = TurboValues(rotation(64, 3), bits, 64, 3)
    v = torch.randn(1, 2, 80, 64, generator=_gen(3))
    w = torch.softmax(torch.randn(1, 2, 5, 80, generator=_gen(4)), dim=-1)
    state = codec.encode(v)
    assert set(state) == {"value_codes", "value_norms"}
    ref = w @ codec.decode(state)
    assert torch.allclose(codec.weighted_sum(w, state), ref, atol=1e-5)


def test_the_4d_codebook_beats_the_scalar_code_at_2_bits():
    from qjl.codebooks import vq4_codebook
    cb = vq4_codebook().double()
    assert cb.shape == (256, 4) and torch.isfinite(cb).all()
    x = torch.randn(100_000, 4, generator=_gen(21), dtype=torch.float64)
    nearest = (x @ cb.T - 0.5 * (cb * cb).sum(1)).argmax(1)
    mse = ((x - cb[nearest]) ** 2).mean().item()
    c, b = solve_lloyd_max(2, 0)  # the scalar 2-bit Lloyd-Max code of N(0, 1)
    scalar = ((x - torch.as_tensor(c)[torch.bucketize(x, torch.as_tensor(b))]) ** 2).mean().item()
    assert scalar == pytest.approx(0.1175, abs=0.003)
    assert mse < 0.098 and mse < 0.85 * scalar
    # a k-means fixed point: each centroid is (nearly) the mean of the samples nearest to it
    counts = torch.bincount(nearest, minlength=256)
    means = torch.zeros_like(cb).index_add_(0, nearest, x) / counts.unsqueeze(1).clamp_min(1)
    assert (counts > 100).all() and ((means - cb).norm(dim=1) < 0.15).all()


def test_vq4_values_pick_the_nearest_codeword_and_sum_like_the_reference():
    from qjl.codebooks import vq4_on as _vq4_on
    codec = TurboValues(rotation(64, 3), 2, 64, 3, codebook="vq4")
    assert codec.vq == 256 and not TurboValues(rotation(64, 3), 3, 64, 3, codebook="vq4").vq  # 2 and 2.25 bits only
    v = torch.randn(1, 2, 80, 64, generator=_gen(3))
    state = codec.encode(v)
    assert state["value_codes"].shape == (1, 2, 80, 16) and state["value_codes"].dtype == torch.uint8
    y = (v / v.norm(dim=-1, keepdim=True)) @ codec.rotation.T
    cb = _vq4_on(64, "cpu")
    brute = ((y.reshape(1, 2, 80, 16, 1, 4) - cb) ** 2).sum(-1).argmin(-1)
    assert (brute == state["value_codes"].long()).float().mean() > 0.999  # ties aside
    w = torch.softmax(torch.randn(1, 2, 5, 80, generator=_gen(4)), dim=-1)
    assert torch.allclose(codec.weighted_sum(w, state), w @ codec.decode(state), atol=1e-5)
    scalar = TurboValues(rotation(64, 3), 2, 64, 3)
    err = lambda c: (c.decode(c.encode(v)) - v).pow(2).sum().item()  # noqa: E731
    assert err(codec) < 0.9 * err(scalar)


def test_the_512_point_codebook_errs_a_quarter_less_than_the_256_point_one():
    from qjl.codebooks import vq4_codebook
    x = torch.randn(100_000, 4, generator=_gen(22), dtype=torch.float64)

    def mse(cb):
        return ((x - cb[(x @ cb.T - 0.5 * (cb * cb).sum(1)).argmax(1)]) ** 2).mean().item()

    cb = vq4_codebook(512).double()
    assert cb.shape == (512, 4) and torch.isfinite(cb).all() and len(set(map(tuple, cb.tolist()))) == 512
    assert mse(cb) < 0.072 and mse(cb) < 0.76 * mse(vq4_codebook(256).double())


def test_values_at_2_25_bits_are_9_bit_codes_of_the_nearest_of_512_points():
    from qjl.codebooks import vq4_on as _vq4_on
    from qjl.ops import unpack_codes
    codec = TurboValues(rotation(64, 3), 2.25, 64, 3, codebook="vq4")
    assert codec.vq == 512
    v = torch.randn(1, 2, 64, 64, generator=_gen(5))
    state = codec.encode(v)
    assert state["value_codes"].shape == (1, 2, 64, 18) and state["value_codes"].dtype == torch.uint8
    codes = unpack_codes(state["value_codes"], 9).long()
    assert int(codes.max()) > 255
    y = (v / v.norm(dim=-1, keepdim=True)) @ codec.rotation.T
    brute = ((y.reshape(1, 2, 64, 16, 1, 4) - _vq4_on(64, "cpu", 512)) ** 2).sum(-1).argmin(-1)
    assert (brute == codes).float().mean() > 0.999  # ties aside
    w = torch.softmax(torch.randn(1, 2, 5, 64, generator=_gen(4)), dim=-1)
    assert torch.allclose(codec.weighted_sum(w, state), w @ codec.decode(state), atol=1e-5)
    err = lambda c: (c.decode(c.encode(v)) - v).pow(2).sum().item()  # noqa: E731
    assert err(codec) < 0.8 * err(TurboValues(rotation(64, 3), 2, 64, 3, codebook="vq4"))


def test_the_2d_key_codebook_errs_less_than_the_scalar_3_bit_code():
    from qjl.codebooks import vq_codebook
    cb = vq_codebook(2, 64).double()
    assert cb.shape == (64, 2) and len(set(map(tuple, cb.tolist()))) == 64
    x = torch.randn(200_000, 2, generator=_gen(23), dtype=torch.float64)
    mse = ((x - cb[(x @ cb.T - 0.5 * (cb * cb).sum(1)).argmax(1)]) ** 2).mean().item()
    c, b = solve_lloyd_max(3, 0)
    scalar = ((x - torch.as_tensor(c)[torch.bucketize(x, torch.as_tensor(b))]) ** 2).mean().item()
    assert scalar == pytest.approx(0.0345, abs=0.001) and mse < 0.031 and mse < 0.9 * scalar


def test_3_bit_keys_from_the_2d_codebook_keep_the_layout_and_score_like_the_reference():
    """The same bytes a token as scalar 3-bit codes; each 6-bit pair index names the nearest of the 64 points; table
    scores equal the dequantised keys' inner products; the keys err less than with the scalar code."""
    from qjl.codebooks import pair_codebook_on
    from qjl.ops import pair_index
    pair = TurboKeys(rotation(64, 3), 3, 64, 3, codebook="vq2")
    assert pair.pair and not TurboKeys(rotation(64, 3), 2, 64, 3, codebook="vq2").pair  # 3 bits only
    k = torch.randn(1, 2, 64, 64, generator=_gen(24))
    q = torch.randn(1, 2, 5, 64, generator=_gen(25))
    state = pair.encode(k)
    assert state["key_codes"].shape == (1, 2, 64, 24) and state["key_codes"].dtype == torch.uint8
    y = (k / k.norm(dim=-1, keepdim=True)) @ pair.rotation.T
    brute = ((y.reshape(1, 2, 64, 32, 1, 2) - pair_codebook_on(64, "cpu")) ** 2).sum(-1).argmin(-1)
    assert (brute == pair_index(state["key_codes"]).long()).float().mean() > 0.999  # ties aside
    ref = q @ pair.decode(state).transpose(2, 3)
    torch.testing.assert_close(pair.scores(q, state), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    err = lambda c: (c.decode(c.encode(k)) - k).pow(2).sum().item()  # noqa: E731
    assert err(pair) < 0.92 * err(_keys(3))


def test_norm_codes_keep_each_scale_within_half_a_step():
    from qjl.ops import norm_codes
    n = torch.rand(2, 3, 96, generator=_gen(6)).half() * 40
    n[0, 0, 32:64] = 0  # a group of zeros
    codes, steps = norm_codes(n, 32)
    assert codes.dtype == torch.uint8 and codes.shape == n.shape
    assert steps.dtype == torch.float16 and steps.shape == (2, 3, 3)
    back = codes.float() * steps.float().repeat_interleave(32, dim=2)
    assert ((back - n.float()).abs() <= steps.float().repeat_interleave(32, dim=2) / 2 + 1e-6).all()
    assert (back[0, 0, 32:64] == 0).all() and int(codes.max()) == 255
    with pytest.raises(ValueError, match="multiple"):
        norm_codes(n[..., :40], 32)


def test_8_bit_norms_score_and_sum_like_fp16_ones():
    """The same codes with the scales in 8 bits: logits and value sums within a fraction of a percent."""
    k = torch.randn(1, 2, 64, 64, generator=_gen(7)) * (1 + torch.rand(1, 2, 64, 1, generator=_gen(8)))
    q = torch.randn(1, 2, 3, 64, generator=_gen(9))
    keys8, keys16 = _keys(3), _keys(3)
    keys8.norm_bits = 8
    s8, s16 = keys8.encode(k), keys16.encode(k)
    assert s8["key_norms"].dtype == torch.uint8 and s8["key_norms_steps"].shape == (1, 2, 2)
    assert torch.equal(s8["key_codes"], s16["key_codes"])
    torch.testing.assert_close(keys8.scores(q, s8), keys16.scores(q, s16), rtol=0.01, atol=0.05)
    vals8 = TurboValues(rotation(64, 3), 2.25, 64, 3, codebook="vq4", norm_bits=8)
    vals16 = TurboValues(rotation(64, 3), 2.25, 64, 3, codebook="vq4")
    w = torch.softmax(torch.randn(1, 2, 5, 64, generator=_gen(10)), dim=-1)
    torch.testing.assert_close(vals8.weighted_sum(w, vals8.encode(k)), vals16.weighted_sum(w, vals16.encode(k)),
                               rtol=0.01, atol=0.01)


def test_the_residual_sketch_makes_inner_products_unbiased():
    """Mean over 300 sketch seeds of the residual estimate -> <q, k>; without it the error of k_hat stays."""
    d = 64
    k = torch.randn(1, 1, 32, d, generator=_gen(11))
    q = torch.randn(1, 1, 32, d, generator=_gen(12))
    exact = (q * k).sum(-1)[0, 0]
    plain = _keys(2)
    bias = (plain.scores(q, plain.encode(k))[0, 0].diagonal() - exact)
    est = torch.stack([(lambda c: c.scores(q, c.encode(k))[0, 0].diagonal())(_keys(2, d, d, 1000 + s))
                       for s in range(300)]).double()
    err = est.mean(0) - exact
    scale = (q.norm(dim=-1) * k.norm(dim=-1))[0, 0]
    # standard error of the mean: sqrt(pi/2 / m) * ||q|| ||r|| / sqrt(300), ||r|| ~ 0.35 ||k|| at 2 bits
    assert (err.abs() / scale).max() < 5 * math.sqrt(math.pi / 2 / d) * 0.4 / math.sqrt(300)
    assert err.abs().mean() < 0.25 * bias.abs().mean()


def _spiky_keys(n=96, d=64, seed=1):
    """Keys with 6 channels 8x larger than the rest, as real keys have after RoPE."""
    k = torch.randn(1, 2, n, d, generator=_gen(seed))
    big = torch.tensor([3, 10, 17, 30, 41, 60])
    k[..., big] *= 8
    return k, big


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_outlier_channels_score_equal_dequantise_then_matmul_and_are_the_big_ones(bits):
    d, r = 64, 8
    codec = TurboKeys(rotation(d - r, 3), bits, d, 3, outliers=r, group_size=32, outlier_bits=4)
    k, big = _spiky_keys()
    q = torch.randn(1, 2, 7, d, generator=_gen(2))
    state = codec.encode(k)
    assert codec.rotation.shape == (d - r, d - r) and state["key_codes"].shape[-1] == (d - r) * bits // 8
    for h in range(2):  # the planted channels are among the r kept apart, and the rest covers the others
        assert set(big.tolist()) <= set(codec.head_outliers[0, h].tolist())
        assert sorted(codec.head_outliers[0, h].tolist() + codec.rest[0, h].tolist()) == list(range(d))
    ref = q @ codec.decode(state).transpose(2, 3)
    got = codec.scores(q, state)
    assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_outlier_channels_lower_the_score_error_of_spiky_keys():
    """K2 with 8 channels apart (2.0 + 0.125 scale + 8*5/64 bits) beats K3 on all channels (3.25 bits)."""
    d = 64
    k, _ = _spiky_keys(n=256)
    q = torch.randn(1, 2, 16, d, generator=_gen(5))
    exact = q @ k.transpose(2, 3)

    def err(codec):
        return _rel(codec.scores(q, codec.encode(k)), exact)

    apart = err(TurboKeys(rotation(d - 8, 3), 2, d, 3, outliers=8, group_size=32, outlier_bits=4))
    assert apart < 0.8 * err(TurboKeys(rotation(d, 3), 3, d, 3))


@pytest.mark.parametrize("bits", [2, 3])
def test_the_stored_scale_is_the_least_squares_fit(bits):
    """The fp16 scale s minimises ||x - s R^T y_hat|| per vector: never worse than storing ||x||."""
    codec = _keys(bits)
    x = torch.randn(1, 1, 200, 64, generator=_gen(8)) * 2
    state = codec.encode(x)
    fitted = (codec.decode(state) - x).norm(dim=-1)
    plain = (codec._decode(state["key_codes"], x.norm(dim=-1)) - x).norm(dim=-1)
    assert (fitted <= plain * (1 + 1e-3)).all()  # fp16 rounding of s only
    assert fitted.mean() < plain.mean()


def test_config_validation():
    with pytest.raises(ConfigError):
        QJLConfig(kv="turbo", turbo_key_bits=5)
    with pytest.raises(ConfigError):
        QJLConfig(kv="turbo", turbo_residual_ratio=-1)
    assert QJLConfig(turbo_residual_ratio=1.0).turbo_residual_dim(64) == 64
    assert QJLConfig().turbo_residual_dim(64) == 0
    assert QJLConfig(turbo_outlier_fraction=0.125).turbo_outliers(64) == 8
    assert QJLConfig(turbo_outlier_fraction=0.125).turbo_outliers(128) == 16
    assert QJLConfig(turbo_outlier_fraction=0.01).turbo_outliers(64) == 8  # at least 8, so the rest packs
    assert QJLConfig(turbo_outlier_fraction=0.0).turbo_outliers(64) == 0
    with pytest.raises(ConfigError):
        QJLConfig(turbo_outlier_fraction=0.99).turbo_outliers(64)
    with pytest.raises(ConfigError):
        QJLConfig(sink_tokens=-1)
    with pytest.raises(ConfigError):
        QJLConfig(turbo_value_codebook="vq8")
    with pytest.raises(ConfigError, match="turbo_key_codebook must be 'scalar' or 'vq2', not 'vq4'"):
        QJLConfig(turbo_key_codebook="vq4")
    with pytest.raises(ConfigError, match="turbo_norm_bits must be 8 or 16, not 12"):
        QJLConfig(turbo_norm_bits=12)


@pytest.mark.parametrize("bits", [2.25, 3])
def test_unbiased_value_scales_keep_each_values_projection_and_the_mean_of_many(bits):
    """turbo_unbiased_values: every decoded value has <v, v_hat> = |v|^2 (the least-squares scale gives
    <v, v_hat> = |v_hat|^2 < |v|^2 instead), so the average of many tokens sharing a direction is not shortened."""
    torch.manual_seed(3)
    common = torch.randn(64)
    v = common + 0.7 * torch.randn(1, 2, 512, 64)
    codec = {u: TurboValues.for_layer(QJLConfig(turbo_value_bits=bits, turbo_norm_bits=16, turbo_layer_bits="",
                                                turbo_unbiased_values=u), 0, 64) for u in (False, True)}
    ls, unb = (codec[u].decode(codec[u].encode(v)) for u in (False, True))
    along = lambda vh: (v * vh).sum(-1) / v.pow(2).sum(-1)  # noqa: E731
    assert along(unb).sub(1).abs().max() < 2e-3  # fp16 scales
    assert along(ls).max() < 1 and (v * ls).sum(-1).sub(ls.pow(2).sum(-1)).abs().max() < 1e-2 * v.pow(2).sum(-1).max()
    shrink = 1 - along(ls).mean().item()  # about the codes' relative error: 7% at 2.25 bits, 3.5% at 3
    assert 0.02 < shrink < 0.1
    # the average's error along the tokens' common direction: the least-squares shrinkage, gone when unbiased
    mean_err = {name: ((vh.mean(2) - v.mean(2)) @ common / common.norm()).abs().max().item()
                for name, vh in (("ls", ls), ("unbiased", unb))}
    assert mean_err["unbiased"] < 0.4 * mean_err["ls"]
    # per token the unbiased scale errs a little more (it does not minimise each token's error)
    per_token = {name: (vh - v).pow(2).sum().item() for name, vh in (("ls", ls), ("unbiased", unb))}
    assert per_token["ls"] < per_token["unbiased"] < 1.2 * per_token["ls"]


@pytest.mark.parametrize("bits", [2, 3])
def test_unbiased_key_scales_keep_the_logits_scale(bits):
    """turbo_unbiased_keys (the default): <k, k_hat> = |k|^2 per key (no outliers apart here), so a query's
    logits over many keys are not shrunk towards 0 on average, as the least-squares keys' are by their error."""
    torch.manual_seed(4)
    k = torch.randn(1, 2, 256, 64) + torch.randn(64)
    q = torch.randn(64)
    decoded = {}
    for u in (False, True):
        codec = TurboKeys.for_layer(QJLConfig(turbo_key_bits=bits, turbo_norm_bits=16, turbo_outlier_fraction=0.0,
                                              turbo_unbiased_keys=u), 0, 64)
        decoded[u] = codec.decode(codec.encode(k))
    assert QJLConfig().turbo_unbiased_keys and QJLConfig().turbo_unbiased_values
    along = lambda kh: (k * kh).sum(-1) / k.pow(2).sum(-1)  # noqa: E731
    assert along(decoded[True]).sub(1).abs().max() < 2e-3
    assert along(decoded[False]).mean() < 1 - (0.02 if bits == 3 else 0.08)
    slope = {u: ((decoded[u] @ q) * (k @ q)).sum() / (k @ q).pow(2).sum() for u in (False, True)}  # logit gain
    assert abs(slope[True] - 1) < 0.5 * abs(slope[False] - 1)


def test_layer_bits_override_one_layer_and_reject_what_they_cannot_mean():
    config = QJLConfig(turbo_layer_bits="v1=3, k11=4")
    assert config.turbo_bits("v", 1) == 3 and config.turbo_bits("v", 0) == config.turbo_value_bits == 2.25
    assert config.turbo_bits("k", 11) == 4 and config.turbo_bits("k", 1) == config.turbo_key_bits == 3
    assert QJLConfig().layer_bits() == {("v", 1): 3.0}  # the default: layer 1's values (BENCHMARKS.md)
    assert QJLConfig(turbo_layer_bits="").layer_bits() == {}
    for bad in ("x1=3", "v=3", "v1", "v-1=2", "v1=5", "v1=a", "k2=0.5"):
        with pytest.raises(ConfigError, match=f"turbo_layer_bits entry '{bad}' is not"):
            QJLConfig(turbo_layer_bits=bad)


# --- through the cache ----------------------------------------------------------------------------
DOC, TAIL = 600, 20


def _model(head_dim=64, heads=4, kv_heads=2, layers=2):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                      max_position_embeddings=2048)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # attention that depends on the keys (tests/test_cache.py)
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(3.0)
            layer.self_attn.k_proj.weight.mul_(3.0)
    model.set_attn_implementation("qjl")
    return model, cfg


@pytest.fixture(scope="module")
def tiny():
    return _model()


def _ids(n, seed=1):
    return torch.randint(0, 256, (1, n), generator=_gen(seed))


@torch.no_grad()
def _ask(model, cfg, ids, config):
    cache = QJLCache(cfg, config)
    model(ids[:, :DOC], past_key_values=cache)
    cache.freeze_document()
    return model(ids[:, DOC:], past_key_values=cache).logits, cache


def _rel(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_turbo_logits_are_closer_to_exact_than_qjl_at_similar_bits(tiny):
    model, cfg = tiny
    ids = _ids(DOC + TAIL)
    with torch.no_grad():
        exact = model(ids).logits[:, DOC:]
    qjl, qc = _ask(model, cfg, ids, QJLConfig(kv="qjl"))
    turbo, tc = _ask(model, cfg, ids, QJLConfig(kv="turbo"))
    assert tc.layers[0].n_compressed > 0 and "key_codes" in tc.layers[0].key_state
    assert tc.bits_per_number() <= qc.bits_per_number() + 0.1
    assert _rel(turbo, exact) < _rel(qjl, exact)


def test_a_layer_with_its_own_bits_codes_and_counts_them(tiny):
    """turbo_layer_bits gives one layer 3-bit scalar value codes (3 bytes a 8 numbers) beside the other layer's
    9-bit codes (4 numbers each); the bits a number count them, and the logits stay close to the uniform layout's."""
    model, cfg = tiny
    ids = _ids(DOC + TAIL)
    uniform, uc = _ask(model, cfg, ids, QJLConfig(turbo_layer_bits=""))
    mixed, mc = _ask(model, cfg, ids, QJLConfig(turbo_layer_bits="v1=3"))
    n = mc.layers[1].n_compressed
    assert n == uc.layers[1].n_compressed > 0
    assert mc.layers[0].value_state["value_codes"].shape[-1] == 64 // 4 * 9 // 8  # 9 bits per 4 numbers
    assert mc.layers[1].value_state["value_codes"].shape[-1] == 64 * 3 // 8
    assert uc.layers[1].value_state["value_codes"].shape[-1] == 64 // 4 * 9 // 8
    # one layer of two: (3 - 2.25) / 2 bits more on each value number, half the numbers are values
    extra = mc.bits_per_number() - uc.bits_per_number()
    assert 0.75 / 4 * 0.8 < extra < 0.75 / 4 * 1.05
    with torch.no_grad():
        exact = model(ids).logits[:, DOC:]
    assert _rel(mixed, exact) < _rel(uniform, exact) * 1.2


@pytest.mark.parametrize("config", [QJLConfig(kv="turbo"),
                                    QJLConfig(kv="turbo", turbo_key_bits=2, turbo_residual_ratio=1.0)])
def test_rollback_restores_the_document_exactly(tiny, config):
    model, cfg = tiny
    cache = QJLCache(cfg, config)
    with torch.no_grad():
        model(_ids(300, 5), past_key_values=cache)
        cache.freeze_document()
        snap = [{n: t.clone() for n, t in layer.document_tensors().items()} for layer in cache.layers]
        doc_bytes = cache.document_nbytes()
        first = model(_ids(20, 6), past_key_values=cache).logits
        assert all(layer.tail_k.shape[2] == 20 for layer in cache.layers)
        cache.rollback()
        model(_ids(13, 7), past_key_values=cache)
        cache.rollback()
        again = model(_ids(20, 6), past_key_values=cache).logits
        cache.rollback()
    for layer, s in zip(cache.layers, snap):
        now = layer.document_tensors()
        assert set(now) == set(s)
        assert all(now[n].dtype == t.dtype and torch.equal(now[n], t) for n, t in s.items())
    assert all(layer.tail_k is None for layer in cache.layers)
    assert cache.document_nbytes() == doc_bytes and torch.equal(first, again)


def test_bits_by_hand(tiny):
    """K3/V2, residual m=d, d=64, 2 KV heads, 2 layers, 600 tokens: 512 compressed + an 88-token fp16 window."""
    model, cfg = tiny
    config = QJLConfig(kv="turbo", turbo_key_bits=3, turbo_value_bits=2, turbo_residual_ratio=1.0,
                       turbo_outlier_fraction=0.0, sink_tokens=0, buffer=64, turbo_norm_bits=16, turbo_layer_bits="")
    _, cache = _ask(model, cfg, _ids(DOC + TAIL), config)
    cache.rollback()
    d, h, layers, nc = 64, 2, 2, 512
    assert [layer.n_compressed for layer in cache.layers] == [nc] * layers
    key = d * 3 // 8 + 2 + d // 8 + 2  # codes, norm, residual signs, residual norm
    value = d * 2 // 8 + 2
    window = (DOC - nc) * d * 2 * 2  # keys and values in fp16
    shared = 3 * d * d * 4  # a key rotation, a value rotation and a residual projection for the whole model
    assert cache.document_nbytes() == layers * h * (nc * (key + value) + window) + shared
    assert cache.bits_per_number() == pytest.approx(8 * cache.document_nbytes() / (2 * DOC * layers * h * d))


def test_default_bits_by_hand(tiny):
    """The default turbo cache, d=64, 2 KV heads, 2 layers, 600 tokens: 4 sink tokens, then 576 compressed in
    groups of 32 (buffer 0), 20 left in the window; keys: 8 channels apart (4-bit over 32 tokens, fp16 scale and
    minimum) and 3-bit codes of the other 56; values: 9-bit codes of each 4 of 64 (layer 1: 3-bit scalar codes);
    each scale 8 bits, with an fp16 step per 32 tokens for keys and for values."""
    model, cfg = tiny
    config = QJLConfig()
    assert (config.kv, config.turbo_key_bits, config.turbo_value_bits, config.turbo_value_codebook,
            config.turbo_norm_bits, config.turbo_outlier_fraction, config.sink_tokens, config.exact_buffer(),
            config.outlier_bits, config.turbo_layer_bits) == ("turbo", 3, 2.25, "vq4", 8, 0.125, 4, 0, 4, "v1=3")
    _, cache = _ask(model, cfg, _ids(DOC + TAIL), config)
    cache.rollback()
    d, h, layers, r, sink = 64, 2, 2, 8, 4
    nc = (DOC - sink) // 32 * 32
    assert [layer.n_compressed for layer in cache.layers] == [nc] * layers
    key = (d - r) * 3 // 8 + 1  # codes of the rotated rest, 8-bit scale
    outliers = (nc // 32) * r * (32 * 4 // 8 + 2 + 2) + r * 8  # per group and channel; channel numbers (int64)
    values = d // 4 * 9 // 8 + 1 + d * 3 // 8 + 1  # layer 0, layer 1
    outliers += (nc // 32) * 2 * 2  # the fp16 steps of the key and the value scales, per 32 tokens
    exact = (DOC - nc) * d * 2 * 2  # sink and window, keys and values in fp16
    shared = (d - r) ** 2 * 4 + d * d * 4  # the key rotation (56 x 56) and the value rotation, once
    assert cache.document_nbytes() == h * (layers * (nc * key + outliers + exact) + nc * values) + shared
