"""Cutting a document to fit the context (`--truncate head|tail|middle`): token spans and the cut itself.

qjl/session.py's truncate_document decides how many tokens to keep; this module cuts the text there.
"""

from __future__ import annotations

TRUNCATE_MODES = ("head", "tail", "middle")
TRUNCATION_MARK = "\n[... part of the document left out here to fit the model's context ...]\n"
# Tokens given up at the first cut: the cut's edges can merge with the marker into a token or two more.
MERGE_SLACK = 2
# Cuts tried before giving up: each one shortens by the measured overshoot, so two or three suffice.
CUT_TRIES = 16


def cut_text(document: str, spans: list[tuple[int, int]], keep: int, mode: str) -> str:
    """The document with only `keep` of its tokens (by character spans), the rest replaced by a marker."""
    n = len(spans)
    if keep >= n:
        return document
    if mode == "head":
        return document[:spans[keep - 1][1]] + TRUNCATION_MARK
    if mode == "tail":
        return TRUNCATION_MARK + document[spans[n - keep][0]:]
    head = (keep + 1) // 2
    tail = keep - head
    end = spans[head - 1][1] if head else 0
    start = spans[n - tail][0] if tail else len(document)
    return document[:end] + TRUNCATION_MARK + document[start:]


def document_spans(tokenizer, document: str) -> tuple[list[int], list[tuple[int, int]]]:
    """The document's token ids and each token's character span (by decoding, for a slow tokenizer)."""
    try:
        enc = tokenizer(document, add_special_tokens=False, return_offsets_mapping=True)
        return enc["input_ids"], [tuple(o) for o in enc["offset_mapping"]]
    except (NotImplementedError, ValueError, TypeError, KeyError):  # a slow tokenizer: spans by decoding
        ids = tokenizer(document, add_special_tokens=False)["input_ids"]
        spans, pos = [], 0
        for i in range(len(ids)):
            end = min(len(document), len(tokenizer.decode(ids[:i + 1])))
            spans.append((pos, max(pos, end)))
            pos = max(pos, end)
        return ids, spans
