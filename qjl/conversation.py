"""The turns of a conversation about one document, and the errors of a prompt that does not fit the context.

A conversation's prompt is the document prefix (in the cache), then every kept turn, then the new question:
the first turn's question is the session's suffix template (it closes the document's user message), a later
one the turn template (it closes the previous answer and opens a new user message), both from the model's
chat template. An answer is kept as the exact token ids the model generated, so the prompt of the next turn
starts with exactly the tokens already in the cache's tail (qjl/session.py feeds only what follows them).
Torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .errors import DocumentTooLongError

_ANSWER_SLOT = "\u2063QJL-ANSWER-SLOT\u2063"
_NEXT_SLOT = "\u2063QJL-NEXT-SLOT\u2063"


class ContextFullError(DocumentTooLongError):
    """A prompt (document, kept turns, question and room for the answer) that the context cannot hold: exit 6,
    with a message of its own (it names only options that help)."""

    def __init__(self, message: str, document_tokens: int = 0, limit: int = 0, context: int = 0):
        self.document_tokens, self.limit, self.context = document_tokens, limit, context
        Exception.__init__(self, message)


def question_too_long(question_tokens: int, document_tokens: int, history_tokens: int, max_new_tokens: int,
                      context: int) -> ContextFullError:
    total = document_tokens + history_tokens + question_tokens + max_new_tokens
    history = f", the conversation {history_tokens:,}" if history_tokens else ""
    return ContextFullError(
        f"the question is {question_tokens:,} tokens; with the document ({document_tokens:,} tokens){history} and "
        f"--max-new-tokens {max_new_tokens:,} that is {total:,}, more than the model's context of {context:,} "
        f"tokens; shorten the question or lower --max-new-tokens", document_tokens, context - max_new_tokens,
        context)


def turn_template(tokenizer, system: str, first_question: str, follow_up: str) -> str:
    """The text between an answer and the next question's answer: `follow_up` with a {question} slot, after the
    end of the answer's turn (chat template), e.g. "<|im_end|>\\n<|im_start|>user\\nQuestion: {question}...".
    `first_question` is the first user message (any text)."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "system", "content": system}, {"role": "user", "content": first_question},
                    {"role": "assistant", "content": _ANSWER_SLOT},
                    {"role": "user", "content": follow_up.format(question=_NEXT_SLOT)}]
        rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:  # a base model: the plain-text shape of qjl/session.py's split_prompt
        rendered = f"{_ANSWER_SLOT}\n\n{follow_up.format(question=_NEXT_SLOT)}\nAnswer:"
    after = rendered[rendered.index(_ANSWER_SLOT) + len(_ANSWER_SLOT):]
    return after.replace(_NEXT_SLOT, "{question}")


@dataclass
class Turn:
    question: str
    answer: str
    answer_ids: list[int]  # exactly what the model generated (no stop token)


class Conversation:
    """The kept turns; `prompt` builds the ids after the document for a new question, dropping the oldest turns
    when they do not fit."""

    def __init__(self, tokenize: Callable[[str], list[int]], first_template: str, next_template: str):
        self.tokenize, self.first_template, self.next_template = tokenize, first_template, next_template
        self.turns: list[Turn] = []

    def question_ids(self, question: str, first: bool) -> list[int]:
        template = self.first_template if first else self.next_template
        return self.tokenize(template.format(question=question.strip()))

    def history_ids(self, turns: list[Turn]) -> list[int]:
        ids: list[int] = []
        for i, turn in enumerate(turns):
            ids += self.question_ids(turn.question, first=i == 0) + turn.answer_ids
        return ids

    def prompt(self, question: str, room: int) -> tuple[list[int], list[int], int]:
        """(history ids, question ids, turns dropped) with len(history + question) <= room; the oldest turns go
        first. A question that does not fit even alone gives ([], its ids, 0) and drops nothing."""
        dropped = 0
        while True:
            kept = self.turns[dropped:]
            history = self.history_ids(kept)
            q = self.question_ids(question, first=not kept)
            if len(history) + len(q) <= room or not kept:
                break
            dropped += 1
        if len(q) > room:
            return [], self.question_ids(question, first=not self.turns), 0
        del self.turns[:dropped]
        return history, q, dropped

    def add(self, question: str, answer: str, answer_ids: list[int]) -> None:
        self.turns.append(Turn(question.strip(), answer, list(answer_ids)))

    def clear(self) -> None:
        self.turns.clear()
