"""Issue 15's GPU acceptance: a random-weight Llama-3.1-8B shape with half its layers offloaded to CPU memory
(accelerate, --max-memory) against the whole model on the GPU: a 16k-token prefill, an answer, a save and a
load that answers the same; time and peak GPU memory of both printed side by side (run with -s).

    python -m pytest -q -s -m gpu tests/test_gpu_placement.py

Skipped without CUDA. Needs about 17 GB of GPU memory, 40 GB of CPU memory and a few minutes."""

from __future__ import annotations

import time

import pytest
import torch

from qjl.config import QJLConfig
from qjl.models import LoadedModel, model_identity
from qjl.placement import Placement, dispatch, human, layer_counts, layer_devices
from qjl.session import Session
from test_placement import WORDS, word_tokenizer

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

TOKENS, CHUNK, ANSWER = 16384, 2048, 8
DOCUMENT = " ".join(WORDS[2 + (i * 7919) % 254] for i in range(TOKENS - 40))
QUESTION = "w3 w141 w59 w26"
RESULTS: dict[str, dict] = {}


def _model():
    """The 8B shape with random bf16 weights, built on the CPU from one seed (the same weights every call)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from qjl.bench.spec import SHAPES

    cfg = LlamaConfig(**SHAPES["llama-3.1-8b"].config_kwargs(), eos_token_id=1, bos_token_id=1)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = LlamaForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(default)
    model.set_attn_implementation("qjl")
    return model


def _run(label: str, model, tmp_path) -> dict:
    tok = word_tokenizer()
    loaded = LoadedModel(model, tok, "llama-3.1-8b (random)", model_identity(model.config, tok, torch.bfloat16))
    torch.cuda.reset_peak_memory_stats()
    session = Session(loaded, QJLConfig())
    t0 = time.perf_counter()
    stats = session.load_document(DOCUMENT, max_new_tokens=ANSWER, chunk=CHUNK)
    prefill_s = time.perf_counter() - t0
    first = session.ask(QUESTION, max_new_tokens=ANSWER)
    path = session.save_cache(tmp_path / f"{label}.qjl")
    again = Session(loaded, QJLConfig())
    again.load_cache(path, max_new_tokens=ANSWER)
    second = again.ask(QUESTION, max_new_tokens=ANSWER)
    devices = [layer.device for layer in again.cache.layers]
    assert devices == layer_devices(model)  # every layer's cache on its layer's device, after the load too
    row = dict(layers=layer_counts(devices), tokens=stats.document_tokens, prefill_s=round(prefill_s, 1),
               decode_ms=round(first.decode_ms_per_token, 1), peak_gpu=human(torch.cuda.max_memory_allocated()),
               answer=first.text, answer_after_load=second.text, file=human(path.stat().st_size))
    assert first.generated_tokens > 0 and second.text == first.text, row
    return row


def test_half_the_8b_layers_offloaded_to_cpu(tmp_path):
    model = _model()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    placement = Placement(device_map="sequential", max_memory={0: weights // 2, "cpu": 2 * weights})
    model = dispatch(model, placement)
    counts = layer_counts(layer_devices(model))
    assert counts.get("cpu", 0) >= 12 and counts.get("cuda:0", 0) >= 12, counts
    RESULTS["half on CPU"] = _run("split", model, tmp_path)


def test_the_whole_8b_on_the_gpu(tmp_path):
    RESULTS["whole on GPU"] = _run("whole", _model().to("cuda"), tmp_path)
    for label, row in RESULTS.items():
        print(f"\n{label}: {row}")
