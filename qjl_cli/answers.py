"""From documents or a cache file to answers: the one path every answering command takes.

`answer_documents` reads and prefills documents, `answer_cache` loads a .qjl file (`qjl ask FILE.qjl`
and `qjl cache load FILE` both come here); then `respond` answers the planned questions, or opens the
interactive loop.
"""

from __future__ import annotations

import io
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Optional

import typer
from rich.console import Console

from qjl.config import QJLConfig
from qjl.errors import CacheFileError, QJLError

from . import autocache, client, progress, render, seams
from .questions import Source, questions_for
from .repl import interactive

if TYPE_CHECKING:
    from qjl.results import DocumentStats

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
    chat: bool = False  # the questions are a conversation (always in an interactive session)
    placement: object = None  # qjl.placement.Placement: one device or accelerate's device map (None: the default)


# The context assumed when the model's cannot be read without loading it: the text read is bounded by it.
DEFAULT_CONTEXT_HINT = 131072


def check_environment(reply: Reply) -> Optional[int]:
    """Before anything slow: stdout can take the answers, and --max-new-tokens is below the model's context
    (when it can be read without loading the model) -> that context, or None."""
    if reply.source is Source.INTERACTIVE:
        client.refuse_interactive()  # under `qjl serve`: the client runs it, with the terminal's foreground
    if _stdout_closed():
        raise QJLError("stdout is closed, so the answers have nowhere to go; run without closing it (>&-), or "
                       "redirect it to a file or /dev/null")
    hint = seams.context_hint(reply.model)
    if hint and reply.max_new_tokens >= hint:
        raise typer.BadParameter(f"{reply.max_new_tokens:,} cannot fit the model's context of {hint:,} tokens; "
                                 f"give fewer", param_hint="'--max-new-tokens'")
    return hint


def _stdout_closed() -> bool:
    if sys.stdout is None:  # fd 1 closed when Python started (`>&-`)
        return True
    try:
        os.fstat(sys.stdout.fileno())
    except (io.UnsupportedOperation, AttributeError, ValueError):  # not a real file (a test's stream)
        return False
    except OSError:  # closed since
        return True
    return False


def check_writable(output: str) -> None:
    """`cache save -o FILE`: FILE can be written (its folder exists and takes new files), checked before the
    prefill; the file itself is replaced by a rename in that folder."""
    path = Path(output)
    folder = path.parent
    if _is(path.is_dir):
        raise CacheFileError(f"{output} is a folder; give a file name ending in .qjl")
    if not _is(folder.is_dir):
        raise CacheFileError(f"cannot write {output}: the folder {folder} does not exist; create it first")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise CacheFileError(f"cannot write {output}: no permission to create files in {folder}; choose another "
                             f"folder")


def _is(test: Callable[[], bool]) -> bool:
    try:
        return test()
    except (OSError, ValueError):
        return False


def answer_documents(files: list[str], reply: Reply, config: QJLConfig, password: Optional[str],
                     chunk: Optional[int], truncate: Optional[str], use_cache: bool = True) -> None:
    """Read the documents (at most the text the context can hold) into a fresh cache, or load the automatic
    cache's entry of exactly this input (qjl_cli/autocache.py), then answer."""
    from qjl.documents import max_chars_for

    hint = check_environment(reply)
    cached = use_cache and autocache.wanted(config)
    text, name = progress.read_documents(files, password, render.stderr_console(),
                                         max_chars_for(hint or DEFAULT_CONTEXT_HINT), truncate)
    given = reply.questions if reply.source is not Source.STDIN else []

    def source() -> dict:
        from qjl.store import describe_source

        one = files[0] if len(files) == 1 and files[0] != "-" else None
        return describe_source(Path(name).name if one else name, text, one)

    def fill(session: SessionLike, console: Console) -> DocumentStats:
        def prefill() -> DocumentStats:
            return progress.prefill(session, text, reply.max_new_tokens, chunk, console, truncate, given)

        if not cached:
            return prefill()
        return autocache.fill(session, text, reply.max_new_tokens, truncate, given, console, prefill, source)

    _answer(name, reply, config, fill, lambda session, path: session.save_cache(path, source()), (text, config.kv))


def answer_cache(file: str, reply: Reply, kv: Optional[str] = None) -> None:
    """Answer from a saved cache file: its settings replace the defaults; a bad file fails before the model loads,
    and so does a `kv` other than the file's mode."""
    check_environment(reply)
    info = inspect_cache(file)
    mode = (info.get("config") or {}).get("kv")
    if kv and mode and kv != mode:
        raise typer.BadParameter(f"{file} holds a --kv {mode} cache; leave out --kv {kv} (or give --kv {mode})",
                                 param_hint="'--kv'")

    def fill(session: SessionLike, console: Console) -> DocumentStats:
        return progress.load_cache(session, file, reply.max_new_tokens, console)

    def save(session: SessionLike, path: str) -> Path:
        return session.save_cache(path, info.get("source"))

    _answer(file, reply, QJLConfig(), fill, save, (info.get("document_tokens", 0), mode or "turbo"))


def inspect_cache(file: str) -> dict:
    """Read and check a cache file without a model (format, version, checksum; torch-free): raises CacheFileError."""
    from qjl.cachefile import inspect_cache

    return inspect_cache(file)


def _answer(name: str, reply: Reply, config: QJLConfig, fill: Callable[[SessionLike, Console], DocumentStats],
            save: Callable[[SessionLike, str], Path], fit: Optional[tuple] = None) -> None:
    """fit: (document text or tokens, kv mode): what must fit --max-memory with the model (checked before loading)."""
    console = render.stderr_console()
    questions = questions_for(reply.source, reply.questions)
    loaded = progress.load_model(reply.model, console, reply.placement, fit)
    session = seams.new_session(loaded, config)
    stats = fill(session, console)
    kv = session.config.kv  # a cache file's own mode
    session.remember = reply.chat or reply.source is Source.INTERACTIVE
    if reply.source is Source.INTERACTIVE:
        interactive(session, stats, loaded, kv, name, reply.max_new_tokens, console, reply.no_stream,
                    lambda path: save(session, path))
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
        if render.dropped(answer):
            render.say(console, render.dropped(answer), style="dim")
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
