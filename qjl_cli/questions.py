"""Which questions a command answers, and from where: arguments, -q, a questions file, stdin or a prompt.

Every check here runs before the (slow) model load, so a usage mistake answers at once.
"""

from __future__ import annotations

import enum
import os
import sys
from pathlib import Path
from typing import Iterable, Iterator, Optional

import typer

from qjl.errors import DocumentError

from . import render


class Source(str, enum.Enum):
    """Where the questions come from."""

    GIVEN = "given"  # the QUESTION argument or -q
    FILE = "questions-file"  # --questions FILE: JSON Lines out
    STDIN = "stdin-lines"  # one a line on stdin, read as they come
    INTERACTIVE = "interactive"  # a prompt on the terminal


def is_cache_file(file: str) -> bool:
    return file != "-" and file.lower().endswith(".qjl")


def plan_questions(args: list[str], question_opt: list[str],
                   questions_file: Optional[str]) -> tuple[list[str], list[str], Source]:
    """(documents, questions, source) of `qjl ask`: the last argument is the question unless -q or --questions."""
    if not args:
        raise typer.BadParameter("give a document: FILE, or - for stdin", param_hint="'FILE'")
    files, questions = args, list(question_opt)
    if not question_opt and not questions_file and len(args) >= 2:
        files, last = args[:-1], args[-1]
        if last != "-" and _is_file(last):
            raise typer.BadParameter(f"{last} is a file, not a question; to ask about several documents give the "
                                     f"question with -q QUESTION", param_hint="'QUESTION'")
        questions = [last]
    if any(not q.strip() for q in questions):
        raise typer.BadParameter("the question is empty", param_hint="'QUESTION'")
    if questions_file:
        if "-" in files and _is_stdin(questions_file):
            raise typer.BadParameter("stdin cannot be both the document and the questions", param_hint="'--questions'")
        questions += _read_questions_file(questions_file)
        if not questions:
            raise typer.BadParameter(f"{questions_file} has no questions (one per line)", param_hint="'--questions'")
        return files, questions, Source.FILE
    if questions:
        return files, questions, Source.GIVEN
    if render.is_terminal(sys.stdin):
        return files, [], Source.INTERACTIVE
    if sys.stdin is None:
        raise typer.BadParameter("no question, and stdin is closed; give the question as QUESTION, -q or "
                                 "--questions FILE", param_hint="'QUESTION'")
    if "-" in files:
        raise typer.BadParameter("no question: the document is read from stdin, so give the question as "
                                 "QUESTION, -q or --questions FILE", param_hint="'QUESTION'")
    return files, [], Source.STDIN


def plan_cache_questions(question_opt: list[str]) -> tuple[list[str], Source]:
    """(questions, source) of `qjl cache load`: -q, else a prompt on a terminal, else stdin lines."""
    if any(not q.strip() for q in question_opt):
        raise typer.BadParameter("a question is empty", param_hint="'--question'")
    if question_opt:
        return list(question_opt), Source.GIVEN
    if sys.stdin is None:
        raise typer.BadParameter("no question, and stdin is closed; give questions with -q", param_hint="'-q'")
    return [], Source.INTERACTIVE if render.is_terminal(sys.stdin) else Source.STDIN


def _is_file(arg: str) -> bool:
    """Whether `arg` names an existing file; never raises (a long question is no file name: ENAMETOOLONG)."""
    try:
        return Path(arg).is_file()
    except (OSError, ValueError):
        return False


def _is_stdin(path: str) -> bool:
    """Whether reading `path` reads stdin: -, /dev/stdin, /dev/fd/0, or any name of the file open on fd 0."""
    if path == "-":
        return True
    try:
        return os.path.samestat(os.stat(path), os.fstat(0))
    except (OSError, ValueError):
        return False


def questions_for(source: Source, questions: list[str]) -> Iterable[str]:
    """The questions to answer; from stdin the first is read now (none is a usage error before the model loads)."""
    return stdin_questions() if source is Source.STDIN else questions


def _read_questions_file(path: str) -> list[str]:
    if path == "-":
        if sys.stdin is None:
            raise typer.BadParameter("--questions - reads stdin, but stdin is closed", param_hint="'--questions'")
        lines = sys.stdin.read().splitlines()
    else:
        try:
            with open(path, encoding="utf-8-sig") as f:
                lines = f.read().splitlines()
        except FileNotFoundError:
            raise DocumentError(f"{path}: no such file (--questions); check the path") from None
        except UnicodeDecodeError:
            raise DocumentError(f"{path} (--questions) is not UTF-8 text; one question per line") from None
        except OSError as e:
            raise DocumentError(f"cannot read {path} (--questions): {e.strerror or e}") from None
    return [line.strip() for line in lines if line.strip()]


def stdin_questions() -> Iterator[str]:
    """Questions one per line on stdin, read as they come (a pipeline can feed them one at a time)."""
    def lines() -> Iterator[str]:
        for line in sys.stdin:
            if line.strip():
                yield line.strip()

    it = lines()
    first = next(it, None)
    if first is None:
        raise typer.BadParameter("no question: give QUESTION, -q, --questions FILE, or questions one per line on "
                                 "stdin (on a terminal, an interactive session)", param_hint="'QUESTION'")

    def chained() -> Iterator[str]:
        yield first
        yield from it

    return chained()
