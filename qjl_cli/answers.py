"""From documents or a cache file to answers: the one path every answering command takes.

`answer_documents` reads and prefills documents, `answer_cache` loads a .qjl file (`qjl ask FILE.qjl`
and `qjl cache load FILE` both come here); then `respond` answers the planned questions, or opens the
interactive loop.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable, Optional

import typer
from rich.console import Console

from qjl.config import QJLConfig

from . import progress, render, seams
from .questions import Source, questions_for
from .repl import interactive

if TYPE_CHECKING:
    from qjl.session import DocumentStats

    from .seams import LoadedModelLike, SessionLike


@dataclass
class Reply:
    """What to answer and how: the planned questions and the output options."""

    questions: list[str]
    source: Source
    model: Optional[str]
    max_new_tokens: int
    as_json: bool  # one JSON object per question (always for --questions FILE)
    no_stream: bool


def answer_documents(files: list[str], reply: Reply, config: QJLConfig, password: Optional[str],
                     chunk: Optional[int], truncate: Optional[str]) -> None:
    """Read the documents into a fresh cache, then answer."""
    text, name = progress.read_documents(files, password, render.stderr_console())

    def fill(session: SessionLike, console: Console) -> DocumentStats:
        return progress.prefill(session, text, reply.max_new_tokens, chunk, console, truncate)

    _answer(name, reply, config, fill)


def answer_cache(file: str, reply: Reply) -> None:
    """Answer from a saved cache file: its settings replace the defaults; a bad file fails before the model loads."""
    inspect_cache(file)

    def fill(session: SessionLike, console: Console) -> DocumentStats:
        return progress.load_cache(session, file, reply.max_new_tokens, console)

    _answer(file, reply, QJLConfig(), fill)


def inspect_cache(file: str) -> dict:
    """Read and check a cache file without a model (format, version, checksum): raises CacheFileError."""
    from qjl.store import inspect_cache

    return inspect_cache(file)


def _answer(name: str, reply: Reply, config: QJLConfig,
            fill: Callable[[SessionLike, Console], DocumentStats]) -> None:
    console = render.stderr_console()
    questions = questions_for(reply.source, reply.questions)
    loaded = progress.load_model(reply.model, console)
    session = seams.new_session(loaded, config)
    stats = fill(session, console)
    kv = session.config.kv  # a cache file's own mode
    if reply.source is Source.INTERACTIVE:
        interactive(session, stats, loaded, kv, name, reply.max_new_tokens, console, reply.no_stream)
        return
    answer_all(session, stats, loaded, kv, name, questions, reply.max_new_tokens, console,
               as_json=reply.as_json or reply.source is Source.FILE, no_stream=reply.no_stream)


def answer_all(session: SessionLike, stats: DocumentStats, loaded: LoadedModelLike, kv: str, name: str,
               questions: Iterable[str], max_new_tokens: int, console: Console, *,
               as_json: bool, no_stream: bool) -> None:
    """Each question from the document state, in order: answers (or JSON Lines) on stdout as they come."""
    answer, count = None, 0
    for q in questions:
        stream = not as_json and not no_stream and render.is_terminal(sys.stdout)
        answer = render.answer_once(session, q, max_new_tokens, console, stream)
        count += 1
        if as_json:
            typer.echo(json.dumps(render.result(answer, stats, loaded, kv, name, q), ensure_ascii=False))
        elif stream:
            typer.echo()
        else:
            typer.echo(answer.text)
        sys.stdout.flush()
        if answer.generated_tokens >= max_new_tokens and not answer.stopped:
            render.warn(console, f"the answer stopped at --max-new-tokens {max_new_tokens} and may be cut short; "
                                 f"raise it for a longer answer")
        if not as_json and not answer.text and not answer.stopped:
            render.warn(console, "the model gave an empty answer")
        if answer.stopped:
            raise KeyboardInterrupt
    if answer is not None and not as_json:
        render.say(console, render.summary(stats, answer, loaded, kv) + (f"; {count} questions" if count > 1 else ""),
                   style="dim")
