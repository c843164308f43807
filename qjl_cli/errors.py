"""Errors -> one stderr line and an exit code.

Every user error is one line `qjl: error: <message>` on stderr with a distinct exit code (ExitCode).
The library's user errors all live in the torch-free qjl.errors, so mapping them imports no model code;
anything else is a bug and says how to get a traceback.
"""

from __future__ import annotations

import enum
import os
import signal
import sys
import traceback
from contextlib import contextmanager
from typing import Any, Iterator, Optional

import typer
from typer.core import TyperGroup

from qjl import errors as lib

# click's exceptions, from whichever click Typer runs on (Typer >= 0.2x vendors its own copy as typer._click).
_click_exceptions = sys.modules[typer.BadParameter.__module__]
ClickException = _click_exceptions.ClickException
UsageError = _click_exceptions.UsageError
NoArgsIsHelpError = getattr(_click_exceptions, "NoArgsIsHelpError", ())  # click >= 8.2 only


class ExitCode(enum.IntEnum):
    OK = 0
    UNEXPECTED = 1  # a bug: the message says how to get a traceback
    USAGE = 2  # bad arguments or option values (click's own usage errors use 2 as well)
    DOCUMENT = 3  # the input document cannot be read or is not usable text
    MODEL = 4  # the model cannot be found, converted or loaded
    CACHE_FILE = 5  # a cache file is missing, corrupt or for another model
    TOO_LONG = 6  # the document does not fit the model's context
    INTERRUPTED = 130  # Ctrl-C (128 + SIGINT, as shells report it)
    BROKEN_PIPE = 141  # stdout closed early (`| head`): quietly, as a process killed by SIGPIPE reports it
    TERMINATED = 143  # SIGTERM (128 + 15): handled as Ctrl-C is (cleaned up), then this code


EXIT_CODES_HELP = """\
Exit codes:
  0    ok
  1    unexpected error (a bug; set QJL_DEBUG=1 for a traceback)
  2    bad arguments or option values
  3    unreadable or unusable document
  4    model problem (not found, cannot be converted or loaded)
  5    cache-file problem
  6    document too long for the model's context
  130  interrupted (Ctrl-C); 143 terminated (SIGTERM)"""

# Each user error's exit code; the classes are siblings under QJLError, so the order does not matter.
_EXIT_CODES: tuple[tuple[type[BaseException], ExitCode], ...] = (
    (typer.BadParameter, ExitCode.USAGE),
    (lib.ConfigError, ExitCode.USAGE),
    (lib.BenchError, ExitCode.USAGE),
    (lib.DocumentError, ExitCode.DOCUMENT),
    (lib.ModelError, ExitCode.MODEL),
    (lib.CacheFileError, ExitCode.CACHE_FILE),
    (lib.DocumentTooLongError, ExitCode.TOO_LONG),
    (lib.QJLError, ExitCode.USAGE),  # a user error without a class of its own above
)


def exit_code_for(exc: BaseException) -> Optional[ExitCode]:
    """The exit code of a user error, None for an unexpected one (a bug)."""
    for cls, code in _EXIT_CODES:
        if isinstance(exc, cls):
            return code
    return None


def _debug() -> bool:
    return os.environ.get("QJL_DEBUG", "").strip() not in ("", "0")


def _one_line(message: str) -> str:
    return " ".join(str(message).split())


def error(message: str) -> None:
    typer.echo(f"qjl: error: {_one_line(message)}", err=True)


_terminated = False


def interrupted() -> None:
    typer.echo("qjl: terminated" if _terminated else "qjl: interrupted", err=True)


def terminated() -> bool:
    """Whether a SIGTERM arrived: an interrupt then ends the command (exit 143) instead of just an answer."""
    return _terminated


def mark_terminated() -> None:
    """A SIGTERM that reached the command another way (`qjl serve` relays its client's)."""
    global _terminated
    _terminated = True


def reset_terminated() -> None:
    """Before each command `qjl serve` runs: the last one's SIGTERM is not this one's."""
    global _terminated
    _terminated = False


def interrupt_code() -> ExitCode:
    return ExitCode.TERMINATED if _terminated else ExitCode.INTERRUPTED


def handle_sigterm() -> None:
    """SIGTERM raises KeyboardInterrupt as Ctrl-C does, so every `finally` cleans up (a model conversion's temp
    folder, a cache file's temp file); the exit code is then 143."""
    def on_term(signum, frame):
        mark_terminated()
        raise KeyboardInterrupt

    try:
        signal.signal(signal.SIGTERM, on_term)
    except (ValueError, OSError, AttributeError):  # not the main thread, or no SIGTERM on this platform
        pass


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn every failure inside a command into one stderr line and its exit code."""
    try:
        yield
    except (typer.Exit, ClickException, typer.Abort):
        raise  # usage errors are formatted by QJLGroup.main
    except KeyboardInterrupt:
        interrupted()
        raise typer.Exit(interrupt_code()) from None
    except BrokenPipeError:  # `qjl ask ... | head -1`: the reader left; nothing more to say
        _silence_stdout()
        raise typer.Exit(ExitCode.BROKEN_PIPE) from None
    except Exception as e:  # noqa: BLE001 - the one place that decides what a user sees
        code = exit_code_for(e)
        if _debug():
            traceback.print_exc()
        if code is None:
            detail = str(e).strip() or "(no message)"
            error(f"{type(e).__name__}: {_one_line(detail)} (set QJL_DEBUG=1 for a traceback)")
            raise typer.Exit(ExitCode.UNEXPECTED) from None
        error(str(e))
        raise typer.Exit(code) from None


def _silence_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # not a real file (tests): nothing to silence
        pass


class QJLGroup(TyperGroup):
    """Prints click's usage errors as one line (`qjl: error: ...`) instead of a box of usage text."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except NoArgsIsHelpError as e:  # bare `qjl`: the help, as click shows it
            e.show()
            sys.exit(e.exit_code)
        except ClickException as e:
            hint = f" (see '{e.ctx.command_path} --help')" if isinstance(e, UsageError) and e.ctx else ""
            error(e.format_message() + hint)
            sys.exit(e.exit_code)
        except typer.Abort:
            interrupted()
            sys.exit(interrupt_code())
        sys.exit(rv if isinstance(rv, int) else ExitCode.OK)
