"""A question-answering session: one prefill of a document, many questions.

The prompt is split so the document prefix (chat template opening, instructions,
document) is a token-exact prefix of every question's prompt: prefix and
question suffix are tokenised separately and their ids concatenated. After each
answer the cache rolls back to the document state (the tail is dropped).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator

import torch

from .cache import make_cache
from .config import QJLConfig
from .errors import DocumentTooLongError  # noqa: F401 - re-exported
from .models import LoadedModel

SYSTEM_PROMPT = "You answer questions about a document. Answer briefly, using only the document."
USER_TEMPLATE = "Read the document and answer the question after it.\n\n<document>\n{document}\n</document>\n\n"
QUESTION_TEMPLATE = "Question: {question}"
_SLOT = "\u2063QJL-QUESTION-SLOT\u2063"
# Tokens kept free for the question and its answer when checking a document against the context.
QUESTION_RESERVE = 64


@dataclass
class Answer:
    text: str
    question_tokens: int
    generated_tokens: int
    first_token_s: float  # question prefill + first token
    decode_ms_per_token: float  # mean over tokens after the first
    stopped: bool = False  # True when interrupted

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class GenerationTiming:
    """Filled in by Session.generate as tokens come."""
    question_tokens: int = 0
    generated: int = 0
    first_token_s: float = 0.0  # question prefill + first token
    decode_s: float = 0.0  # every step after the first


@dataclass
class DocumentStats:
    document_tokens: int
    prefill_s: float
    kv_bytes: int
    kv_bits_per_number: float
    fp16_bytes: int
    extra: dict = field(default_factory=dict)

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.document_tokens / self.prefill_s if self.prefill_s > 0 else 0.0


def split_prompt(tokenizer, document: str) -> tuple[str, str]:
    """(prefix text, suffix template) such that prefix + suffix.format(question=q) is the full prompt."""
    messages = [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": USER_TEMPLATE.format(document=document) + QUESTION_TEMPLATE.format(question=_SLOT)},
    ]
    if getattr(tokenizer, "chat_template", None):
        rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:  # a base model: plain text with the same shape
        rendered = f"{SYSTEM_PROMPT}\n\n{messages[1]['content']}\nAnswer:"
    cut = rendered.index(QUESTION_TEMPLATE.format(question=_SLOT))
    return rendered[:cut], rendered[cut:].replace(_SLOT, "{question}")


def _stop_ids(loaded: LoadedModel) -> set[int]:
    ids = set()
    for source in (loaded.tokenizer.eos_token_id, getattr(loaded.model.generation_config, "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif source:
            ids.update(source)
    return ids


class Session:
    """Prefill a document once into a compressed (or exact) cache; answer questions from it."""

    def __init__(self, loaded: LoadedModel, config: QJLConfig | None = None):
        self.loaded = loaded
        self.config = config or QJLConfig()
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.cache = None
        self.document_tokens = 0
        self.suffix_template = ""
        self.stop_ids = _stop_ids(loaded)
        self.device = next(self.model.parameters()).device

    # --- document ------------------------------------------------------------------------
    def new_cache(self):
        return make_cache(self.model.config, self.config)

    def tokenize_document(self, document: str) -> list[int]:
        prefix, self.suffix_template = split_prompt(self.tokenizer, document)
        return self.tokenizer(prefix, add_special_tokens=False)["input_ids"]

    def check_fits(self, n_tokens: int, max_new_tokens: int) -> None:
        if n_tokens > self.limit(max_new_tokens):
            raise DocumentTooLongError(n_tokens, self.limit(max_new_tokens), self.loaded.context_length)

    @torch.inference_mode()
    def prefill(self, ids: list[int], chunk: int | None = None,
                progress: Callable[[int, int], None] | None = None) -> DocumentStats:
        """Run the model over the document prefix ids; the cache then holds the document segment."""
        self.cache = self.new_cache()
        total = len(ids)
        chunk = chunk or total
        layers = _decoder_layers(self.model)
        pos = {"start": 0, "len": 0, "layers_done": 0}

        def on_layer(module, args, output):  # progress by tokens: each layer is 1/n of its chunk
            pos["layers_done"] += 1
            progress(min(total, pos["start"] + pos["len"] * pos["layers_done"] // len(layers)), total)

        hooks = [layer.register_forward_hook(on_layer) for layer in layers] if progress else []
        t0 = time.perf_counter()
        try:
            input_ids = torch.tensor([ids], device=self.device)
            for start in range(0, total, chunk):
                piece = input_ids[:, start:start + chunk]
                pos.update(start=start, len=piece.shape[1], layers_done=0)
                self.model(input_ids=piece, past_key_values=self.cache, use_cache=True, logits_to_keep=1)
        finally:
            for h in hooks:
                h.remove()
        _sync(self.device)
        elapsed = time.perf_counter() - t0
        self.cache.freeze_document()
        self.document_tokens = total
        return self.stats(elapsed)

    def load_document(self, document: str, max_new_tokens: int = 256, chunk: int | None = None,
                      progress: Callable[[int, int], None] | None = None,
                      truncate: str | None = None) -> DocumentStats:
        """Tokenise, check the document fits (or cut it: `truncate` head|tail|middle keeps that part), prefill.

        With a cut, stats.extra["truncated"] says what was kept and dropped, in tokens and characters."""
        ids = self.tokenize_document(document)
        cut = None
        if truncate and len(ids) > self.limit(max_new_tokens):
            ids, cut = self.truncate_document(document, len(ids), max_new_tokens, truncate)
        self.check_fits(len(ids), max_new_tokens)
        stats = self.prefill(ids, chunk=chunk, progress=progress)
        if cut:
            stats.extra["truncated"] = cut
        return stats

    def limit(self, max_new_tokens: int) -> int:
        """Most document-prefix tokens that leave room for a question and `max_new_tokens` of answer."""
        return self.loaded.context_length - QUESTION_RESERVE - max_new_tokens

    def truncate_document(self, document: str, prompt_tokens: int, max_new_tokens: int,
                          mode: str) -> tuple[list[int], dict]:
        """Keep the head, tail or both ends of the document so the prompt prefix fits; a marker shows the cut.

        Cuts on token boundaries of the document tokenised alone, then re-tokenises the whole prefix and
        cuts further until it fits (a boundary can merge or split a token or two)."""
        if mode not in TRUNCATE_MODES:
            raise ValueError(f"truncate must be one of {', '.join(TRUNCATE_MODES)}, not {mode!r}")
        limit = self.limit(max_new_tokens)
        doc_ids, spans = self._document_spans(document)
        n_doc = len(doc_ids)
        overhead = prompt_tokens - n_doc
        mark = len(self.tokenizer(TRUNCATION_MARK, add_special_tokens=False)["input_ids"])
        keep = limit - overhead - mark - _MERGE_SLACK
        for _ in range(_CUT_TRIES):
            if keep <= 0:
                break
            text = _cut(document, spans, keep, mode)
            ids = self.tokenize_document(text)
            if len(ids) <= limit:
                dropped = n_doc - keep
                return ids, {"mode": mode, "document_tokens": prompt_tokens, "kept_tokens": len(ids),
                             "dropped_tokens": dropped, "dropped_chars": len(document) - len(text)
                             + len(TRUNCATION_MARK), "limit": limit}
            keep -= max(1, len(ids) - limit)
        self.tokenize_document(document)  # the suffix template of the whole document again
        raise DocumentTooLongError(prompt_tokens, limit, self.loaded.context_length)

    def _document_spans(self, document: str) -> tuple[list[int], list[tuple[int, int]]]:
        try:
            enc = self.tokenizer(document, add_special_tokens=False, return_offsets_mapping=True)
            return enc["input_ids"], [tuple(o) for o in enc["offset_mapping"]]
        except (NotImplementedError, ValueError, TypeError, KeyError):  # a slow tokenizer: spans by decoding
            ids = self.tokenizer(document, add_special_tokens=False)["input_ids"]
            spans, pos = [], 0
            for i in range(len(ids)):
                end = min(len(document), len(self.tokenizer.decode(ids[:i + 1])))
                spans.append((pos, max(pos, end)))
                pos = max(pos, end)
            return ids, spans

    # --- cache files (qjl/store.py) ---------------------------------------------------------
    def save_cache(self, path, source_info: dict | None = None):
        """Write the document segment (a frozen --kv qjl cache) to a .qjl file; returns its path."""
        from .store import save_cache

        return save_cache(path, self.cache, model_name=self.loaded.name, identity=self.loaded.identity,
                          suffix_template=self.suffix_template, source=source_info)

    def load_cache(self, path, max_new_tokens: int = 256) -> DocumentStats:
        """Answer from a saved .qjl file instead of a prefill: cache, settings and prompt template come from it.

        Checks that the document leaves room for `max_new_tokens`; stats.extra gets the file and the load time."""
        from .store import load_cache

        t0 = time.perf_counter()
        cache, meta = load_cache(path, self.loaded, device=self.device)
        self.cache, self.config = cache, cache.config
        self.document_tokens = meta["document_tokens"]
        self.suffix_template = meta["suffix_template"]
        self.check_fits(self.document_tokens, max_new_tokens)
        stats = self.stats(0.0)
        stats.extra.update(cache_file=str(path), cache_load_s=round(time.perf_counter() - t0, 4))
        return stats

    def stats(self, prefill_s: float = 0.0) -> DocumentStats:
        return DocumentStats(self.document_tokens, prefill_s, self.cache.document_nbytes(),
                             self.cache.bits_per_number(), self.cache.fp16_nbytes())

    # --- questions ------------------------------------------------------------------------
    def rollback(self) -> None:
        """Back to the document state: the question and answer tokens leave the cache."""
        self.cache.rollback()

    def question_ids(self, question: str) -> list[int]:
        return self.tokenizer(self.suffix_template.format(question=question.strip()),
                              add_special_tokens=False)["input_ids"]

    @torch.inference_mode()
    def generate(self, question: str, max_new_tokens: int = 256,
                 timing: "GenerationTiming | None" = None) -> Iterator[str]:
        """Greedy answer to `question`, yielded as text pieces; the cache is rolled back afterwards.

        `timing`, when given, is filled in as tokens come (ask() reads it for its Answer)."""
        if self.cache is None:
            raise RuntimeError("no document loaded")
        ids = torch.tensor([self.question_ids(question)], device=self.device)
        generated: list[int] = []
        emitted = ""
        timing = timing if timing is not None else GenerationTiming()
        timing.question_tokens = ids.shape[1]
        t0 = time.perf_counter()
        try:
            for step in range(max_new_tokens):
                logits = self.model(input_ids=ids, past_key_values=self.cache, use_cache=True,
                                    logits_to_keep=1).logits
                token = int(logits[0, -1].argmax())
                _sync(self.device)
                now = time.perf_counter()
                if step == 0:
                    timing.first_token_s = now - t0
                else:
                    timing.decode_s += now - t0
                t0 = now
                if token in self.stop_ids:
                    break
                generated.append(token)
                timing.generated = len(generated)
                text = self.tokenizer.decode(generated, skip_special_tokens=True)
                if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                    yield text[len(emitted):]
                    emitted = text
                ids = torch.tensor([[token]], device=self.device)
        finally:
            self.rollback()
        text = self.tokenizer.decode(generated, skip_special_tokens=True)
        if len(text) > len(emitted):
            yield text[len(emitted):]

    def ask(self, question: str, max_new_tokens: int = 256, on_text: Callable[[str], None] | None = None) -> Answer:
        pieces = []
        stopped = False
        t = GenerationTiming()
        try:
            for piece in self.generate(question, max_new_tokens, t):
                pieces.append(piece)
                if on_text:
                    on_text(piece)
        except KeyboardInterrupt:
            stopped = True
        n = t.generated
        steps_after_first = max(0, n - 1) + (1 if n < max_new_tokens and not stopped else 0)
        return Answer(
            text="".join(pieces).strip(),
            question_tokens=t.question_tokens,
            generated_tokens=n,
            first_token_s=t.first_token_s,
            decode_ms_per_token=1000 * t.decode_s / steps_after_first if steps_after_first else 0.0,
            stopped=stopped,
        )


TRUNCATE_MODES = ("head", "tail", "middle")
TRUNCATION_MARK = "\n[... part of the document left out here to fit the model's context ...]\n"
# Tokens given up at the first cut: the cut's edges can merge with the marker into a token or two more.
_MERGE_SLACK = 2
# Cuts tried before giving up: each one shortens by the measured overshoot, so two or three suffice.
_CUT_TRIES = 16


def _cut(document: str, spans: list[tuple[int, int]], keep: int, mode: str) -> str:
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


def _decoder_layers(model) -> list:
    inner = getattr(model, "model", model)
    return list(getattr(inner, "layers", []))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
