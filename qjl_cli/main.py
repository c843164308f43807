"""The `qjl` command: the app and its commands; the work is done by the modules beside this one.

errors (exit codes, one-line messages), options (every option, declared once), questions (which
questions, from where), answers (documents or a cache file -> answers), repl (the interactive loop),
progress and render (what stderr and stdout show), seams (the model and session, replaced in tests).
torch and transformers are imported only when a command needs the model, so `qjl --help` and input
errors answer at once. Another command module plugs in with one line: `module.register(app)`.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import typer

from qjl.config import QJLConfig
from qjl.documents import max_chars_for
from qjl.placement import make_placement

from . import bench, cachestore, helptext, kernels, options, progress, render, seams, server
from .answers import DEFAULT_CONTEXT_HINT, Reply, answer_cache, answer_documents, check_writable, inspect_cache
from .errors import ExitCode, QJLGroup, handle_sigterm, interrupt_code, interrupted, user_errors
from .options import KVMode
from .questions import is_cache_file, plan_cache_questions, plan_questions

__all__ = ["app", "run", "ExitCode"]

app = typer.Typer(
    cls=QJLGroup,
    name="qjl",
    help="Ask questions about documents with a local LLM whose KV cache is compressed with QJL "
         "(about 3 bits per number instead of 16).",
    epilog=helptext.MAIN,
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


@app.command(epilog=helptext.ASK)
def ask(
    args: options.DocumentsAndQuestion = None,
    question_opt: options.Question = None,
    questions_file: options.QuestionsFile = None,
    password: options.Password = None,
    truncate: options.TruncateOpt = None,
    model: options.Model = None,
    kv: options.AskKV = None,
    max_new_tokens: options.MaxNewTokens = 256,
    prefill_chunk: options.PrefillChunk = None,
    as_json: options.Json = False,
    no_stream: options.NoStream = False,
    chat: options.Chat = False,
    no_cache: options.NoCache = False,
    device: options.Device = None,
    device_map: options.DeviceMap = None,
    max_memory: options.MaxMemory = None,
) -> None:
    """Answer questions about the documents FILE...; answers go to stdout, progress and timings to stderr."""
    with user_errors():
        files, questions, source = plan_questions(list(args or []), list(question_opt or []), questions_file)
        reply = Reply(questions, source, model, max_new_tokens, as_json, no_stream, chat,
                      make_placement(device, device_map, max_memory))
        if len(files) == 1 and is_cache_file(files[0]):
            if kv is KVMode.exact:
                raise typer.BadParameter("a .qjl file holds a compressed cache; leave out --kv exact",
                                         param_hint="'--kv'")
            answer_cache(files[0], reply, kv.value if kv else None)
            return
        if any(is_cache_file(f) for f in files):
            raise typer.BadParameter("a .qjl cache file is answered from on its own; give it without other "
                                     "documents", param_hint="'FILE'")
        answer_documents(files, reply, QJLConfig(kv=(kv or KVMode.turbo).value), password, prefill_chunk,
                         truncate.value if truncate else None, not no_cache)


# --- qjl cache ----------------------------------------------------------------------------------------
cache_app = typer.Typer(
    help="Save a document's compressed cache to a .qjl file, inspect one, or answer from one; list, prune or clear "
         "the automatic document cache.",
    epilog=helptext.CACHE,
    no_args_is_help=True,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(cache_app, name="cache")
cachestore.register(cache_app)  # list, prune, clear


@cache_app.command("save", epilog=helptext.CACHE_SAVE)
def cache_save(
    file: options.Document,
    output: options.Output,
    model: options.Model = None,
    prefill_chunk: options.PrefillChunk = None,
    password: options.Password = None,
    kv: options.KV = KVMode.turbo,
    device: options.Device = None,
    device_map: options.DeviceMap = None,
    max_memory: options.MaxMemory = None,
) -> None:
    """Read the document FILE once and save its compressed cache to FILE.qjl; progress and sizes on stderr."""
    with user_errors():
        placement = make_placement(device, device_map, max_memory)
        if not output.lower().endswith(".qjl"):
            raise typer.BadParameter("end the file name with .qjl, so `qjl ask` knows it is a cache",
                                     param_hint="'--output'")
        if kv is KVMode.exact:
            raise typer.BadParameter("a cache file holds a compressed cache: --kv turbo or qjl", param_hint="'--kv'")
        check_writable(output)
        console = render.stderr_console()
        text, name = progress.read_documents([file], password, console, max_chars_for(
            seams.context_hint(model) or DEFAULT_CONTEXT_HINT))
        loaded = progress.load_model(model, console, placement, (text, kv.value))
        session = seams.new_session(loaded, QJLConfig(kv=kv.value))
        stats = progress.prefill(session, text, 256, prefill_chunk, console)
        from qjl.store import describe_source

        source = describe_source(Path(name).name if file != "-" else name, text, None if file == "-" else file)
        t0 = time.perf_counter()
        path = session.save_cache(output, source)
        render.say(console, render.saved(stats, output, os.path.getsize(path), time.perf_counter() - t0))


@cache_app.command("info")
def cache_info(
    file: options.CacheFile,
    as_json: options.JsonObject = False,
) -> None:
    """What a cache file holds: format, model, tokens, bits per number, size next to a 16-bit cache, source."""
    with user_errors():
        info = inspect_cache(file)
        typer.echo(json.dumps(info, ensure_ascii=False) if as_json else render.render_info(file, info))


@cache_app.command("load", epilog=helptext.CACHE_LOAD)
def cache_load(
    file: options.CacheFile, question: options.Question = None, chat: options.Chat = False,
    max_new_tokens: options.MaxNewTokens = 256, model: options.Model = None,
    no_stream: options.NoStream = False, as_json: options.Json = False, device: options.Device = None,
    device_map: options.DeviceMap = None, max_memory: options.MaxMemory = None,
) -> None:
    """Answer questions from the saved cache FILE (no reading of the document), one answer after another.

    Without -q: an interactive session on a terminal (a conversation), else one question per line on stdin."""
    with user_errors():
        questions, source = plan_cache_questions(list(question or []))
        answer_cache(file, Reply(questions, source, model, max_new_tokens, as_json, no_stream, chat,
                                 make_placement(device, device_map, max_memory)))


# --- commands from other modules: each adds itself with `module.register(app)` (a typer.Typer) ----------
bench.register(app)
kernels.register(app)
server.register(app)


def run() -> None:
    """Console-script entry point: SIGTERM is handled as Ctrl-C is (cleaned up), with exit code 143."""
    handle_sigterm()
    try:
        app()
    except KeyboardInterrupt:  # between commands, e.g. while Python is still importing
        interrupted()
        sys.exit(interrupt_code())


if __name__ == "__main__":
    run()
