"""Needle in a haystack: is a sentence hidden at some depth of Paul Graham's essays found through each cache?"""

from __future__ import annotations

from typing import Callable

import torch

from ..config import QJLConfig
from .perplexity import essays_text

NEEDLE = "The secret code for the blue vault is {code}."
NEEDLE_QUESTION = "What is the secret code for the blue vault? Answer with the number only."
# Tokens of the prompt around a needle document (chat template, instructions, the needle itself) and of the
# question and answer: a document of context - NEEDLE_MARGIN tokens fits a model of that context.
NEEDLE_MARGIN = 192


def needle_document(tokenizer, haystack: str, tokens: int, depth: float, code: str) -> str:
    """The first `tokens` tokens of `haystack` with the needle sentence put at `depth` (0..1) of the text,
    at the sentence boundary nearest to it."""
    ids = tokenizer(haystack[: tokens * 8], add_special_tokens=False)["input_ids"][:tokens]
    text = tokenizer.decode(ids)
    at = int(depth * len(text))
    cut = text.rfind(". ", 0, at)
    cut = 0 if cut < 0 else cut + 2
    return text[:cut] + NEEDLE.format(code=code) + " " + text[cut:]


def _session(loaded, spec: QJLConfig | Callable):
    """A Session whose cache is the QJLConfig's, or whatever `spec(model_config)` makes (a peer cache)."""
    from ..session import Session  # session imports bench's neighbours; keep bench importable on its own

    if isinstance(spec, QJLConfig):
        return Session(loaded, spec)

    class _FactorySession(Session):
        def new_cache(self):
            return spec(self.model.config)

    return _FactorySession(loaded, QJLConfig())


def needle(loaded, configs: dict[str, QJLConfig | Callable], lengths: list[int], depths: list[float],
           trials: int = 1, seed: int = 0, chunk: int = 512, on_row: Callable[[dict], None] | None = None,
           haystack: str | None = None) -> list[dict]:
    """Needle retrieval: one prefill per (length, depth, trial), the same documents for every config.

    configs: label -> a QJLConfig, or a function of the model config returning a fresh cache.
    A trial succeeds when the greedy answer contains the needle's code. Returns one dict per trial and config.
    """
    haystack = essays_text() if haystack is None else haystack
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for length in lengths:
        for depth in depths:
            for trial in range(trials):
                code = str(int(torch.randint(100000, 999999, (1,), generator=gen)))
                doc = needle_document(loaded.tokenizer, haystack, length, depth, code)
                for label, config in configs.items():
                    session = _session(loaded, config)
                    stats = session.load_document(doc, max_new_tokens=24, chunk=chunk)
                    answer = session.ask(NEEDLE_QUESTION, max_new_tokens=24)
                    row = {"config": label, "length": length, "document_tokens": stats.document_tokens, "depth": depth,
                           "trial": trial, "code": code, "found": code in answer.text.replace(",", ""),
                           "answer": answer.text, "bits_per_number": stats.kv_bits_per_number}
                    rows.append(row)
                    if on_row:
                        on_row(row)
    return rows
