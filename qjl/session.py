"""A question-answering session: one prefill of a document, many questions.

The prompt is split so the document prefix (chat template opening, instructions,
document) is a token-exact prefix of every question's prompt: prefix and
question suffix are tokenised separately and their ids concatenated. Every
question is checked against the context before anything runs. Independent
questions: after each answer the cache rolls back to the document state (the
tail is dropped). A conversation (`remember`): the turns stay in the exact tail,
and the next prompt feeds only the tokens after what the tail already holds
(qjl/conversation.py); when the turns outgrow the context the oldest are dropped.
"""

from __future__ import annotations

import json
import time
from typing import Callable, Iterator, Sequence

import torch

from .cache import make_cache
from .config import QJLConfig
from .conversation import ContextFullError, Conversation, question_too_long, turn_template
from .errors import ConfigError, DocumentTooLongError  # noqa: F401 - re-exported
from .models import LoadedModel
from .results import Answer, DocumentStats, GenerationTiming  # noqa: F401 - re-exported
from .truncation import CUT_TRIES, MERGE_SLACK, TRUNCATE_MODES, TRUNCATION_MARK, cut_text, document_spans

SYSTEM_PROMPT = "You answer questions about a document. Answer briefly, using only the document."
USER_TEMPLATE = "Read the document and answer the question after it.\n\n<document>\n{document}\n</document>\n\n"
QUESTION_TEMPLATE = "Question: {question}"
_SLOT = "\u2063QJL-QUESTION-SLOT\u2063"
# Tokens kept free for the question and its answer when checking a document against the context.
QUESTION_RESERVE = 64


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
        self.device = loaded.input_device  # the embedding's: under a device map, accelerate moves ids on
        self.remember = False  # True: a conversation, each answer sees the kept turns
        self.conversation: Conversation | None = None
        self._tail: list[int] | None = []  # the ids the cache's tail holds; None: unknown (an interrupted step)

    # --- document ------------------------------------------------------------------------
    def new_cache(self):
        return make_cache(self.model.config, self.config, self.loaded.layer_devices)

    def tokenize_document(self, document: str) -> list[int]:
        prefix, self.suffix_template = split_prompt(self.tokenizer, document)
        return self.tokenizer(prefix, add_special_tokens=False)["input_ids"]

    def check_fits(self, n_tokens: int, max_new_tokens: int, reserve: int = QUESTION_RESERVE) -> None:
        if n_tokens > self.limit(max_new_tokens, reserve):
            raise DocumentTooLongError(n_tokens, self.limit(max_new_tokens, reserve), self.loaded.context_length)

    def check_max_new_tokens(self, max_new_tokens: int) -> None:
        """A `max_new_tokens` that cannot fit the context even with an empty document is a ConfigError."""
        prefix, suffix = split_prompt(self.tokenizer, "")
        need = len(self.tokenizer(prefix + suffix.format(question=""), add_special_tokens=False)["input_ids"])
        most = self.loaded.context_length - need - QUESTION_RESERVE
        if max_new_tokens > most:
            raise ConfigError(f"--max-new-tokens {max_new_tokens:,} cannot fit the model's context of "
                              f"{self.loaded.context_length:,} tokens even with an empty document (the prompt and "
                              f"a question need {need + QUESTION_RESERVE:,}); give at most {max(most, 1):,}")

    def _start(self) -> None:
        """A fresh document state: no turns, an empty tail; the conversation's templates from the tokenizer."""
        first = USER_TEMPLATE.format(document="") + QUESTION_TEMPLATE.format(question="?")
        follow = turn_template(self.tokenizer, SYSTEM_PROMPT, first, QUESTION_TEMPLATE)
        self.conversation = Conversation(lambda text: self.tokenizer(text, add_special_tokens=False)["input_ids"],
                                         self.suffix_template, follow)
        self._tail = []

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
                      truncate: str | None = None, questions: Sequence[str] = ()) -> DocumentStats:
        """Tokenise, check the document and every question of `questions` fit (or cut the document: `truncate`
        head|tail|middle keeps that part), prefill.

        With a cut, stats.extra["truncated"] says what was kept and dropped, in tokens and characters."""
        self.check_max_new_tokens(max_new_tokens)
        ids = self.tokenize_document(document)
        reserve = self._reserve(questions, max_new_tokens)
        cut = None
        if truncate and len(ids) > self.limit(max_new_tokens, reserve):
            ids, cut = self.truncate_document(document, len(ids), max_new_tokens, truncate, reserve)
        self.check_fits(len(ids), max_new_tokens, reserve)
        self._start()
        stats = self.prefill(ids, chunk=chunk, progress=progress)
        if cut:
            stats.extra["truncated"] = cut
        return stats

    def limit(self, max_new_tokens: int, reserve: int = QUESTION_RESERVE) -> int:
        """Most document-prefix tokens that leave room for a question (`reserve`) and `max_new_tokens`."""
        return self.loaded.context_length - reserve - max_new_tokens

    def _reserve(self, questions: Sequence[str], max_new_tokens: int) -> int:
        """Room for the longest of `questions` (at least QUESTION_RESERVE); one that cannot fit even with an
        empty document raises ContextFullError now, before any prefill."""
        longest = max((len(self.question_ids(q)) for q in questions), default=0)
        prefix = len(self.tokenizer(split_prompt(self.tokenizer, "")[0], add_special_tokens=False)["input_ids"])
        if prefix + longest + max_new_tokens > self.loaded.context_length:
            raise question_too_long(longest, prefix, 0, max_new_tokens, self.loaded.context_length)
        return max(QUESTION_RESERVE, longest)

    def truncate_document(self, document: str, prompt_tokens: int, max_new_tokens: int,
                          mode: str, reserve: int = QUESTION_RESERVE) -> tuple[list[int], dict]:
        """Keep the head, tail or both ends of the document so the prompt prefix fits; a marker shows the cut.

        Cuts on token boundaries of the document tokenised alone, then re-tokenises the whole prefix and
        cuts further until it fits (a boundary can merge or split a token or two)."""
        if mode not in TRUNCATE_MODES:
            raise ValueError(f"truncate must be one of {', '.join(TRUNCATE_MODES)}, not {mode!r}")
        limit = self.limit(max_new_tokens, reserve)
        doc_ids, spans = document_spans(self.tokenizer, document)
        n_doc = len(doc_ids)
        overhead = prompt_tokens - n_doc
        mark = len(self.tokenizer(TRUNCATION_MARK, add_special_tokens=False)["input_ids"])
        keep = limit - overhead - mark - MERGE_SLACK
        for _ in range(CUT_TRIES):
            if keep <= 0:
                break
            text = cut_text(document, spans, keep, mode)
            ids = self.tokenize_document(text)
            if len(ids) <= limit:
                dropped = n_doc - keep
                return ids, {"mode": mode, "document_tokens": prompt_tokens, "kept_tokens": len(ids),
                             "dropped_tokens": dropped, "dropped_chars": len(document) - len(text)
                             + len(TRUNCATION_MARK), "limit": limit}
            keep -= max(1, len(ids) - limit)
        self.tokenize_document(document)  # the suffix template of the whole document again
        raise ContextFullError(
            f"the document is {prompt_tokens:,} tokens and even cut (--truncate) none of it fits: the model's context "
            f"is {self.loaded.context_length:,} tokens, of which the question and --max-new-tokens "
            f"{max_new_tokens:,} take {reserve + max_new_tokens:,}; lower --max-new-tokens or shorten the question",
            prompt_tokens, max(limit, 0), self.loaded.context_length)

    # --- cache files (qjl/store.py) and the automatic document cache (qjl/doccache.py) ------------
    def cache_key(self, document: str, max_new_tokens: int = 256, truncate: str | None = None,
                  questions: Sequence[str] = ()) -> str:
        """The automatic cache's name (qjl/doccache.py) of the prefix load_document would build: the text, the
        model (identity, dtype, device), the settings, the prompt, the cut when one applies, the file format."""
        from .cachefile import FORMAT_VERSION
        from .doccache import document_key

        n = len(self.tokenize_document(document))
        limit = self.limit(max_new_tokens, self._reserve(questions, max_new_tokens))
        cut = {"truncate": truncate, "limit": limit} if truncate and n > limit else {}
        shape = json.dumps({**cut, "prompt": "".join(split_prompt(self.tokenizer, ""))}, sort_keys=True)
        model = f"{self.loaded.identity}:{self.loaded.dtype}:{self.loaded.placement}"
        return document_key(document, model, self.config.to_json(), shape, FORMAT_VERSION)

    def save_cache(self, path, source_info: dict | None = None):
        """Write the document segment (a frozen --kv qjl cache) to a .qjl file; returns its path."""
        from .store import save_cache

        return save_cache(path, self.cache, model_name=self.loaded.name, identity=self.loaded.identity,
                          suffix_template=self.suffix_template, source=source_info, dtype=str(self.loaded.dtype),
                          revision=self.loaded.revision)

    def load_cache(self, path, max_new_tokens: int = 256, questions: Sequence[str] = ()) -> DocumentStats:
        """Answer from a saved .qjl file instead of a prefill: cache, settings and prompt template come from it.

        Checks that the document leaves room for `max_new_tokens` and the longest of `questions` (as
        load_document does); stats.extra gets the file and the load time."""
        from .store import load_cache

        t0 = time.perf_counter()
        self.check_max_new_tokens(max_new_tokens)
        cache, meta = load_cache(path, self.loaded)  # each layer's tensors on its layer's device
        self.cache, self.config = cache, cache.config
        self.document_tokens = meta["document_tokens"]
        self.suffix_template = meta["suffix_template"]
        self.check_fits(self.document_tokens, max_new_tokens, self._reserve(questions, max_new_tokens))
        self._start()
        stats = self.stats(0.0)
        stats.extra.update(cache_file=str(path), cache_load_s=round(time.perf_counter() - t0, 4))
        return stats

    def stats(self, prefill_s: float = 0.0) -> DocumentStats:
        return DocumentStats(self.document_tokens, prefill_s, self.cache.document_nbytes(),
                             self.cache.bits_per_number(), self.cache.fp16_nbytes())

    # --- questions and conversations -----------------------------------------------------------
    def rollback(self) -> None:
        """Back to the document state: the conversation's turns and every tail token leave the cache."""
        if self.conversation is not None:
            self.conversation.clear()
        self._drop_tail()

    def _drop_tail(self) -> None:
        self.cache.rollback()
        self._tail = []

    def history(self) -> list[tuple[str, str]]:
        """The kept turns of the conversation: (question, answer), oldest first."""
        return [(t.question, t.answer) for t in (self.conversation.turns if self.conversation else [])]

    def tail_tokens(self) -> int:
        """Tokens in the cache after the document (the conversation's, between questions)."""
        return self.cache.get_seq_length() - self.document_tokens if self.cache is not None else 0

    def question_ids(self, question: str) -> list[int]:
        return self.tokenizer(self.suffix_template.format(question=question.strip()),
                              add_special_tokens=False)["input_ids"]

    def _prompt(self, question: str, max_new_tokens: int, timing: GenerationTiming) -> list[int]:
        """The ids to feed for `question`: checked against the context (ContextFullError), the oldest turns of a
        conversation dropped to fit; only what follows the ids the tail already holds (else the tail is dropped)."""
        room = self.loaded.context_length - self.document_tokens - max_new_tokens
        history, q, dropped = [], self.question_ids(question), 0
        if self.remember:
            history, q, dropped = self.conversation.prompt(question, room)
        if len(history) + len(q) > room:
            raise question_too_long(len(q), self.document_tokens, len(history), max_new_tokens,
                                    self.loaded.context_length)
        timing.question_tokens, timing.history_tokens, timing.dropped_turns = len(q), len(history), dropped
        prompt, tail = history + q, self._tail
        if tail is not None and len(tail) < len(prompt) and prompt[:len(tail)] == tail:
            return prompt[len(tail):]
        self._drop_tail()
        return prompt

    @torch.inference_mode()
    def generate(self, question: str, max_new_tokens: int = 256,
                 timing: "GenerationTiming | None" = None) -> Iterator[str]:
        """Greedy answer to `question`, yielded as text pieces. Independent questions: the cache is rolled back
        afterwards; a conversation (`remember`) keeps the turn in the tail.

        `timing`, when given, is filled in as tokens come (ask() reads it for its Answer)."""
        if self.cache is None:
            raise RuntimeError("no document loaded")
        timing = timing if timing is not None else GenerationTiming()
        feed = self._prompt(question, max_new_tokens, timing)
        generated: list[int] = []
        emitted, answered = "", False
        t0 = time.perf_counter()
        try:
            for step in range(max_new_tokens):
                tail, self._tail = self._tail, None  # unknown while the model writes to the cache
                logits = self.model(input_ids=torch.tensor([feed], device=self.device), past_key_values=self.cache,
                                    use_cache=True, logits_to_keep=1).logits
                self._tail, answered = tail + feed, True
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
                feed = [token]
        finally:
            if self.remember and answered:
                self.conversation.add(question, self.tokenizer.decode(generated, skip_special_tokens=True).strip(),
                                      generated)
            if not self.remember or self._tail is None:
                self._drop_tail()
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
            stopped=stopped, history_tokens=t.history_tokens, dropped_turns=t.dropped_turns,
        )


def _decoder_layers(model) -> list:
    inner = getattr(model, "model", model)
    return list(getattr(inner, "layers", []))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
