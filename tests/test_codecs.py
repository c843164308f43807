"""The codec contract (qjl/codecs.py): what state_spec and param_spec say is what encode makes.

Cache files are written from document_tensors() and checked against expected_tensors(), which is built from
these specs, so a spec that drifts from encode would refuse every file of that setting (or accept a wrong one).
"""

from __future__ import annotations

import pytest
import torch

from qjl.codecs import ATTENTION_OPS, make_codecs
from qjl.config import TURBO_PRESETS, QJLConfig

CONFIGS = {
    "turbo default": QJLConfig(),
    "turbo scalar V2": QJLConfig(turbo_value_codebook="scalar", turbo_value_bits=2),
    "turbo vq4 V2, fp16 norms": QJLConfig(turbo_key_codebook="scalar", turbo_value_bits=2, turbo_norm_bits=16),
    "turbo K2.5/V2.25 scalar": QJLConfig(turbo_key_bits=2.5, turbo_value_bits=2.25, turbo_value_codebook="scalar"),
    "turbo K4/V3": QJLConfig(turbo_key_bits=4, turbo_value_bits=3),
    "turbo-2.5 preset (K2 + 16 apart, V2 vq4)": QJLConfig(**TURBO_PRESETS["2.5"]),
    "turbo K1/V1, no channels apart": QJLConfig(turbo_key_bits=1, turbo_value_bits=1, turbo_outlier_fraction=0.0),
    "turbo residual, 8-bit outliers": QJLConfig(turbo_residual_ratio=1.0, outlier_bits=8),
    "turbo fp16 outliers": QJLConfig(outlier_bits=16),
    "qjl default": QJLConfig(kv="qjl"),
    "qjl group outliers, centred": QJLConfig(kv="qjl", outlier_scope="group", outlier_bits=16, center_keys=True),
    "qjl 4-bit values, group 32, early layers": QJLConfig(kv="qjl", value_bits=4, value_group=32, early_layers=1),
    "qjl 8-bit values, 2-bit outliers": QJLConfig(kv="qjl", value_bits=8, outlier_bits=2),
}


def _shapes(tensors: dict) -> dict:
    return {name: (t.dtype, tuple(t.shape)) for name, t in tensors.items()}


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("label", sorted(CONFIGS))
def test_specs_describe_what_encode_makes(label, head_dim, one_thread):
    config = CONFIGS[label]
    B, H, T = 1, 3, 3 * config.group_size
    keys, values = make_codecs(config, 0, head_dim)
    gen = torch.Generator().manual_seed(head_dim)
    k, v = torch.randn(B, H, T, head_dim, generator=gen), torch.randn(B, H, T, head_dim, generator=gen)
    k_state, v_state = keys.encode(k, torch.rand(B, H, head_dim, generator=gen)), values.encode(v)
    assert _shapes(k_state) == keys.state_spec(B, H, T)
    assert _shapes(v_state) == values.state_spec(B, H, T)
    for codec in (keys, values):
        own = {n: t for n, t in codec.params().items() if n not in codec.shared_seeds()}
        assert _shapes(own) == codec.param_spec(B, H)


@pytest.mark.parametrize("label", ["turbo default", "qjl default", "turbo K2.5/V2.25 scalar", "turbo vq4 V2, fp16 norms"])
def test_fused_op_equals_scores_softmax_and_weighted_sum(label, one_thread):
    """The mode's attention op over codec states = softmax over [codec scores, exact logits] times [value sums,
    exact values], for a decode step (L=1) against compressed tokens and an exact tail. (The qjl mode's softmax
    correction is off here: tests/test_cache.py holds the op with it to a formula of its own.)"""
    config = CONFIGS[label].replace(sketch_softmax_correction=0.0)
    B, H, g, D, T, n_e = 1, 2, 3, 64, 2 * config.group_size, 5
    keys, values = make_codecs(config, 0, D)
    gen = torch.Generator().manual_seed(7)
    ks = keys.encode(torch.randn(B, H, T, D, generator=gen) * 2)
    vs = values.encode(torch.randn(B, H, T, D, generator=gen))
    k_e, v_e = torch.randn(B, H, n_e, D, generator=gen), torch.randn(B, H, n_e, D, generator=gen)
    q = torch.randn(B, H * g, 1, D, generator=gen)
    args = keys.op_args(ks) | values.op_args(vs)
    got = ATTENTION_OPS[config.kv](q, [k_e[:, :, :2], k_e[:, :, 2:]], [v_e[:, :, :2], v_e[:, :, 2:]],
                                   scaling=0.125, **args)
    qf = q.reshape(B, H, g, D)
    logits = torch.cat([keys.scores(qf, ks), qf @ k_e.transpose(2, 3)], -1) * 0.125
    w = logits.softmax(-1)
    ref = values.weighted_sum(w[..., :T], vs) + w[..., T:] @ v_e
    torch.testing.assert_close(got, ref.reshape(B, H * g, 1, D), rtol=1e-5, atol=1e-5)
