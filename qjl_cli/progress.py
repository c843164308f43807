"""The slow steps with a spinner or a bar on a terminal (none off one): model, documents, prefill, cache file."""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Optional, Sequence

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, SpinnerColumn, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)
from rich.text import Text

from . import seams
from .render import say, truncation, warn

if TYPE_CHECKING:
    from qjl.results import DocumentStats

    from .seams import LoadedModelLike, SessionLike


def load_model(spec: Optional[str], console: Console, placement=None, fit=None) -> LoadedModelLike:
    """The model, placed as `placement` says (qjl.placement.Placement); `fit`: what must fit --max-memory."""
    if not console.is_terminal:
        # No bars off a terminal; a first conversion of a GGUF file still says why it takes half a minute.
        return seams.load_model(spec, progress=lambda message: say(console, f"qjl: {message}"), placement=placement,
                                fit=fit)
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                  console=console, transient=True) as bar:
        what = spec or os.environ.get("QJL_MODEL")
        task = bar.add_task(f"Loading model {what}" if what else "Loading the embedded model", total=None)
        t0 = time.perf_counter()
        loaded = seams.load_model(spec, progress=lambda message: bar.update(task, description=message),
                                  placement=placement, fit=fit)
    say(console, f"Loaded {loaded.name} in {time.perf_counter() - t0:.1f} s", style="dim")
    return loaded


def read_documents(files: list[str], password: Optional[str], console: Console, max_chars: Optional[int] = None,
                   truncate: Optional[str] = None) -> tuple[str, str]:
    """Read the documents, at most `max_chars` of text (past it: TextTooLongError, or with `truncate` that part
    kept, with a warning); PDF pages extracted are shown as a bar on a terminal."""
    from qjl.documents import Bound

    bound = Bound(max_chars, truncate)
    text, name = _read(files, password, console, bound)
    if bound.cut:
        warn(console, f"--truncate {truncate}: the text is longer than {max_chars:,} characters, more than the "
                      f"model's context can hold; only {max_chars:,} characters ({truncate}) were read")
    return text, name


def _read(files: list[str], password: Optional[str], console: Console, bound) -> tuple[str, str]:
    from qjl.documents import read_documents

    if not console.is_terminal:
        return read_documents(files, password=password, bound=bound)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("pages"),
                  TimeRemainingColumn(), console=console, transient=True) as bar:
        tasks: dict = {}

        def progress(done: int, total: int, what: str) -> None:
            if what not in tasks:
                tasks[what] = bar.add_task(f"Extracting {what}", total=total)
            bar.update(tasks[what], completed=done)

        return read_documents(files, password=password, progress=progress, bound=bound)


def prefill(session: SessionLike, text: str, max_new_tokens: int, chunk: Optional[int], console: Console,
            truncate: Optional[str] = None, questions: Sequence[str] = ()) -> DocumentStats:
    """Read the document into the session's cache (after checking every one of `questions` fits); a bar of
    tokens on a terminal, a warning if it was cut."""
    if not console.is_terminal:
        stats = session.load_document(text, max_new_tokens=max_new_tokens, chunk=chunk, truncate=truncate,
                                      questions=questions)
    else:
        with Progress(TextColumn("Reading document"), BarColumn(), MofNCompleteColumn(), TextColumn("tokens"),
                      _TokensPerSecond(), TimeRemainingColumn(), console=console, transient=True) as bar:
            task = bar.add_task("prefill", total=None)

            def progress(done: int, total: int) -> None:
                bar.update(task, completed=done, total=total)

            stats = session.load_document(text, max_new_tokens=max_new_tokens, chunk=chunk, progress=progress,
                                          truncate=truncate, questions=questions)
    cut = stats.extra.get("truncated")
    if cut:
        warn(console, truncation(cut))
    return stats


def load_cache(session: SessionLike, file: str, max_new_tokens: int, console: Console,
               questions: Sequence[str] = ()) -> DocumentStats:
    """The session answers from the cache file (the session checks the fit of the document and of every one of
    `questions`, and times the load)."""
    if not console.is_terminal:
        return session.load_cache(file, max_new_tokens, questions)
    with console.status(f"Loading cache {file}", spinner="dots"):
        return session.load_cache(file, max_new_tokens, questions)


class _TokensPerSecond(ProgressColumn):
    def render(self, task) -> Text:
        return Text(f"{task.speed:,.0f} tokens/s" if task.speed else "? tokens/s")
