"""The interactive session: a prompt loop on the terminal, a conversation about the document.

Each answer sees the earlier questions and answers (the session keeps them in the cache's exact tail); when
they outgrow the context the oldest are dropped with a notice. Ctrl-C stops an answer (or clears the prompt
line), Ctrl-D or /exit leaves; /info, /history, /reset and /save FILE.qjl are the other commands. The
questions typed (not the answers) are kept for the next session in QJL_HOME/history.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

import typer
from rich.console import Console

from .errors import terminated
from .render import answer_once, dropped, mb, say, session_info

if TYPE_CHECKING:
    from qjl.results import DocumentStats

    from .seams import LoadedModelLike, SessionLike

COMMANDS = "/info, /history, /reset, /save FILE.qjl and /exit"
HISTORY_LENGTH = 1000  # questions kept in QJL_HOME/history


def read_line(prompt: str) -> str:
    """One line from the terminal: the prompt on stderr, line editing and history from readline."""
    sys.stderr.write(prompt)
    sys.stderr.flush()
    return input()


def interactive(session: SessionLike, stats: DocumentStats, loaded: LoadedModelLike, kv: str, name: str,
                max_new_tokens: int, console: Console, no_stream: bool,
                save: Optional[Callable[[str], Path]] = None) -> None:
    """A prompt loop: a conversation about the document; Ctrl-C stops an answer, Ctrl-D leaves."""
    history = _open_history()
    say(console, f"{name}: {stats.document_tokens:,} tokens read. Ask questions (each answer sees the earlier "
                 f"ones); {COMMANDS} (or Ctrl-D) to leave, Ctrl-C stops an answer.", style="dim")
    asked = 0
    try:
        while True:
            try:
                q = read_line("qjl> ").strip()
            except EOFError:
                sys.stderr.write("\n")
                break
            except KeyboardInterrupt:  # at the prompt: a fresh line, as a shell does (SIGTERM: leave)
                if terminated():
                    raise
                sys.stderr.write("^C\n")
                continue
            if not q:
                continue
            if q in ("/exit", "/quit"):
                break
            if q.startswith("/"):
                _command(q, session, console, lambda: session_info(stats, loaded, kv, name, asked, session), save)
            elif _answer(session, q, max_new_tokens, console, stream=not no_stream):
                asked += 1
    finally:
        _save_history(history)


def _command(q: str, session: SessionLike, console: Console, info: Callable[[], str],
             save: Optional[Callable[[str], Path]]) -> None:
    """A slash command other than /exit; `info` makes the /info line, `save` writes a cache file."""
    word, _, arg = q.partition(" ")
    if q == "/info":
        say(console, info())
    elif q == "/history":
        turns = session.history()
        for i, (question, answer) in enumerate(turns, 1):
            say(console, f"{i}. {question}\n   {answer}")
        say(console, f"{len(turns)} turns kept, {session.tail_tokens():,} tokens after the document", style="dim")
    elif q == "/reset":
        session.rollback()
        say(console, "conversation forgotten: the next question is answered from the document alone")
    elif word == "/save":
        _save(arg.strip(), console, save)
    else:
        say(console, f"unknown command {q}; the commands are {COMMANDS}")


def _save(path: str, console: Console, save: Optional[Callable[[str], Path]]) -> None:
    """/save FILE.qjl: the document's cache (not the conversation) to a file; the session goes on."""
    from qjl.errors import QJLError

    if not path.lower().endswith(".qjl") or save is None:
        say(console, "give a file name ending in .qjl: /save FILE.qjl")
        return
    try:
        written = save(path)
    except (QJLError, OSError, ValueError, TypeError) as e:
        say(console, f"qjl: error: cannot save {path}: {' '.join(str(e).split())}")
        return
    say(console, f"saved the document's cache to {written} ({mb(Path(written).stat().st_size)})", style="dim")


def _answer(session: SessionLike, q: str, max_new_tokens: int, console: Console, stream: bool) -> bool:
    """Answer one question on stdout, its timings dim on stderr; False when stopped before the first token."""
    from qjl.errors import QJLError

    try:
        answer = answer_once(session, q, max_new_tokens, console, stream)
    except KeyboardInterrupt:  # between tokens the session catches it; this is before the first one
        if terminated():
            raise
        sys.stdout.write("\n")
        say(console, "(answer stopped)", style="dim")
        return False
    except QJLError as e:  # a question too long for the context: say so, the session goes on
        say(console, f"qjl: error: {' '.join(str(e).split())}")
        return False
    if stream:
        typer.echo()
    else:
        typer.echo(answer.text)
    if terminated():
        raise KeyboardInterrupt
    if dropped(answer):
        say(console, dropped(answer), style="dim")
    if answer.stopped:
        say(console, "(answer stopped)", style="dim")
    else:
        say(console, f"{answer.generated_tokens} tokens, first token {answer.first_token_s:.2f} s, "
                     f"{answer.decode_ms_per_token:.0f} ms/token", style="dim")
    return True


def _open_history() -> Optional[Path]:
    """Readline with the questions of earlier sessions (QJL_HOME/history) -> that file, None without readline."""
    try:
        import readline  # input() then has line editing and history
    except ImportError:  # not on every platform
        return None
    from qjl.models import qjl_home

    path = qjl_home() / "history"
    try:
        readline.set_history_length(HISTORY_LENGTH)
        if path.is_file():
            readline.read_history_file(str(path))
    except (OSError, ValueError):  # unreadable: start without it
        pass
    return path


def _save_history(path: Optional[Path]) -> None:
    """Keep the questions typed for the next session; a QJL_HOME that cannot be written is no error."""
    if path is None:
        return
    try:
        import readline

        path.parent.mkdir(parents=True, exist_ok=True)
        readline.write_history_file(str(path))
    except (ImportError, OSError, ValueError):
        pass
