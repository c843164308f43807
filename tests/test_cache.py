"""The compressed cache (qjl/cache.py) with the "qjl" attention (qjl/attention.py) on tiny random Llama models.

Every model is built here from a LlamaConfig with a fixed seed: no weights, no network.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AttentionInterface, DynamicCache, LlamaConfig, LlamaForCausalLM

import qjl.attention  # noqa: F401  (registers attn_implementation "qjl")
from qjl.attention import exact_attention
from qjl.cache import QJLCache
from qjl.config import QJLConfig
from qjl.sketch import residual_constants, unpack_bits

DOC, TAIL = 600, 20
# The QJL mode as these tests were written for: no sink tokens (tested on their own below).
QJL = QJLConfig(kv="qjl", sink_tokens=0)


pytestmark = pytest.mark.usefixtures("one_thread")


def _model(head_dim=64, heads=4, kv_heads=2, layers=2, qk_scale=3.0):
    """A tiny random Llama. Its default init (std 0.02) makes every attention row nearly uniform, so keys would
    hardly matter and a broken key codec would go unnoticed; scaling the q/k projections by 3 makes attention
    depend on the keys (logits of a few units) while the model stays tame (fp32 exact logits stay < 1)."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                      max_position_embeddings=2048)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(qk_scale)
            layer.self_attn.k_proj.weight.mul_(qk_scale)
    model.set_attn_implementation("qjl")
    return model, cfg


def _ids(n, seed=1):
    return torch.randint(0, 256, (1, n), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _ask(model, cfg, ids, qjl_config, chunks=1, one_by_one=False):
    """Prefill ids[:, :DOC] into a QJLCache (in `chunks` pieces), freeze, feed the tail; tail logits and the cache."""
    cache = QJLCache(cfg, qjl_config)
    for part in ids[:, :DOC].chunk(chunks, dim=1):
        model(part, past_key_values=cache)
    cache.freeze_document()
    if one_by_one:
        logits = torch.cat([model(ids[:, i:i + 1], past_key_values=cache).logits for i in range(DOC, ids.shape[1])], 1)
    else:
        logits = model(ids[:, DOC:], past_key_values=cache).logits
    return logits, cache


def _rel(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


def _top1(a, b) -> float:
    return (a.argmax(-1) == b.argmax(-1)).float().mean().item()


SHAPES = [(64, 4, 2), (64, 4, 4), (128, 4, 2), (128, 4, 4)]  # head_dim, query heads, KV heads (GQA and not)


@pytest.mark.parametrize("head_dim,heads,kv_heads", SHAPES)
def test_tail_logits_close_to_exact(head_dim, heads, kv_heads):
    model, cfg = _model(head_dim, heads, kv_heads)
    ids = _ids(DOC + TAIL)
    with torch.no_grad():
        exact = model(ids).logits[:, DOC:]  # no cache: exact attention over everything
        # Baseline: the same tail after a different random document, i.e. a cache that carries no information
        # about the document. Measured 0.57-0.81 relative error.
        unrelated = model(torch.cat([_ids(DOC, seed=2), ids[:, DOC:]], 1)).logits[:, DOC:]
    qjl, cache = _ask(model, cfg, ids, QJL)
    assert cache.layers[0].n_compressed == 512 and cache.get_seq_length() == DOC + TAIL
    crude, _ = _ask(model, cfg, ids, QJL.replace(sketch_ratio=0.25))  # a sketch 8x smaller
    keys_only, _ = _ask(model, cfg, ids, QJL.replace(value_bits=8))  # near-exact values: the key codec's own error
    keys_only_crude, _ = _ask(model, cfg, ids, QJL.replace(value_bits=8, sketch_ratio=0.25))
    err, err_last = _rel(qjl, exact), _rel(qjl[:, -1], exact[:, -1])
    # Tolerances, from measurements on these four models (seeded, so deterministic):
    # - default config (2-bit values, 2d sketch, 4-bit head outliers): relative L2 error 0.105-0.125, top-1 agrees
    #   on 15-19 of 20 positions. Most of that is the 2-bit values (8-bit values: 0.033-0.041). Bound: 0.2.
    assert err < 0.2 and err_last < 0.2, (err, err_last)
    assert _top1(qjl, exact) >= 0.6
    # - far below the no-information baseline (measured ratio <= 0.19),
    assert err < 0.3 * _rel(unrelated, exact)
    # - and well below a sketch 8x smaller (measured ratio 0.41-0.45; keys alone 0.15).
    assert err < 0.6 * _rel(crude, exact)
    k_err = _rel(keys_only, exact)
    # Near-exact values: relative error 0.033-0.041; top-1 agrees on 16-20 of 20 positions (a tiny random model's
    # logits are nearly tied, so single flips happen at unchanged error).
    assert k_err < 0.07 and _top1(keys_only, exact) >= 0.75, k_err
    assert k_err < 0.3 * _rel(keys_only_crude, exact)


@pytest.mark.parametrize("head_dim,heads,kv_heads", [(64, 4, 2), (128, 4, 4)])
def test_decoding_one_token_at_a_time_equals_one_chunk(head_dim, heads, kv_heads):
    # After freezing, tail tokens are exact, so feeding them one by one (L = 1: no mask) or as one causal chunk
    # computes the same attention; only float32 summation order differs.
    model, cfg = _model(head_dim, heads, kv_heads)
    ids = _ids(DOC + 8, seed=3)
    chunk, _ = _ask(model, cfg, ids, QJL)
    steps, _ = _ask(model, cfg, ids, QJL, one_by_one=True)
    torch.testing.assert_close(steps, chunk, rtol=0, atol=1e-5)


def test_chunked_prefill_close_to_exact():
    # Prefill in 3 chunks of 200: later chunks attend the compressed earlier ones, so the document's own K/V
    # carry the compression error forward and the error is larger than with one chunk (measured 0.16-0.24
    # against 0.11-0.12); the bound still separates it from a cache without the document (0.77).
    model, cfg = _model(64, 4, 2)
    ids = _ids(DOC + TAIL)
    with torch.no_grad():
        exact = model(ids).logits[:, DOC:]
        unrelated = model(torch.cat([_ids(DOC, seed=2), ids[:, DOC:]], 1)).logits[:, DOC:]
    chunked, cache = _ask(model, cfg, ids, QJL, chunks=3)
    assert cache.document_tokens == DOC
    err = _rel(chunked, exact)
    assert err < 0.3 and err < 0.4 * _rel(unrelated, exact), err


def test_batch_of_documents_equals_each_alone():
    # Batches without padding: each row's mean, outlier channels and codes are its own, so a batch of two
    # documents gives exactly what each gives alone (measured: bit-identical on this CPU; 1e-5 allowed).
    model, cfg = _model(64, 4, 2)
    ids = torch.cat([_ids(300, seed=1), _ids(300, seed=2)])
    with torch.no_grad():
        cache = QJLCache(cfg, QJL)
        model(ids[:, :280], past_key_values=cache)
        cache.freeze_document()
        both = model(ids[:, 280:], past_key_values=cache).logits
        for b in range(2):
            alone = QJLCache(cfg, QJL)
            model(ids[b:b + 1, :280], past_key_values=alone)
            alone.freeze_document()
            torch.testing.assert_close(model(ids[b:b + 1, 280:], past_key_values=alone).logits, both[b:b + 1],
                                       rtol=0, atol=1e-5)
    assert not torch.allclose(both[0], both[1])


# --- the attention function against a reference built from the codecs -----------------------

@pytest.mark.parametrize("heads,kv_heads,L", [(4, 2, 3), (4, 4, 1), (6, 2, 5)])
def test_compressed_attention_matches_reference(heads, kv_heads, L):
    """QJLLayer.attend = softmax over [codec scores of compressed keys, exact logits of window+tail with the
    causal mask] times [decoded values, exact values]; query head j reads KV head j // (heads / kv_heads)."""
    from qjl.cache import QJLLayer

    D, B, scaling = 64, 1, 0.125
    gen = torch.Generator().manual_seed(heads * 10 + L)
    layer = QJLLayer(QJL, 0, D, kv_heads)
    k_doc, v_doc = torch.randn(B, kv_heads, 200, D, generator=gen) * 2, torch.randn(B, kv_heads, 200, D, generator=gen)
    layer.update(k_doc, v_doc)
    layer.compress_excess()
    layer.freeze()
    k_tail, v_tail = torch.randn(B, kv_heads, 4 + L, D, generator=gen), torch.randn(B, kv_heads, 4 + L, D, generator=gen)
    layer.update(k_tail, v_tail)
    assert layer.n_compressed == 128 and layer.exact_length() == 72 + 4 + L
    q = torch.randn(B, heads, L, D, generator=gen) * 2
    got = layer.attend(q, scaling)

    g = heads // kv_heads
    v_c = layer.value_codec.decode(layer.value_state)  # [B, H, 128, D]
    k_e = torch.cat([k_doc[:, :, 128:].half().float(), k_tail], 2)  # window stored fp16, tail as given
    v_e = torch.cat([v_doc[:, :, 128:].half().float(), v_tail], 2)
    n_e = k_e.shape[2]
    ref = torch.empty(B, heads, L, D)
    for hq in range(heads):
        h = hq // g
        qh = q[:, hq:hq + 1]  # [B, 1, L, D]
        state_h = {n: t[:, h:h + 1] for n, t in layer.key_state.items()}
        codec = layer.key_codec
        saved = codec.head_outliers
        codec.head_outliers = None if saved is None else saved[:, h:h + 1]
        logits_c = codec.scores(qh, state_h)  # [B, 1, L, 128]
        codec.head_outliers = saved
        # the softmax correction: half the sign estimate's variance, v (|q'|^2 scale^2 - est^2)+ * 0.75, with v
        # residual signs' measured unit (qjl/sketch.py; the paper's signs: (pi/2 - 1)/m)
        qs = qh.clone()
        qs[..., saved[0, h]] = 0.0  # the query less its channels kept apart
        sgn = unpack_bits(state_h["key_signs"]).float() * 2 - 1  # [B, 1, T, m]
        n = state_h["key_norms"].float().unsqueeze(2)
        est = codec.scale * n * ((qs @ codec.projection.T) @ sgn.transpose(2, 3))
        unit = residual_constants(codec.sketch_dim, D, D // 8, QJL.sketch_residual_weight)[1]
        var = unit * (qs.square().sum(-1, keepdim=True) * n ** 2 - est ** 2)
        logits_c = (logits_c - 0.75 * var.clamp_min(0) / 2 * scaling) * scaling
        logits_e = (qh @ k_e[:, h:h + 1].transpose(2, 3)) * scaling  # [B, 1, L, n_e]
        for i in range(L):  # query i is position n_e - L + i of the exact part
            logits_e[..., i, n_e - L + i + 1:] = float("-inf")
        w = torch.softmax(torch.cat([logits_c, logits_e], -1), -1)
        ref[:, hq] = (w[..., :128] @ v_c[:, h:h + 1] + w[..., 128:] @ v_e[:, h:h + 1])[:, 0]
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


# --- nothing compressed: exact up to fp16 storage -------------------------------------------

_DOC_LEN = [0]


def _fp16_document_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Exact attention with the first _DOC_LEN keys/values rounded to fp16, as QJLLayer stores an fp32 model's
    document window; later (tail) positions stay fp32, as the cache's tail does."""
    n = _DOC_LEN[0]
    key, value = key.clone(), value.clone()
    key[:, :, :n] = key[:, :, :n].half().float()
    value[:, :, :n] = value[:, :, :n].half().float()
    out = exact_attention(query, key, value, scaling if scaling is not None else query.shape[-1] ** -0.5)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register("qjl_test_fp16_document", _fp16_document_attention)


@pytest.mark.parametrize("head_dim,heads,kv_heads", [(64, 4, 2), (128, 4, 4)])
def test_uncompressed_cache_is_exact(head_dim, heads, kv_heads):
    model, cfg = _model(head_dim, heads, kv_heads)
    ids = _ids(DOC + TAIL)
    logits, cache = _ask(model, cfg, ids, QJL.replace(buffer=1024))  # buffer >= document: nothing compressed
    assert all(layer.n_compressed == 0 for layer in cache.layers)
    assert cache.layers[0].window_k.dtype == torch.float16  # fp32 model, 16-bit document storage
    with torch.no_grad():
        exact = model(ids).logits[:, DOC:]
        model.set_attn_implementation("qjl_test_fp16_document")
        _DOC_LEN[0] = DOC
        rounded = model(ids).logits[:, DOC:]
        model.set_attn_implementation("qjl")
    # Against plain fp32 attention: fp16 storage of the document rounds each K/V number by up to 2^-11 relative;
    # measured 1.3e-4 to 1.6e-4 max abs difference on logits below 1. Bound: 1e-3 of the largest logit.
    assert (logits - exact).abs().max() < 1e-3 * exact.abs().max()
    assert (logits - exact).abs().max() > 0  # the rounding is real: this is not comparing a tensor with itself
    # Against exact attention on the same fp16-rounded document K/V: only float32 summation order differs: 1e-5.
    torch.testing.assert_close(logits, rounded, rtol=0, atol=1e-5)


# --- attention sinks ---------------------------------------------------------------------------
@pytest.mark.parametrize("kv", ["qjl", "turbo"])
@pytest.mark.parametrize("chunks", [1, 7])
def test_sink_holds_the_first_tokens_exactly(kv, chunks):
    model, cfg = _model()
    ids = _ids(DOC + TAIL)
    with torch.no_grad():
        ref = DynamicCache(config=cfg)
        model(ids[:, :DOC], past_key_values=ref)
    config = QJLConfig(kv=kv, sink_tokens=4)
    logits, cache = _ask(model, cfg, ids, config, chunks=chunks)
    for i, layer in enumerate(cache.layers):
        assert layer.sink_k.shape[2] == 4
        # fp16 storage of the model's own K/V for tokens 0..3 (up to rounding: chunking changes summation order)
        for mine, theirs in ((layer.sink_k, ref.layers[i].keys), (layer.sink_v, ref.layers[i].values)):
            assert mine.dtype == torch.float16
            torch.testing.assert_close(mine.float(), theirs[:, :, :4], rtol=3e-3, atol=3e-3)
        assert layer.document_length() == DOC and layer.n_compressed % config.group_size == 0
        assert layer.n_compressed == (DOC - 4 - config.exact_buffer()) // config.group_size * config.group_size
    # the sink is counted, in 16 bits: in the file's tensors and in the byte total, which are summed apart
    H, D = cfg.num_key_value_heads, cfg.head_dim
    for layer in cache.layers:
        tensors = layer.document_tensors()
        assert tensors["sink_keys"].numel() * 2 == H * 4 * D * 2 == tensors["sink_values"].numel() * 2
        shared = {"projection", "rotation", "value_rotation"}
        assert layer.document_nbytes(count_shared=False) == sum(
            t.numel() * t.element_size() for n, t in tensors.items() if n not in shared)


def test_sink_makes_the_compressed_cache_closer_to_exact():
    """Real attention sinks: the first token draws most weight when the model is made to; keeping it exact helps."""
    model, cfg = _model()
    ids = _ids(DOC + TAIL)
    with torch.no_grad():
        exact = model(ids).logits[:, DOC:]
    plain = _ask(model, cfg, ids, QJLConfig(kv="turbo", turbo_key_bits=2, turbo_value_bits=2, sink_tokens=0))[0]
    sunk = _ask(model, cfg, ids, QJLConfig(kv="turbo", turbo_key_bits=2, turbo_value_bits=2, sink_tokens=4))[0]
    assert _rel(sunk, exact) < _rel(plain, exact)


def test_a_document_shorter_than_the_sink():
    model, cfg = _model()
    ids = _ids(30)
    cache = QJLCache(cfg, QJLConfig(kv="qjl", sink_tokens=8))
    with torch.no_grad():
        model(ids[:, :3], past_key_values=cache)
        cache.freeze_document()
        tail = model(ids[:, 3:], past_key_values=cache).logits
        exact = model(ids).logits[:, 3:]
    layer = cache.layers[0]
    assert layer.sink_k.shape[2] == 3 and layer.window_k is None and layer.n_compressed == 0
    assert cache.document_tokens == 3 and layer.document_tensors()["window_keys"].shape[2] == 0
    assert (tail - exact).abs().max() < 1e-3 * exact.abs().max()


# --- rollback ---------------------------------------------------------------------------------

def _snapshot(cache):
    return [{name: t.clone() for name, t in layer.document_tensors().items()} for layer in cache.layers]


def _assert_same(cache, snapshot):
    for layer, snap in zip(cache.layers, snapshot):
        now = layer.document_tensors()
        assert set(now) == set(snap)
        for name, t in snap.items():
            assert now[name].dtype == t.dtype and torch.equal(now[name], t), (layer.layer_idx, name)


@pytest.mark.parametrize("qjl_config", [QJL, QJL.replace(outlier_scope="group", outlier_bits=16,
                                                               center_keys=True)])
def test_rollback_restores_the_document_exactly(qjl_config):
    model, cfg = _model(64, 4, 2)
    doc = _ids(300, seed=5)
    q1, q2 = _ids(20, seed=6), _ids(13, seed=7)
    cache = QJLCache(cfg, qjl_config)
    with torch.no_grad():
        model(doc, past_key_values=cache)
        cache.freeze_document()
        snap = _snapshot(cache)
        assert "key_signs" in snap[0] and "window_keys" in snap[0]  # both compressed and exact parts exist
        doc_bytes = cache.document_nbytes()
        first = model(q1, past_key_values=cache).logits
        more = model(q1[:, :1], past_key_values=cache).logits  # decode a step further
        assert cache.get_seq_length() == 300 + 21 and all(layer.tail_k.shape[2] == 21 for layer in cache.layers)
        _assert_same(cache, snap)  # asking never writes into the document segment
        cache.rollback()
        _assert_same(cache, snap)
        assert cache.get_seq_length() == 300 and cache.document_tokens == 300
        assert all(layer.tail_k is None for layer in cache.layers) and doc_bytes == cache.document_nbytes()
        other = model(q2, past_key_values=cache).logits
        cache.rollback()
        again = model(q1, past_key_values=cache).logits
        cache.rollback()
        _assert_same(cache, snap)
    assert torch.equal(first, again)
    assert not torch.equal(first[:, :13], other)
    assert torch.isfinite(more).all()


# --- bits by hand -----------------------------------------------------------------------------

def _hand_count(cfg_kind, T=200, H=2, D=64, layers=1, early_layers=0):
    """Bytes of the document after a one-chunk prefill of T tokens, group 32, buffer 64, worked out by hand."""
    G, buffer = 32, 64
    Tc = (T - buffer) // G * G  # flushed in whole groups, `buffer` kept exact: 128 of 200
    W = T - Tc  # exact window: 72
    NG = Tc // G
    expected = {}
    for layer in range(layers):
        m = 2 * D * (2 if layer < early_layers else 1)  # sketch_ratio 2, early layers 2x
        r = D // 8  # outlier_fraction 1/8
        e = {
            "key_signs": H * Tc * m // 8,  # 1 bit per sketch row
            "key_norms": H * Tc * 2,  # one fp16 per key
            "window_keys": H * W * D * 2,  # fp16 exact window
            "window_values": H * W * D * 2,
        }
        if cfg_kind == "group":  # exact fp16 outliers per 32-token group, 2-bit values in groups of 32
            e["key_outlier_values"] = H * Tc * r * 2
            e["key_outlier_index"] = H * NG * r * 1  # uint8 channel numbers, per group
            e["value_codes"] = H * Tc * D * 2 // 8
            e["value_scales"] = e["value_mins"] = H * Tc * (D // 32) * 2
            e["key_mean"] = H * D * 4  # fp32 mean key per head
        else:  # the default: per-head outlier channels, 4-bit over each 32-token group; 2-bit values in groups of 64
            e["key_head_outliers"] = H * r * 8  # int64 channel numbers, once per head
            e["key_outlier_value_codes"] = H * NG * r * G * 4 // 8
            e["key_outlier_value_scales"] = e["key_outlier_value_mins"] = H * NG * r * 2
            e["value_codes"] = H * Tc * D * 2 // 8
            e["value_scales"] = e["value_mins"] = H * Tc * (D // 64) * 2
        expected[layer] = e
    # Projections: m x D float32, once per distinct matrix (one per layer class).
    projections = {2 * D * 2: 2 * D * 2 * D * 4} if early_layers else {}
    if layers > early_layers:
        projections[2 * D] = 2 * D * D * 4
    return expected, sum(projections.values())


@pytest.mark.parametrize("kind,layers,early", [("group", 1, 0), ("default", 1, 0), ("default", 2, 0),
                                               ("group", 2, 1)])
def test_document_bytes_by_hand(kind, layers, early):
    T, H, D = 200, 2, 64
    if kind == "group":
        qc = QJL.replace(outlier_scope="group", outlier_bits=16, center_keys=True, value_bits=2, value_group=32,
                       group_size=32, buffer=64, sketch_ratio=2.0, outlier_fraction=1 / 8, early_layers=early)
    else:
        qc = QJL.replace(early_layers=early)
        assert (qc.outlier_scope, qc.outlier_bits, qc.value_bits, qc.value_group, qc.group_size, qc.exact_buffer(),
                qc.sketch_ratio, qc.outlier_fraction, qc.center_keys) == ("head", 4, 2, 64, 32, 64, 2.0, 1 / 8, False)
    model, cfg = _model(D, 4, H, layers=layers)
    cache = QJLCache(cfg, qc)
    with torch.no_grad():
        model(_ids(T, seed=8), past_key_values=cache)
    cache.freeze_document()
    expected, proj_bytes = _hand_count(kind, T, H, D, layers, early)
    for layer in cache.layers:
        got = {n: t.numel() * t.element_size() for n, t in layer.document_tensors().items() if n != "projection"}
        assert got == expected[layer.layer_idx]
    total = sum(sum(e.values()) for e in expected.values()) + proj_bytes
    assert cache.document_nbytes() == total
    if kind == "group" and layers == 1:
        assert total == 4096 + 512 + 4096 + 64 + 4096 + 2048 + 36864 + 512 + 32768  # written out: 85,056
    numbers = 2 * T * layers * H * D
    assert cache.bits_per_number() == pytest.approx(8 * total / numbers, rel=1e-12)
    assert cache.fp16_nbytes() == 2 * numbers
    assert cache.document_tokens == T


# --- dtypes -----------------------------------------------------------------------------------

def _cpu_supports(dtype) -> bool:
    try:
        a = torch.ones(4, 4, dtype=dtype)
        return bool(torch.isfinite(a @ a).all())
    except RuntimeError:
        return False


@torch.no_grad()
def _prefill_and_decode(model, cfg, ids, n_doc):
    """Prefill n_doc tokens, then 3 single-token steps and a chunk of 5: logits of the 8 tail positions."""
    cache = QJLCache(cfg, QJL)
    model(ids[:, :n_doc], past_key_values=cache)
    cache.freeze_document()
    steps = [model(ids[:, n_doc + i:n_doc + i + 1], past_key_values=cache).logits for i in range(3)]
    chunk = model(ids[:, n_doc + 3:n_doc + 8], past_key_values=cache).logits
    return torch.cat(steps + [chunk], 1), cache


@pytest.mark.parametrize("dtype,bound", [(torch.bfloat16, 0.08), (torch.float16, 0.04)])
def test_half_precision_models_run(dtype, bound):
    if not _cpu_supports(dtype):
        pytest.skip(f"CPU matmul in {dtype} unsupported by this torch")
    model, cfg = _model(64, 4, 2)
    ids = _ids(DOC + 8, seed=9)
    with torch.no_grad():
        exact = model(ids).logits[:, DOC:]  # fp32, no cache
    ref, _ = _prefill_and_decode(model, cfg, ids, DOC)  # the same compressed run in fp32
    out, cache = _prefill_and_decode(model.to(dtype), cfg, ids, DOC)
    assert cache.layers[0].n_compressed == 512
    assert cache.layers[0].window_k.dtype == dtype and cache.layers[0].tail_k.dtype == dtype  # kept in model dtype
    assert out.dtype == dtype and out.shape == (1, 8, 256)
    assert torch.isfinite(out).all()
    # Against the fp32 compressed run: 16-bit arithmetic only (measured 0.009-0.010 fp16, 0.024-0.030 bf16,
    # whose 8-bit mantissa is 8x coarser); against exact: the compression error (about 0.12) dominates.
    assert _rel(out.float(), ref) < bound
    assert _rel(out.float(), exact) < 0.2
