"""The codecs and the compressed cache on CUDA, against the same code on the CPU. Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import qjl.attention  # noqa: F401  (registers attn_implementation "qjl")
from qjl.cache import QJLCache
from qjl.config import QJLConfig
from qjl.keys import QJLKeys
from qjl.sketch import jl_projection, unpack_bits
from qjl.codebooks import rotation
from qjl.ops import unpack_codes as unpack
from qjl.ops.attention import scales
from qjl.turbo import TurboKeys, TurboValues
from qjl.values import QuantValues

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

DEVICE = "cuda"
DOC, TAIL = 600, 20


def _model(head_dim=64, heads=4, kv_heads=2):
    """The tiny random Llama of test_cache.py, q/k projections scaled 3x so attention depends on the keys."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                      max_position_embeddings=2048)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(3.0)
            layer.self_attn.k_proj.weight.mul_(3.0)
    model.set_attn_implementation("qjl")
    return model, cfg


def _rel(a, b) -> float:
    a, b = a.float().cpu(), b.float().cpu()
    return ((a - b).norm() / b.norm()).item()


@torch.no_grad()
def _ask(model, cfg, ids, kv="qjl"):
    cache = QJLCache(cfg, QJLConfig(kv=kv))
    model(ids[:, :DOC], past_key_values=cache)
    cache.freeze_document()
    first = model(ids[:, DOC:], past_key_values=cache).logits
    step = model(ids[:, -1:], past_key_values=cache).logits  # one decode step further
    cache.rollback()
    again = model(ids[:, DOC:], past_key_values=cache).logits
    return first, step, again, cache


@pytest.mark.parametrize("kv", ["qjl", "turbo"])
@pytest.mark.parametrize("head_dim,heads,kv_heads", [(64, 4, 2), (128, 4, 4)])
@pytest.mark.parametrize("dtype,bound", [(torch.float16, 0.04), (torch.bfloat16, 0.08)])
def test_model_on_cuda_close_to_cpu_and_exact(kv, head_dim, heads, kv_heads, dtype, bound):
    model, cfg = _model(head_dim, heads, kv_heads)
    ids = torch.randint(0, 256, (1, DOC + TAIL), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        exact = model(ids).logits[:, DOC:]
    cpu, _, _, _ = _ask(model, cfg, ids, kv)  # CPU, fp32
    model = model.to(DEVICE, dtype)
    gpu, step, again, cache = _ask(model, cfg, ids.to(DEVICE), kv)
    layer = cache.layers[0]
    assert gpu.device.type == DEVICE and gpu.dtype == dtype
    for state in (layer.key_state, layer.value_state):
        assert state and all(t.device.type == DEVICE for t in state.values())
    for matrix in layer.key_codec.params().values():
        assert matrix.device.type == DEVICE
    assert torch.isfinite(gpu).all() and torch.isfinite(step).all()
    assert torch.equal(gpu, again)  # rollback is exact on the GPU too
    # The CPU fp16/bf16 runs of the same model differ from CPU fp32 by 0.009-0.010 (fp16) and 0.024-0.030 (bf16);
    # CUDA adds only a different summation order. Against exact: the compression error, about 0.12.
    assert _rel(gpu, cpu) < bound
    assert _rel(gpu, exact) < 0.2


def _sketched_part(codec, k, state):
    """k_in: the key less the mean and the outlier channels, which is what the codec sketches."""
    k = k.float()
    if codec.mean is not None:
        k = k - codec.mean.cpu().unsqueeze(2)
    B, H, T, D = k.shape
    if codec.head_outliers is not None:
        return k.scatter(3, codec.head_outliers.cpu().unsqueeze(2).expand(B, H, T, -1), 0.0)
    if "key_outlier_index" in state:
        G = codec.group_size
        idx = state["key_outlier_index"].long().cpu()
        kg = k.view(B, H, T // G, G, D)
        return kg.scatter(4, idx.unsqueeze(3).expand(B, H, T // G, G, idx.shape[-1]), 0.0).view(B, H, T, D)
    return k


@pytest.mark.parametrize("scope,bits,center", [("group", 16, True), ("head", 4, False), ("head", 16, False)])
@pytest.mark.parametrize("D,m", [(64, 128), (128, 256)])
def test_key_codec_on_cuda_equals_cpu(scope, bits, center, D, m):
    B, H, T, Q = 1, 2, 256, 6
    gen = torch.Generator().manual_seed(D + m)
    k = torch.randn(B, H, T, D, generator=gen) * (1 + 4 * (torch.rand(D, generator=gen) > 0.9))
    q = torch.randn(B, H, Q, D, generator=gen)

    def codec():
        return QJLKeys(jl_projection(m, D, 0), D, D // 8, 32, center, 0, outlier_scope=scope, outlier_bits=bits)

    cpu = codec()
    s_cpu = cpu.encode(k)
    gpu = codec().to(DEVICE)
    s_gpu = gpu.encode(k.to(DEVICE))
    assert set(s_gpu) == set(s_cpu)
    for name in s_cpu:
        assert s_gpu[name].device.type == DEVICE and s_gpu[name].dtype == s_cpu[name].dtype
    if gpu.head_outliers is not None:
        assert torch.equal(gpu.head_outliers.cpu(), cpu.head_outliers)
    if "key_outlier_index" in s_cpu:
        assert torch.equal(s_gpu["key_outlier_index"].cpu(), s_cpu["key_outlier_index"])
    # Signs: identical wherever S k_in is clear of 0; a different summation order may flip the rest.
    bits_cpu, bits_gpu = unpack_bits(s_cpu["key_signs"]), unpack_bits(s_gpu["key_signs"]).cpu()
    k_in = _sketched_part(cpu, k, s_cpu)
    proj = k_in.double() @ cpu.projection.double().T
    clear = proj.abs() > 1e-4 * k_in.norm(dim=-1, keepdim=True)
    assert clear.float().mean() > 0.99
    assert torch.equal(bits_gpu[clear], bits_cpu[clear])
    assert (bits_cpu == bits_gpu).float().mean() > 0.999
    torch.testing.assert_close(s_gpu["key_norms"].cpu(), s_cpu["key_norms"], rtol=1e-3, atol=1e-3)
    # Scores of one state on either device: the same up to float32 summation order.
    scores_cpu = cpu.scores(q, s_cpu)
    on_gpu = {n: t.to(DEVICE) for n, t in s_cpu.items()}
    scores_gpu = gpu.scores(q.to(DEVICE), on_gpu).cpu()
    torch.testing.assert_close(scores_gpu, scores_cpu, rtol=1e-4, atol=1e-4 * scores_cpu.abs().max().item())


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_value_codec_on_cuda_equals_cpu(bits):
    B, H, T, D = 1, 2, 1500, 128
    gen = torch.Generator().manual_seed(bits)
    v = torch.randn(B, H, T, D, generator=gen)
    codec = QuantValues(bits, 32, D)
    s_cpu = codec.encode(v)
    s_gpu = codec.encode(v.to(DEVICE))
    # Scales and minimums: the same IEEE operations on the same numbers.
    assert torch.equal(s_gpu["value_mins"].cpu(), s_cpu["value_mins"])
    torch.testing.assert_close(s_gpu["value_scales"].cpu(), s_cpu["value_scales"], rtol=1e-3, atol=0)
    # Codes: identical but for values sitting on a rounding boundary.
    from qjl.ops import unpack_codes
    same = unpack_codes(s_gpu["value_codes"].cpu(), bits) == unpack_codes(s_cpu["value_codes"], bits)
    assert same.float().mean() > 0.999
    w = torch.softmax(torch.randn(B, H, 3, T, generator=gen), -1)
    ref = codec.weighted_sum(w, s_cpu)
    got = codec.weighted_sum(w.to(DEVICE), {n: t.to(DEVICE) for n, t in s_cpu.items()}).cpu()
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def _same_scales(s_gpu: dict, s_cpu: dict, name: str) -> None:
    """fp16 scales within 1e-3; 8-bit ones: steps within 1e-3 and codes equal but for a rounding boundary."""
    steps = name + "_steps"
    if steps not in s_cpu:
        torch.testing.assert_close(s_gpu[name].cpu(), s_cpu[name], rtol=1e-3, atol=0)
        return
    torch.testing.assert_close(s_gpu[steps].cpu(), s_cpu[steps], rtol=1e-3, atol=0)
    diff = (s_gpu[name].cpu().int() - s_cpu[name].int()).abs()
    assert diff.max() <= 1 and (diff == 0).float().mean() > 0.99
    torch.testing.assert_close(scales(s_gpu[name], s_gpu[steps]).cpu(), scales(s_cpu[name], s_cpu[steps]),
                               rtol=2e-3, atol=1.01 * s_cpu[steps].float().max().item())


@pytest.mark.parametrize("norm_bits", [16, 8])
# 3-bit keys both ways: the [64, 2] pair codebook (the default) and Lloyd-Max centroids
@pytest.mark.parametrize("bits,key_book", [(2, "scalar"), (2.25, "scalar"), (2.5, "scalar"), (3, "scalar"),
                                           (3, "vq2"), (4, "scalar")])
@pytest.mark.parametrize("D,r", [(64, 0), (64, 8), (128, 16)])
def test_turbo_codecs_on_cuda_equal_cpu(bits, key_book, D, r, norm_bits):
    B, H, T, Q = 1, 2, 704, 5  # 22 groups of 32 tokens
    gen = torch.Generator().manual_seed(int(bits * D) + r)
    k = torch.randn(B, H, T, D, generator=gen) * (1 + 4 * (torch.rand(D, generator=gen) > 0.9))
    q = torch.randn(B, H, Q, D, generator=gen)
    cpu = TurboKeys(rotation(D - r, 7), bits, D, 7, outliers=r, norm_bits=norm_bits, codebook=key_book)
    gpu = TurboKeys(rotation(D - r, 7), bits, D, 7, outliers=r, norm_bits=norm_bits, codebook=key_book).to(DEVICE)
    assert cpu.pair == (key_book == "vq2")
    assert torch.equal(gpu.rotation.cpu(), cpu.rotation)  # the same matrix from the seed on either device
    s_cpu, s_gpu = cpu.encode(k), gpu.encode(k.to(DEVICE))
    assert set(s_cpu) == set(s_gpu)
    if r:
        assert torch.equal(gpu.head_outliers.cpu(), cpu.head_outliers)
    # Codes: identical but for rotated coordinates sitting on a codebook boundary (float32 summation order); with
    # the pair codebook the GPU's come from the encode kernel's 3-bit layout (VQ_PACK3), the CPU's from torch.
    for name, (b, _, _) in zip(["key_codes", "key_codes_hi"], cpu.parts):
        same = unpack(s_gpu[name].cpu(), b) == unpack(s_cpu[name], b)
        assert same.float().mean() > 0.999
    _same_scales(s_gpu, s_cpu, "key_norms")
    # Table scoring of one state on either device, and against dequantise-then-matmul on the GPU.
    ref = cpu.scores(q, s_cpu)
    on_gpu = {n: t.to(DEVICE) for n, t in s_cpu.items()}
    got = gpu.scores(q.to(DEVICE), on_gpu)
    tol = 1e-4 * ref.abs().max().item()
    torch.testing.assert_close(got.cpu(), ref, rtol=1e-4, atol=tol)
    torch.testing.assert_close(got, q.to(DEVICE) @ gpu.decode(on_gpu).transpose(-1, -2), rtol=1e-4, atol=tol)
    # Values: the weighted sum from codes on either device, and against weights @ dequantised values.
    v = torch.randn(B, H, T, D, generator=gen)
    # 2 and 2.25-bit values: the 4-D codebook as the default (256 points a byte; 512 points in 9-bit codes)
    book = "vq4" if bits in (2, 2.25) else "scalar"
    vc = TurboValues(rotation(D, 9), bits, D, 9, codebook=book, norm_bits=norm_bits)
    vg = TurboValues(rotation(D, 9), bits, D, 9, codebook=book, norm_bits=norm_bits).to(DEVICE)
    sv = vc.encode(v)
    svg_own = vg.encode(v.to(DEVICE))  # the GPU's own codes (the encode kernel) against the CPU's
    assert set(svg_own) == set(sv)
    for name, (b, _, _) in zip(["value_codes", "value_codes_hi"], vc.parts):
        assert svg_own[name].shape == sv[name].shape and svg_own[name].dtype == torch.uint8
        same = unpack(svg_own[name].cpu(), b) == unpack(sv[name], b)
        assert same.float().mean() > 0.999
    _same_scales(svg_own, sv, "value_norms")
    w = torch.softmax(3 * torch.randn(B, H, Q, T, generator=gen), -1)
    ref = vc.weighted_sum(w, sv)
    svg = {n: t.to(DEVICE) for n, t in sv.items()}
    got = vg.weighted_sum(w.to(DEVICE), svg)
    tol = 1e-4 * ref.abs().max().item()
    torch.testing.assert_close(got.cpu(), ref, rtol=1e-4, atol=tol)
    torch.testing.assert_close(got, w.to(DEVICE) @ vg.decode(svg), rtol=1e-4, atol=tol)
