"""The `qjl` command: parses arguments, renders with Rich on stderr, maps errors to exit codes.

Answers (or one JSON object with --json) go to stdout and nothing else does;
progress bars, timings and warnings go to stderr. Every user error is one line
`qjl: error: <message>` on stderr with a distinct exit code (ExitCode); torch
and transformers are imported only when a command needs the model, so
`qjl --help` and input errors answer at once.
"""

from __future__ import annotations

import enum
import json
import os
import sys
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import typer
from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, SpinnerColumn, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)
from rich.text import Text
from typer.core import TyperGroup

from qjl.config import ConfigError, QJLConfig
from qjl.documents import DocumentError

# click's exceptions, from whichever click Typer runs on (Typer >= 0.2x vendors its own copy as typer._click).
_click_exceptions = sys.modules[typer.BadParameter.__module__]
ClickException = _click_exceptions.ClickException
UsageError = _click_exceptions.UsageError
NoArgsIsHelpError = getattr(_click_exceptions, "NoArgsIsHelpError", ())


class ExitCode(enum.IntEnum):
    OK = 0
    UNEXPECTED = 1  # a bug: the message says how to get a traceback
    USAGE = 2  # bad arguments or option values (click's own usage errors use 2 as well)
    DOCUMENT = 3  # the input document cannot be read or is not usable text
    MODEL = 4  # the model cannot be found, converted or loaded
    CACHE_FILE = 5  # a cache file is missing, corrupt or for another model (reserved for `qjl cache`)
    TOO_LONG = 6  # the document does not fit the model's context
    INTERRUPTED = 130  # Ctrl-C (128 + SIGINT, as shells report it)
    BROKEN_PIPE = 141  # stdout closed early (`| head`): quietly, as a process killed by SIGPIPE reports it


EXIT_CODES_HELP = """\
Exit codes:
  0    ok
  1    unexpected error (a bug; set QJL_DEBUG=1 for a traceback)
  2    bad arguments or option values
  3    unreadable or unusable document
  4    model problem (not found, cannot be converted or loaded)
  5    cache-file problem
  6    document too long for the model's context
  130  interrupted (Ctrl-C)"""

ENVIRONMENT_HELP = """\
Environment:
  QJL_MODEL       default model (else the embedded SmolLM2-135M-Instruct)
  QJL_HOME        where converted models and caches live
  HF_HUB_OFFLINE  1: never use the network for models
  NO_COLOR        no colour on stderr
  QJL_DEBUG       1: print tracebacks"""

ASK_EXAMPLES = """\
Examples:
  qjl ask report.pdf "What was revenue in 2023?"
  qjl ask report.pdf                                  (interactive: many questions, one reading)
  cat notes.md | qjl ask - "Summarise the decisions" --json
  qjl ask minutes.txt budget.pdf page.html -q "Who approved the budget?"
  qjl ask report.pdf --questions questions.txt > answers.jsonl
  qjl ask long.txt "How does it end?" --truncate tail
  qjl ask secret.pdf "Who signed it?" --password hunter2
  qjl ask report.md "Who signed it?" -m ./SmolLM2-360M.gguf"""

INTERACTIVE_HELP = """\
Interactive session (no question, stdin a terminal):
  each question is answered from the document alone; Ctrl-C stops an answer,
  Ctrl-D or /exit leaves; /info shows tokens, cache bytes and bits per number;
  /reset forgets the conversation."""


def _epilog(*parts: str) -> str:
    return "\n\n".join(parts)


# --- the seams tests replace with a scripted fake model -------------------------------------------
def load_model(spec: Optional[str], progress: Optional[Callable[[str], None]] = None):
    """Load the model (imports torch/transformers only now)."""
    # transformers' and the hub's own tqdm bars ("Loading weights", "Converting and de-quantizing GGUF tensors",
    # downloads) would print on stderr even off a terminal and fight the Rich spinner on one, which shows the
    # elapsed time instead. The GGUF bar uses tqdm directly, so only tqdm's TQDM_DISABLE (read when tqdm is
    # first imported, i.e. below) silences it.
    os.environ.setdefault("TQDM_DISABLE", "1")
    from transformers.utils import logging as hf_logging

    from qjl.models import load_model as _load_model

    hf_logging.disable_progress_bar()
    return _load_model(spec, progress=progress)


def new_session(loaded, config: QJLConfig):
    from qjl.session import Session

    return Session(loaded, config)


# --- errors -> one line and an exit code ----------------------------------------------------------
def _exit_code_for(exc: BaseException) -> Optional[int]:
    """The exit code of a user error, None for an unexpected one.

    ModelError and DocumentTooLongError live in modules that import torch; an instance of either
    can only exist once its module is imported, so look there instead of importing it here.
    """
    if isinstance(exc, (ConfigError, typer.BadParameter)):
        return ExitCode.USAGE
    if isinstance(exc, DocumentError):
        return ExitCode.DOCUMENT
    models = sys.modules.get("qjl.models")
    if models is not None and isinstance(exc, models.ModelError):
        return ExitCode.MODEL
    session = sys.modules.get("qjl.session")
    if session is not None and isinstance(exc, session.DocumentTooLongError):
        return ExitCode.TOO_LONG
    store = sys.modules.get("qjl.store")
    if store is not None and isinstance(exc, getattr(store, "CacheFileError", ())):
        return ExitCode.CACHE_FILE
    return None


def _debug() -> bool:
    return os.environ.get("QJL_DEBUG", "").strip() not in ("", "0")


def _one_line(message: str) -> str:
    return " ".join(str(message).split())


def error(message: str) -> None:
    typer.echo(f"qjl: error: {_one_line(message)}", err=True)


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn every failure inside a command into one stderr line and its exit code."""
    try:
        yield
    except (typer.Exit, ClickException, typer.Abort):
        raise  # usage errors are formatted by QJLGroup.main
    except KeyboardInterrupt:
        typer.echo("qjl: interrupted", err=True)
        raise typer.Exit(ExitCode.INTERRUPTED) from None
    except BrokenPipeError:  # `qjl ask ... | head -1`: the reader left; nothing more to say
        _silence_stdout()
        raise typer.Exit(ExitCode.BROKEN_PIPE) from None
    except Exception as e:  # noqa: BLE001 - the one place that decides what a user sees
        code = _exit_code_for(e)
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
            ctx = getattr(e, "ctx", None)
            hint = f" (see '{ctx.command_path} --help')" if isinstance(e, UsageError) and ctx else ""
            error(e.format_message() + hint)
            sys.exit(e.exit_code)
        except typer.Abort:
            typer.echo("qjl: interrupted", err=True)
            sys.exit(ExitCode.INTERRUPTED)
        sys.exit(rv if isinstance(rv, int) else ExitCode.OK)


app = typer.Typer(
    cls=QJLGroup,
    name="qjl",
    help="Ask questions about documents with a local LLM whose KV cache is compressed with QJL "
         "(about 3 bits per number instead of 16).",
    epilog=_epilog(EXIT_CODES_HELP, ENVIRONMENT_HELP),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("qjl")
    except Exception:  # noqa: BLE001 - running from a source tree that was never installed
        return "unknown"


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"qjl {_version()}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", help="Print the version and exit.",
                                 callback=_version_callback, is_eager=True),
) -> None:
    """Ask questions about documents with a local LLM whose KV cache is compressed with QJL."""


class KVMode(str, enum.Enum):
    turbo = "turbo"
    qjl = "qjl"
    exact = "exact"


class Truncate(str, enum.Enum):
    head = "head"
    tail = "tail"
    middle = "middle"


@app.command(epilog=_epilog(ASK_EXAMPLES, INTERACTIVE_HELP, EXIT_CODES_HELP, ENVIRONMENT_HELP))
def ask(
    args: Optional[list[str]] = typer.Argument(
        None, metavar="FILE... [QUESTION]", show_default=False,
        help="Documents to read (.txt, .md, .html, .pdf, or - for stdin; several are read as one, each introduced "
             "by its name) or one .qjl cache file from `qjl cache save`; then the question. With -q or --questions "
             "every argument is a document. No question: an interactive session on a terminal, else one question "
             "per line on stdin."),
    question_opt: Optional[list[str]] = typer.Option(
        None, "--question", "-q", show_default=False,
        help="A question (repeat for several, all answered from one reading of the document)."),
    questions_file: Optional[str] = typer.Option(
        None, "--questions", metavar="FILE", show_default=False,
        help="Answer one question per line of FILE (- for stdin) from one reading of the document; "
             "JSON Lines on stdout, one object per question."),
    password: Optional[str] = typer.Option(None, "--password", envvar="QJL_PDF_PASSWORD", show_default=False,
                                           help="Password of an encrypted PDF (or set QJL_PDF_PASSWORD)."),
    truncate: Optional[Truncate] = typer.Option(
        None, "--truncate", show_default=False,
        help="A document longer than the model's context: keep its head, tail or both ends (middle dropped) "
             "instead of failing; what was dropped is reported on stderr."),
    model: Optional[str] = typer.Option(
        None, "--model", "-m", show_default=False,
        help="Model: a Hugging Face id (org/name), a local model folder or a .gguf file. "
             "Default: $QJL_MODEL, else the embedded SmolLM2-135M-Instruct."),
    kv: KVMode = typer.Option(KVMode.turbo, "--kv",
                              help="KV cache: turbo (rotation + Lloyd-Max codes, about 3 bits a number), qjl (the "
                                   "paper's 1-bit JL keys), or exact (uncompressed, to compare)."),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", min=1, help="Most tokens in an answer."),
    prefill_chunk: Optional[int] = typer.Option(
        None, "--prefill-chunk", min=1, metavar="N", show_default=False,
        help="Read the document N tokens at a time (less peak memory). Default: all at once."),
    as_json: bool = typer.Option(False, "--json",
                                 help="Print one JSON object (answer and measurements) per question on stdout."),
    no_stream: bool = typer.Option(False, "--no-stream",
                                   help="Print each answer at the end instead of token by token on a terminal."),
) -> None:
    """Answer questions about the documents FILE...; answers go to stdout, progress and timings to stderr."""
    with user_errors():
        files, questions, source = _plan_questions(list(args or []), list(question_opt or []), questions_file)
        config = QJLConfig(kv=kv.value)
        from_cache = len(files) == 1 and _is_cache_file(files[0])
        if from_cache:
            if kv is KVMode.exact:
                raise typer.BadParameter("a .qjl file holds a compressed cache; leave out --kv exact",
                                         param_hint="'--kv'")
            _inspect_cache(files[0])  # a bad file fails here, before the model loads
            name = files[0]
        else:
            if any(_is_cache_file(f) for f in files):
                raise typer.BadParameter("a .qjl cache file is answered from on its own; give it without other "
                                         "documents", param_hint="'FILE'")
            text, name = _read_with_progress(files, password, _stderr_console())
        console = _stderr_console()
        if source == "stdin-lines":
            questions = _stdin_questions()  # the first is read now: none is a usage error before the model loads
        loaded = _load_with_progress(model, console)
        session = new_session(loaded, config)
        if from_cache:
            stats = _load_cache_with_progress(session, files[0], max_new_tokens, console)
        else:
            stats = _prefill_with_progress(session, text, max_new_tokens, prefill_chunk, console,
                                           truncate.value if truncate else None)
        kv_name = getattr(getattr(session, "config", None), "kv", kv.value) if from_cache else kv.value
        if source == "interactive":
            _interactive(session, stats, loaded, kv_name, name, max_new_tokens, console, no_stream)
            return
        jsonl = as_json or source == "questions-file"
        _answer_all(session, stats, loaded, kv_name, name, questions, max_new_tokens, console,
                    as_json=jsonl, no_stream=no_stream)


def _plan_questions(args: list[str], question_opt: list[str], questions_file: Optional[str]):
    """(documents, questions, source): source is "given", "questions-file", "stdin-lines" or "interactive"."""
    if not args:
        raise typer.BadParameter("give a document: FILE, or - for stdin", param_hint="'FILE'")
    files, questions = args, list(question_opt)
    if not question_opt and not questions_file and len(args) >= 2:
        files, last = args[:-1], args[-1]
        if last != "-" and Path(last).is_file():
            raise typer.BadParameter(f"{last} is a file, not a question; to ask about several documents give the "
                                     f"question with -q QUESTION", param_hint="'QUESTION'")
        questions = [last]
    if any(not q.strip() for q in questions):
        raise typer.BadParameter("the question is empty", param_hint="'QUESTION'")
    if questions_file:
        if questions_file == "-" and "-" in files:
            raise typer.BadParameter("stdin cannot be both the document and the questions", param_hint="'--questions'")
        questions += _read_questions_file(questions_file)
        if not questions:
            raise typer.BadParameter(f"{questions_file} has no questions (one per line)", param_hint="'--questions'")
        return files, questions, "questions-file"
    if questions:
        return files, questions, "given"
    if _is_terminal(sys.stdin):
        return files, [], "interactive"
    if "-" in files:
        raise typer.BadParameter("no question: the document is read from stdin, so give the question as "
                                 "QUESTION, -q or --questions FILE", param_hint="'QUESTION'")
    return files, [], "stdin-lines"


def _read_questions_file(path: str) -> list[str]:
    if path == "-":
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


def _stdin_questions() -> Iterator[str]:
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


def _answer_once(session, question: str, max_new_tokens: int, console, stream: bool):
    with _AnswerOutput(console, stream) as output:
        return session.ask(question, max_new_tokens=max_new_tokens, on_text=output.on_text)


def _answer_all(session, stats, loaded, kv: str, name: str, questions, max_new_tokens: int, console, *,
                as_json: bool, no_stream: bool) -> None:
    """Each question from the document state, in order: answers (or JSON Lines) on stdout as they come."""
    answer, count = None, 0
    for q in questions:
        stream = not as_json and not no_stream and _is_terminal(sys.stdout)
        answer = _answer_once(session, q, max_new_tokens, console, stream)
        count += 1
        if as_json:
            typer.echo(json.dumps(_result(answer, stats, loaded, kv, name, q), ensure_ascii=False))
        elif stream:
            typer.echo()
        else:
            typer.echo(answer.text)
        sys.stdout.flush()
        if answer.generated_tokens >= max_new_tokens and not answer.stopped:
            _warn(console, f"the answer stopped at --max-new-tokens {max_new_tokens} and may be cut short; "
                           f"raise it for a longer answer")
        if not as_json and not answer.text and not answer.stopped:
            _warn(console, "the model gave an empty answer")
        if answer.stopped:
            raise KeyboardInterrupt
    if answer is not None and not as_json:
        console.print(_summary(stats, answer, loaded, kv) + (f"; {count} questions" if count > 1 else ""),
                      markup=False, highlight=False, style="dim", soft_wrap=True)


def _read_line(prompt: str) -> str:
    """One line from the terminal: the prompt on stderr, line editing and history from readline."""
    sys.stderr.write(prompt)
    sys.stderr.flush()
    return input()


def _interactive(session, stats, loaded, kv: str, name: str, max_new_tokens: int, console, no_stream: bool) -> None:
    """A prompt loop: every question answered from the document state; Ctrl-C stops an answer, Ctrl-D leaves."""
    try:
        import readline  # noqa: F401 - input() then has line editing and history
    except ImportError:  # not on every platform
        pass
    console.print(f"{name}: {stats.document_tokens:,} tokens read. Ask questions; /info, /reset, /exit "
                  f"(or Ctrl-D) to leave, Ctrl-C stops an answer.", markup=False, highlight=False, style="dim",
                  soft_wrap=True)
    asked = 0
    while True:
        try:
            line = _read_line("qjl> ")
        except EOFError:
            sys.stderr.write("\n")
            break
        except KeyboardInterrupt:  # at the prompt: a fresh line, as a shell does
            sys.stderr.write("^C\n")
            continue
        q = line.strip()
        if not q:
            continue
        if q in ("/exit", "/quit"):
            break
        if q == "/info":
            console.print(f"model {loaded.name}, --kv {kv}; document {name}: {stats.document_tokens:,} tokens; "
                          f"KV cache {stats.kv_bytes:,} bytes ({_mb(stats.kv_bytes)}), "
                          f"{stats.kv_bits_per_number:.2f} bits/number (16-bit: {_mb(stats.fp16_bytes)}); "
                          f"{asked} questions answered", markup=False, highlight=False, soft_wrap=True)
            continue
        if q == "/reset":
            session.rollback() if hasattr(session, "rollback") else None
            console.print("conversation forgotten: the next question is answered from the document alone",
                          markup=False, highlight=False, soft_wrap=True)
            continue
        if q.startswith("/"):
            console.print(f"unknown command {q}; the commands are /info, /reset and /exit", markup=False,
                          highlight=False, soft_wrap=True)
            continue
        stream = not no_stream
        try:
            answer = _answer_once(session, q, max_new_tokens, console, stream)
        except KeyboardInterrupt:  # between tokens the session catches it; this is before the first one
            sys.stdout.write("\n")
            console.print("(answer stopped)", style="dim", markup=False, highlight=False)
            continue
        asked += 1
        if stream:
            typer.echo()
        else:
            typer.echo(answer.text)
        if answer.stopped:
            console.print("(answer stopped)", style="dim", markup=False, highlight=False)
        else:
            console.print(f"{answer.generated_tokens} tokens, first token {answer.first_token_s:.2f} s, "
                          f"{answer.decode_ms_per_token:.0f} ms/token", style="dim", markup=False, highlight=False)


def _warn(console: Console, message: str) -> None:
    console.print(f"qjl: warning: {message}", markup=False, highlight=False, soft_wrap=True)


class _AnswerOutput:
    """Streams pieces to stdout when asked; on a terminal a spinner on stderr fills the wait for the first token."""

    def __init__(self, console: Console, stream: bool):
        self.stream = stream
        self.status = console.status("Answering...", spinner="dots") if console.is_terminal else None
        self.pieces = 0
        # None when there is nothing to do per piece, so the session need not call back.
        self.on_text = self._on_text if stream or self.status else None

    def __enter__(self) -> "_AnswerOutput":
        if self.status:
            self.status.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop_status()

    def _on_text(self, piece: str) -> None:
        self.pieces += 1
        if self.stream:
            self._stop_status()  # the answer takes over the terminal
            sys.stdout.write(piece)
            sys.stdout.flush()
        elif self.status:
            self.status.update(f"Answering... {self.pieces} tokens")

    def _stop_status(self) -> None:
        if self.status:
            self.status.stop()
            self.status = None


def _result(answer, stats, loaded, kv: str, name: str, question: str) -> dict:
    return {
        "answer": answer.text,
        "model": loaded.name,
        "kv": kv,
        "document": name,
        "question": question,
        "document_tokens": stats.document_tokens,
        "question_tokens": answer.question_tokens,
        "prompt_tokens": stats.document_tokens + answer.question_tokens,
        "generated_tokens": answer.generated_tokens,
        "kv_bytes": stats.kv_bytes,
        "fp16_bytes": stats.fp16_bytes,
        "bits_per_number": round(stats.kv_bits_per_number, 4),
        "prefill_s": round(stats.prefill_s, 4),
        "prefill_tokens_per_s": round(stats.prefill_tokens_per_s, 2),
        "first_token_s": round(answer.first_token_s, 4),
        "decode_ms_per_token": round(answer.decode_ms_per_token, 3),
        "stopped": answer.stopped,
        **getattr(stats, "extra", {}),
    }


def _summary(stats, answer, loaded, kv: str) -> str:
    extra = getattr(stats, "extra", {})
    if "cache_file" in extra:
        read = (f"{stats.document_tokens:,} document tokens loaded from {extra['cache_file']} "
                f"in {extra['cache_load_s']:.2f} s")
    else:
        read = (f"{stats.document_tokens:,} document tokens read in {stats.prefill_s:.1f} s "
                f"({stats.prefill_tokens_per_s:,.0f} tokens/s)")
    return (f"{loaded.name}, --kv {kv}: {read}; KV cache {_mb(stats.kv_bytes)}, "
            f"{stats.kv_bits_per_number:.2f} bits/number (16-bit: {_mb(stats.fp16_bytes)}); "
            f"first token {answer.first_token_s:.2f} s, {answer.decode_ms_per_token:.0f} ms/token, "
            f"{answer.generated_tokens} tokens")


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


# --- rendering on stderr ------------------------------------------------------------------------------
def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def _stderr_console():
    no_color = bool(os.environ.get("NO_COLOR")) or not _is_terminal(sys.stderr)
    return Console(file=sys.stderr, no_color=no_color, highlight=False,
                   force_terminal=_is_terminal(sys.stderr) or None)


def _load_with_progress(spec: Optional[str], console):
    if not console.is_terminal:
        # No bars off a terminal; a first conversion of a GGUF file still says why it takes half a minute.
        return load_model(spec, progress=lambda message: console.print(f"qjl: {message}", markup=False,
                                                                       soft_wrap=True))
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                  console=console, transient=True) as bar:
        what = spec or os.environ.get("QJL_MODEL")
        task = bar.add_task(f"Loading model {what}" if what else "Loading the embedded model", total=None)
        t0 = time.perf_counter()
        loaded = load_model(spec, progress=lambda message: bar.update(task, description=message))
    console.print(f"Loaded {loaded.name} in {time.perf_counter() - t0:.1f} s", style="dim", markup=False)
    return loaded


def _prefill_with_progress(session, text: str, max_new_tokens: int, chunk: Optional[int], console,
                           truncate: Optional[str] = None):
    kwargs = {"truncate": truncate} if truncate else {}
    if not console.is_terminal:
        stats = session.load_document(text, max_new_tokens=max_new_tokens, chunk=chunk, **kwargs)
    else:
        with Progress(TextColumn("Reading document"), BarColumn(), MofNCompleteColumn(), TextColumn("tokens"),
                      _TokensPerSecond(), TimeRemainingColumn(), console=console, transient=True) as bar:
            task = bar.add_task("prefill", total=None)

            def progress(done: int, total: int) -> None:
                bar.update(task, completed=done, total=total)

            stats = session.load_document(text, max_new_tokens=max_new_tokens, chunk=chunk, progress=progress,
                                          **kwargs)
    cut = getattr(stats, "extra", {}).get("truncated")
    if cut:
        part = {"head": "the end", "tail": "the beginning", "middle": "the middle"}[cut["mode"]]
        _warn(console, f"--truncate {cut['mode']}: the document is {cut['document_tokens']:,} tokens and at most "
                       f"{cut['limit']:,} fit; dropped {cut['dropped_tokens']:,} tokens "
                       f"({cut['dropped_chars']:,} characters) from {part}, kept {cut['kept_tokens']:,}")
    return stats


def _read_with_progress(files: list[str], password: Optional[str], console) -> tuple[str, str]:
    """Read the documents; PDF pages extracted are shown as a bar on a terminal."""
    from qjl.documents import read_documents

    if not console.is_terminal:
        return read_documents(files, password=password)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("pages"),
                  TimeRemainingColumn(), console=console, transient=True) as bar:
        tasks: dict = {}

        def progress(done: int, total: int, what: str) -> None:
            if what not in tasks:
                tasks[what] = bar.add_task(f"Extracting {what}", total=total)
            bar.update(tasks[what], completed=done)

        return read_documents(files, password=password, progress=progress)


def _is_cache_file(file: str) -> bool:
    return file != "-" and file.lower().endswith(".qjl")


def _inspect_cache(file: str) -> dict:
    """Read and check a cache file without a model (format, version, checksum): raises CacheFileError."""
    from qjl.store import inspect_cache

    return inspect_cache(file)


def _load_cache_with_progress(session, file: str, max_new_tokens: int, console):
    t0 = time.perf_counter()
    if console.is_terminal:
        with console.status(f"Loading cache {file}", spinner="dots"):
            stats = session.load_cache(file)
    else:
        stats = session.load_cache(file)
    stats.extra.update(cache_file=file, cache_load_s=round(time.perf_counter() - t0, 4))
    session.check_fits(stats.document_tokens, max_new_tokens)
    return stats


class _TokensPerSecond(ProgressColumn):
    def render(self, task) -> Text:
        return Text(f"{task.speed:,.0f} tokens/s" if task.speed else "? tokens/s")


# --- qjl cache ----------------------------------------------------------------------------------------
CACHE_EXAMPLES = """\
Examples:
  qjl cache save report.txt -o report.qjl
  qjl ask report.qjl "Who signed it?"
  qjl cache load report.qjl -q "Who signed it?" -q "When?"
  qjl cache info report.qjl --json"""

cache_app = typer.Typer(
    help="Save a document's compressed cache to a .qjl file, inspect one, or answer from one.",
    epilog=_epilog(CACHE_EXAMPLES, EXIT_CODES_HELP),
    no_args_is_help=True,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(cache_app, name="cache")


@cache_app.command("save", epilog=_epilog(CACHE_EXAMPLES, EXIT_CODES_HELP, ENVIRONMENT_HELP))
def cache_save(
    file: str = typer.Argument(..., show_default=False,
                               help="Document to read: a .txt, .md, .html or .pdf file, or - for stdin."),
    output: str = typer.Option(..., "--output", "-o", show_default=False, metavar="FILE.qjl",
                               help="Cache file to write (replaced atomically if it exists)."),
    model: Optional[str] = typer.Option(
        None, "--model", "-m", show_default=False,
        help="Model: a Hugging Face id, a local model folder or a .gguf file. Default: $QJL_MODEL, else the "
             "embedded SmolLM2-135M-Instruct. Questions about the file need the same model."),
    prefill_chunk: Optional[int] = typer.Option(
        None, "--prefill-chunk", min=1, metavar="N", show_default=False,
        help="Read the document N tokens at a time (less peak memory). Default: all at once."),
    password: Optional[str] = typer.Option(None, "--password", envvar="QJL_PDF_PASSWORD", show_default=False,
                                           help="Password of an encrypted PDF (or set QJL_PDF_PASSWORD)."),
    kv: KVMode = typer.Option(KVMode.turbo, "--kv", help="Compressed cache to save: turbo or qjl."),
) -> None:
    """Read the document FILE once and save its compressed cache to FILE.qjl; progress and sizes on stderr."""
    with user_errors():
        if not output.lower().endswith(".qjl"):
            raise typer.BadParameter("end the file name with .qjl, so `qjl ask` knows it is a cache",
                                     param_hint="'--output'")
        console = _stderr_console()
        text, name = _read_with_progress([file], password, console)
        if kv is KVMode.exact:
            raise typer.BadParameter("a cache file holds a compressed cache: --kv turbo or qjl", param_hint="'--kv'")
        loaded = _load_with_progress(model, console)
        session = new_session(loaded, QJLConfig(kv=kv.value))
        stats = _prefill_with_progress(session, text, 256, prefill_chunk, console)
        from qjl.store import describe_source

        source = describe_source(Path(name).name if file != "-" else name, text, None if file == "-" else file)
        t0 = time.perf_counter()
        path = session.save_cache(output, source)
        size = os.path.getsize(path)
        ratio = size / stats.fp16_bytes if stats.fp16_bytes else 0.0
        console.print(f"Saved {stats.document_tokens:,} document tokens to {output} in "
                      f"{time.perf_counter() - t0:.2f} s: {_mb(size)} on disk, {stats.kv_bits_per_number:.2f} "
                      f"bits/number ({ratio:.1%} of a 16-bit cache, {_mb(stats.fp16_bytes)}); "
                      f"document read in {stats.prefill_s:.1f} s", markup=False, highlight=False, soft_wrap=True)


@cache_app.command("info")
def cache_info(
    file: str = typer.Argument(..., show_default=False, help="A .qjl cache file."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object on stdout."),
) -> None:
    """What a cache file holds: format, model, tokens, bits per number, size next to a 16-bit cache, source."""
    with user_errors():
        info = _inspect_cache(file)
        if as_json:
            typer.echo(json.dumps(info, ensure_ascii=False))
        else:
            typer.echo(_render_info(file, info))


def _render_info(file: str, info: dict) -> str:
    src = info["source"]
    source = src["name"] or "?"
    if src["size"]:
        source += f", {int(src['size']):,} bytes" if str(src["size"]).isdigit() else f", {src['size']} bytes"
    if src["sha256"]:
        source += f", sha256 {src['sha256']}"
    settings = dict(info["config"])
    if settings.get("buffer") is None:  # the mode's default window, as the cache used it
        from qjl.config import QJLConfig

        settings["buffer"] = f"{QJLConfig.from_dict(info['config']).exact_buffer()} (the {settings.get('kv')} default)"
    config = ", ".join(f"{k}={v}" for k, v in sorted(settings.items()))
    ratio = info["ratio_vs_fp16"]
    rows = [
        ("file", file),
        ("format", f"{info['format']} version {info['format_version']}"),
        ("model", f"{info['model_name']}; identity {info['model_identity']}"),
        ("tokens", f"{info['document_tokens']:,}"),
        ("bits/number", f"{info['bits_per_number']:.2f}"),
        ("size", f"{_mb(info['file_bytes'])} on disk; a 16-bit cache of the same tokens: {_mb(info['fp16_bytes'])} "
                 f"(ratio {ratio:.3f}, {1 / ratio if ratio else 0:.1f}x smaller)"),
        ("source", source),
        ("created", info["created"]),
        ("settings", config),
    ]
    return "\n".join(f"{k:<12} {v}" for k, v in rows)


@cache_app.command("load", epilog=_epilog(INTERACTIVE_HELP, EXIT_CODES_HELP))
def cache_load(
    file: str = typer.Argument(..., show_default=False, help="A .qjl cache file from `qjl cache save`."),
    question: Optional[list[str]] = typer.Option(
        None, "--question", "-q", show_default=False,
        help="A question to answer (repeat for several). None: an interactive session on a terminal, "
             "else one question per line on stdin."),
    model: Optional[str] = typer.Option(None, "--model", "-m", show_default=False,
                                        help="The model that saved the file. Default: $QJL_MODEL, else the "
                                             "embedded SmolLM2-135M-Instruct."),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", min=1, help="Most tokens in each answer."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object per question on stdout."),
    no_stream: bool = typer.Option(False, "--no-stream",
                                   help="Print each answer at the end instead of token by token on a terminal."),
) -> None:
    """Answer questions from the saved cache FILE (no reading of the document), one answer after another."""
    with user_errors():
        questions = [q for q in (question or [])]
        if any(not q.strip() for q in questions):
            raise typer.BadParameter("a question is empty", param_hint="'--question'")
        _inspect_cache(file)
        interactive = not questions and _is_terminal(sys.stdin)
        if not questions and not interactive:
            questions = _stdin_questions()
        console = _stderr_console()
        loaded = _load_with_progress(model, console)
        session = new_session(loaded, QJLConfig())
        stats = _load_cache_with_progress(session, file, max_new_tokens, console)
        kv = getattr(getattr(session, "config", None), "kv", "qjl")
        if interactive:
            _interactive(session, stats, loaded, kv, file, max_new_tokens, console, no_stream)
            return
        _answer_all(session, stats, loaded, kv, file, questions, max_new_tokens, console, as_json=as_json,
                    no_stream=no_stream)


def run() -> None:
    """Console-script entry point."""
    try:
        app()
    except KeyboardInterrupt:  # between commands, e.g. while Python is still importing
        typer.echo("qjl: interrupted", err=True)
        sys.exit(ExitCode.INTERRUPTED)


if __name__ == "__main__":
    run()
