"""Long chunks: decoded K/V + one SDPA (qjl/ops/dense.py) against scoring from the codes, for both modes."""

from __future__ import annotations

import pytest
import torch

from attention_inputs import exact_parts, layer_args
from qjl.config import QJLConfig
from qjl.ops import dense
from qjl.ops.attention import sketch_attention, turbo_attention

SETTINGS = {
    "turbo default": QJLConfig(),
    "turbo scalar V2": QJLConfig(turbo_value_codebook="scalar", turbo_value_bits=2),
    "turbo vq4 V2, fp16 norms": QJLConfig(turbo_key_codebook="scalar", turbo_value_bits=2, turbo_norm_bits=16),
    "turbo K2.5/V2.25 scalar": QJLConfig(turbo_key_bits=2.5, turbo_value_bits=2.25, turbo_value_codebook="scalar"),
    "turbo K4/V3, 8-bit channels apart": QJLConfig(turbo_key_bits=4, turbo_value_bits=3, outlier_bits=8),
    "turbo residual sketch, no channels": QJLConfig(turbo_residual_ratio=1.0, turbo_outlier_fraction=0.0),
    "turbo fp16 channels apart": QJLConfig(outlier_bits=16),
    "qjl default": QJLConfig(kv="qjl"),
    "qjl, no softmax correction": QJLConfig(kv="qjl", sketch_softmax_correction=0.0),
    "qjl outliers per group, centred": QJLConfig(kv="qjl", outlier_scope="group", outlier_bits=16, center_keys=True),
    "qjl 4-bit values, no outliers": QJLConfig(kv="qjl", value_bits=4, outlier_fraction=0.0),
}
OPS = {"turbo": turbo_attention, "qjl": sketch_attention}


def _inputs(config: QJLConfig, D: int, H: int, g: int, L: int, groups: int, exact: tuple, seed: int):
    args, gen = layer_args(config, D, H, groups, seed)
    ek, ev = exact_parts(gen, H, D, L, exact)
    return torch.randn(1, H * g, L, D, generator=gen), ek, ev, args


def _both(monkeypatch, op, q, ek, ev, args, scaling):
    monkeypatch.setattr(dense, "MIN_ROWS", 10 ** 9)
    tables = op._init_fn(q, ek, ev, scaling=scaling, **args)
    monkeypatch.setattr(dense, "MIN_ROWS", 1)
    return tables, op._init_fn(q, ek, ev, scaling=scaling, **args)


@pytest.mark.parametrize("label", sorted(SETTINGS))
@pytest.mark.parametrize("D,H,g,L,groups,exact", [(64, 3, 3, 5, 3, (4, 9)), (128, 2, 4, 7, 2, (0, 7)),
                                                  (64, 4, 1, 6, 1, (4, 3, 6)), (128, 1, 3, 1, 3, (4, 0, 2))])
def test_the_dense_path_equals_scoring_from_the_codes(monkeypatch, label, D, H, g, L, groups, exact):
    """Any GQA ratio (1, 3, 4), head_dim 64/128, a chunk with the causal mask on its own tokens (L = 1 too),
    sinks/window/tail present or not, every code layout of both modes."""
    config = SETTINGS[label]
    q, ek, ev, args = _inputs(config, D, H, g, L, groups, exact, seed=D + g + L)
    tables, got = _both(monkeypatch, OPS[config.kv], q, ek, ev, args, D ** -0.5)
    torch.testing.assert_close(got, tables, rtol=1e-4, atol=1e-5)


def test_a_biased_chunk_in_blocks_of_rows_equals_one_block(monkeypatch):
    """The qjl mode's softmax correction is a mask on the compressed part; a chunk whose mask would pass
    BIAS_FLOATS goes in blocks of query rows, with the causal part aligned to each block's own rows."""
    q, ek, ev, args = _inputs(QJLConfig(kv="qjl"), 64, 2, 3, 9, 2, (4, 9), seed=4)
    tables, whole = _both(monkeypatch, sketch_attention, q, ek, ev, args, 0.125)
    monkeypatch.setattr(dense, "BIAS_FLOATS", 2 * 6 * (64 + 4 + 9))  # 2 query rows a block: 5 blocks
    blocks = sketch_attention._init_fn(q, ek, ev, scaling=0.125, **args)
    torch.testing.assert_close(blocks, whole, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(blocks, tables, rtol=1e-4, atol=1e-5)


def test_a_chunk_over_nothing_compressed_is_causal_attention(monkeypatch):
    """The whole document in one pass: no compressed tokens yet; the result is plain causal SDPA."""
    q, ek, ev, args = _inputs(QJLConfig(), 64, 2, 3, 9, 0, (9,), seed=1)
    tables, got = _both(monkeypatch, turbo_attention, q, ek, ev, args, 0.125)
    ref = torch.nn.functional.scaled_dot_product_attention(q, ek[0].float(), ev[0].float(), is_causal=True,
                                                           scale=0.125, enable_gqa=True)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(tables, ref, rtol=1e-4, atol=1e-5)


def test_the_first_query_of_a_chunk_does_not_see_the_rest(monkeypatch):
    """Changing the chunk's later keys/values leaves its first query's output alone, and changes the last's."""
    q, ek, ev, args = _inputs(QJLConfig(), 64, 2, 2, 6, 2, (4, 6), seed=2)
    monkeypatch.setattr(dense, "MIN_ROWS", 1)
    before = turbo_attention._init_fn(q, ek, ev, scaling=0.125, **args)
    ek[-1][:, :, 1:] += 3.0
    ev[-1][:, :, 1:] -= 2.0
    after = turbo_attention._init_fn(q, ek, ev, scaling=0.125, **args)
    torch.testing.assert_close(after[:, :, 0], before[:, :, 0])
    assert not torch.allclose(after[:, :, -1], before[:, :, -1], atol=1e-3)


def test_half_precision_returns_the_query_dtype(monkeypatch):
    q, ek, ev, args = _inputs(QJLConfig(), 64, 2, 2, 5, 2, (4, 5), seed=3)
    tables, got = _both(monkeypatch, turbo_attention, q.bfloat16(), [t.bfloat16() for t in ek],
                        [t.bfloat16() for t in ev], args, 0.125)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), tables.float(), rtol=3e-2, atol=3e-2)
