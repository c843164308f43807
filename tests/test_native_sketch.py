"""The CPU kernel beneath qjl::sketch_attention (qjl/native/sketch.py, qjl_cpu_sketch.c) against the op's torch
code, and its fallbacks. Floats: rtol 1e-4, atol 1e-5 (the kernel sums in another order than torch)."""

from __future__ import annotations

import pytest
import torch

from attention_inputs import exact_parts, layer_args
from qjl import native
from qjl.config import QJLConfig
from qjl.native import sketch
from qjl.ops.attention import sketch_attention

pytestmark = pytest.mark.skipif(native.library() is None, reason="no C compiler: the CPU kernels are off")

SETTINGS = {
    "default": QJLConfig(kv="qjl"),
    "no softmax correction": QJLConfig(kv="qjl", sketch_softmax_correction=0.0),
    "centred, 2-bit channels apart": QJLConfig(kv="qjl", center_keys=True, outlier_bits=2),
    "8-bit channels, 4-bit values": QJLConfig(kv="qjl", outlier_bits=8, value_bits=4, value_group=32),
    "fp16 channels per head, 8-bit values": QJLConfig(kv="qjl", outlier_bits=16, value_bits=8),
    "per token group (the paper)": QJLConfig(kv="qjl", outlier_scope="group", outlier_bits=16, center_keys=True),
    "no channels apart, early layer": QJLConfig(kv="qjl", outlier_fraction=0.0, early_layers=1),
}


@pytest.mark.parametrize("label", sorted(SETTINGS))
@pytest.mark.parametrize("D,H,g,L,groups,exact", [(64, 3, 3, 1, 9, (4, 65)), (128, 2, 4, 3, 3, (4, 7)),
                                                  (64, 4, 1, 3, 1, (0, 3)), (128, 1, 3, 1, 17, (4, 0, 2)),
                                                  (64, 3, 3, 4, 5, (4, 33, 5)), (64, 2, 3, 33, 2, (4, 64, 40)),
                                                  (128, 1, 4, 17, 9, (0, 70))])
def test_sketch_attention_matches_the_torch_op(label, D, H, g, L, groups, exact, one_thread):
    """GQA 1/3/4, head_dim 64/128, decode (L=1) and chunks (causal mask on the exact part), token counts that are
    not a multiple of the kernel's block of 256, sink/window/tail parts present or not, rows in one table chunk of 8
    (3, 4, 9) or several (12, 68, 99)."""
    assert g * L <= sketch.MAX_ROWS  # the kernel's own path, not the torch fallback
    args, gen = layer_args(SETTINGS[label], D, H, groups, key_offset=0.5, seed=D + g + L)
    ek, ev = exact_parts(gen, H, D, L, exact)
    q = torch.randn(1, H * g, L, D, generator=gen)
    ref = sketch_attention._init_fn(q, ek, ev, scaling=D ** -0.5, **args)
    got = sketch.sketch_attention_cpu(q, ek, ev, scaling=D ** -0.5, **args)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


def test_the_op_runs_the_kernel_on_cpu(monkeypatch):
    args, gen = layer_args(QJLConfig(kv="qjl"), 64, 3, 2, key_offset=0.5, seed=1)
    ek, ev = exact_parts(gen, 3, 64, 1, (4, 9))
    q = torch.randn(1, 9, 1, 64, generator=gen)
    calls = []
    real = native.library
    monkeypatch.setattr(native, "library", lambda: calls.append(1) or real())
    got = sketch_attention(q, ek, ev, scaling=0.125, **args)
    assert calls
    torch.testing.assert_close(got, sketch_attention._init_fn(q, ek, ev, scaling=0.125, **args), rtol=1e-4,
                               atol=1e-5)


def test_half_precision_queries_return_their_dtype():
    args, gen = layer_args(QJLConfig(kv="qjl"), 64, 2, 2, key_offset=0.5, seed=3)
    ek, ev = [torch.randn(1, 2, 3, 64, generator=gen).bfloat16()], [torch.randn(1, 2, 3, 64, generator=gen).bfloat16()]
    q = torch.randn(1, 6, 1, 64, generator=gen).bfloat16()
    got = sketch.sketch_attention_cpu(q, ek, ev, scaling=0.125, **args)
    ref = sketch_attention._init_fn(q, ek, ev, scaling=0.125, **args)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), ref.float(), rtol=2e-2, atol=2e-2)


def _uncovered():
    """(name, args change, q rows) the kernel leaves to the torch code."""
    return {"too many rows": ({}, sketch.MAX_ROWS // 3 + 1), "int16 group indices": ({"outlier_index": "int16"}, 1),
            "fp32 norms": ({"key_norms": "float32"}, 1), "no library": ({}, 1)}


@pytest.mark.parametrize("name", sorted(_uncovered()))
def test_uncovered_configurations_run_the_torch_code(name, monkeypatch):
    change, L = _uncovered()[name]
    config = QJLConfig(kv="qjl", outlier_scope="group", outlier_bits=16) if "indices" in name else QJLConfig(kv="qjl")
    args, gen = layer_args(config, 64, 3, 2, key_offset=0.5, seed=5)
    for key, dtype in change.items():
        args[key] = args[key].to(getattr(torch, dtype))
    ek, ev = exact_parts(gen, 3, 64, L, (4, 9))
    q = torch.randn(1, 9, L, 64, generator=gen)
    ran = []
    monkeypatch.setattr(sketch.attention_ops.sketch_attention, "_init_fn",
                        lambda *a, **k: ran.append(1) or torch.zeros_like(q))
    if name == "no library":
        monkeypatch.setattr(native, "library", lambda: None)
    assert torch.equal(sketch.sketch_attention_cpu(q, ek, ev, scaling=0.125, **args), torch.zeros_like(q))
    assert ran
