"""Cutting a document to fit the context (`--truncate head|tail|middle`): by characters while it is read (a
bound proportional to the context, qjl/documents.py), then by tokens (qjl/session.py's truncate_document decides
how many to keep; `cut_text` cuts the text there). Torch-free.
"""

from __future__ import annotations

from typing import Optional

from .errors import DocumentTooLongError

TRUNCATE_MODES = ("head", "tail", "middle")
TRUNCATION_MARK = "\n[... part of the document left out here to fit the model's context ...]\n"
# Tokens given up at the first cut: the cut's edges can merge with the marker into a token or two more.
MERGE_SLACK = 2
# Cuts tried before giving up: each one shortens by the measured overshoot, so two or three suffice.
CUT_TRIES = 16


# Text worth reading for a context of n tokens: n x CHARS_PER_TOKEN characters (English averages about 4 a
# token; 32 leaves room for separators and whitespace runs), so the text a document expands to (KBs of
# compressed PDF content can extract to many MB) stays proportional to the context.
CHARS_PER_TOKEN = 32
KEEP_MODES = ("head", "tail", "middle")


def max_chars_for(context_tokens: int) -> int:
    return max(1, int(context_tokens)) * CHARS_PER_TOKEN


class TextTooLongError(DocumentTooLongError):
    """The text is past the character bound of the context (before any tokenizing): exit 6, naming --truncate."""

    def __init__(self, name: str, max_chars: int):
        self.document_tokens, self.limit = 0, max_chars // CHARS_PER_TOKEN
        self.context = self.limit
        Exception.__init__(self, f"{name} has more than {max_chars:,} characters of text, more than the model's "
                                 f"context of {self.context:,} tokens can hold; give --truncate head|tail|middle to "
                                 f"keep part of it, or shorten or split the document")


class Bound:
    """At most `max_chars` of text (None: no bound); past it `keep` (head|tail|middle) is kept, or without `keep`
    TextTooLongError. `cut`: characters left out (at least)."""

    def __init__(self, max_chars: Optional[int] = None, keep: Optional[str] = None):
        if keep is not None and keep not in KEEP_MODES:
            raise ValueError(f"keep must be one of {', '.join(KEEP_MODES)}, not {keep!r}")
        self.max_chars, self.keep, self.cut = max_chars, keep, 0

    def apply(self, text: str, name: str, more: bool = False) -> str:
        """`text` within the bound (`more`: text past it was not even read)."""
        if self.max_chars is None or (len(text) <= self.max_chars and not more):
            return text
        if self.keep is None:
            raise TextTooLongError(name, self.max_chars)
        n = self.max_chars
        self.cut += max(1, len(text) - n)
        head = {"head": n, "tail": 0, "middle": (n + 1) // 2}[self.keep]
        return text[:head] + text[len(text) - (n - head):] if n > head else text[:head]


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
