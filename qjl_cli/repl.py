"""The interactive session: a prompt loop on the terminal, every question answered from the document state.

Ctrl-C stops an answer (or clears the prompt line), Ctrl-D or /exit leaves; /info and /reset are the
other commands.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import typer
from rich.console import Console

from .render import answer_once, say, session_info

if TYPE_CHECKING:
    from qjl.session import DocumentStats

    from .seams import LoadedModelLike, SessionLike

COMMANDS = "/info, /reset and /exit"


def read_line(prompt: str) -> str:
    """One line from the terminal: the prompt on stderr, line editing and history from readline."""
    sys.stderr.write(prompt)
    sys.stderr.flush()
    return input()


def interactive(session: SessionLike, stats: DocumentStats, loaded: LoadedModelLike, kv: str, name: str,
                max_new_tokens: int, console: Console, no_stream: bool) -> None:
    """A prompt loop: every question answered from the document state; Ctrl-C stops an answer, Ctrl-D leaves."""
    try:
        import readline  # noqa: F401 - input() then has line editing and history
    except ImportError:  # not on every platform
        pass
    say(console, f"{name}: {stats.document_tokens:,} tokens read. Ask questions; /info, /reset, /exit "
                 f"(or Ctrl-D) to leave, Ctrl-C stops an answer.", style="dim")
    asked = 0
    while True:
        try:
            q = read_line("qjl> ").strip()
        except EOFError:
            sys.stderr.write("\n")
            break
        except KeyboardInterrupt:  # at the prompt: a fresh line, as a shell does
            sys.stderr.write("^C\n")
            continue
        if not q:
            continue
        if q in ("/exit", "/quit"):
            break
        if q.startswith("/"):
            _command(q, session, console, lambda: session_info(stats, loaded, kv, name, asked))
        elif _answer(session, q, max_new_tokens, console, stream=not no_stream):
            asked += 1


def _command(q: str, session: SessionLike, console: Console, info) -> None:
    """A slash command other than /exit; `info` makes the /info line."""
    if q == "/info":
        say(console, info())
    elif q == "/reset":
        session.rollback()
        say(console, "conversation forgotten: the next question is answered from the document alone")
    else:
        say(console, f"unknown command {q}; the commands are {COMMANDS}")


def _answer(session: SessionLike, q: str, max_new_tokens: int, console: Console, stream: bool) -> bool:
    """Answer one question on stdout, its timings dim on stderr; False when stopped before the first token."""
    try:
        answer = answer_once(session, q, max_new_tokens, console, stream)
    except KeyboardInterrupt:  # between tokens the session catches it; this is before the first one
        sys.stdout.write("\n")
        say(console, "(answer stopped)", style="dim")
        return False
    if stream:
        typer.echo()
    else:
        typer.echo(answer.text)
    if answer.stopped:
        say(console, "(answer stopped)", style="dim")
    else:
        say(console, f"{answer.generated_tokens} tokens, first token {answer.first_token_s:.2f} s, "
                     f"{answer.decode_ms_per_token:.0f} ms/token", style="dim")
    return True
