"""Every option and argument of the commands, each declared once; a command names it as a type.

    def ask(model: options.Model = None, as_json: options.Json = False, ...)

A new command module (e.g. `qjl bench`) imports the same names, so `--model` or `--json` read and
mean the same everywhere.
"""

from __future__ import annotations

import enum
from typing import Annotated, Any, Optional

import typer


class KVMode(str, enum.Enum):
    turbo = "turbo"
    qjl = "qjl"
    exact = "exact"


class Truncate(str, enum.Enum):
    head = "head"
    tail = "tail"
    middle = "middle"


def json_option(help: str = "Print one JSON object (answer and measurements) per question on stdout.") -> Any:
    """--json, with the help of a command whose objects are not answers."""
    return typer.Option("--json", help=help)


Model = Annotated[Optional[str], typer.Option(
    "--model", "-m", show_default=False,
    help="Model: a Hugging Face id (org/name), a local model folder or a .gguf file. "
         "Default: $QJL_MODEL, else the embedded SmolLM2-135M-Instruct. A cache file needs the model that saved it.")]
KV = Annotated[KVMode, typer.Option(
    "--kv", help="KV cache: turbo (rotation + Lloyd-Max codes, about 3 bits a number), qjl (1-bit JL sketch keys "
                 "after the QJL paper), or exact (uncompressed, to compare; a cache file holds turbo or qjl).")]
AskKV = Annotated[Optional[KVMode], typer.Option(
    "--kv", show_default="turbo",
    help="KV cache: turbo (rotation + Lloyd-Max codes, about 3 bits a number), qjl (1-bit JL sketch keys after the "
         "QJL paper), or exact (uncompressed, to compare). A .qjl file answers in its own mode.")]
Chat = Annotated[bool, typer.Option(
    "--chat", help="Make the questions (-q, --questions, stdin) a conversation: each answer sees the earlier "
                   "questions and answers. Without it each is answered from the document alone; an interactive "
                   "session is always a conversation.")]
MaxNewTokens = Annotated[int, typer.Option("--max-new-tokens", min=1, help="Most tokens in each answer.")]
PrefillChunk = Annotated[Optional[int], typer.Option(
    "--prefill-chunk", min=1, metavar="N", show_default=False,
    help="Read the document N tokens at a time (less peak memory). Default: all at once.")]
Password = Annotated[Optional[str], typer.Option(
    "--password", envvar="QJL_PDF_PASSWORD", show_default=False,
    help="Password of an encrypted PDF (or set QJL_PDF_PASSWORD).")]
Json = Annotated[bool, json_option()]
JsonObject = Annotated[bool, json_option("Print one JSON object on stdout.")]
NoCache = Annotated[bool, typer.Option(
    "--no-cache", help="Neither use nor store the automatic document cache (under QJL_HOME; QJL_CACHE=0 turns it "
                       "off everywhere): the document is read again.")]
NoStream = Annotated[bool, typer.Option(
    "--no-stream", help="Print each answer at the end instead of token by token on a terminal.")]
Question = Annotated[Optional[list[str]], typer.Option(
    "--question", "-q", show_default=False,
    help="A question (repeat for several: all are answered from one reading of the document, or from the "
         "cache file).")]
QuestionsFile = Annotated[Optional[str], typer.Option(
    "--questions", metavar="FILE", show_default=False,
    help="Answer one question per line of FILE (- for stdin) from one reading of the document; "
         "JSON Lines on stdout, one object per question.")]
TruncateOpt = Annotated[Optional[Truncate], typer.Option(
    "--truncate", show_default=False,
    help="A document longer than the model's context: keep its head, tail or both ends (middle dropped) "
         "instead of failing; what was dropped is reported on stderr.")]
Output = Annotated[str, typer.Option(
    "--output", "-o", show_default=False, metavar="FILE.qjl",
    help="Cache file to write (replaced atomically if it exists).")]

DocumentsAndQuestion = Annotated[Optional[list[str]], typer.Argument(
    metavar="FILE... [QUESTION]", show_default=False,
    help="Documents to read (.txt, .md, .html, .pdf, or - for stdin; several are read as one, each introduced "
         "by its name) or one .qjl cache file from `qjl cache save`; then the question. With -q or --questions "
         "every argument is a document. No question: an interactive session on a terminal, else one question "
         "per line on stdin.")]
Document = Annotated[str, typer.Argument(
    show_default=False, help="Document to read: a .txt, .md, .html or .pdf file, or - for stdin.")]
CacheFile = Annotated[str, typer.Argument(show_default=False, help="A .qjl cache file from `qjl cache save`.")]
Device = Annotated[Optional[str], typer.Option(
    "--device", metavar="DEVICE", show_default=False,
    help="cpu, cuda or cuda:N: the whole model on one device. Default: the GPU when there is one, else the CPU.")]
DeviceMap = Annotated[Optional[str], typer.Option(
    "--device-map", metavar="MAP", show_default=False,
    help="auto, balanced or sequential: let accelerate place the layers over the GPUs and CPU memory (or set "
         "QJL_DEVICE_MAP); each layer's cache stays on its layer's device.")]
MaxMemory = Annotated[Optional[str], typer.Option(
    "--max-memory", metavar="DEV=SIZE,...", show_default=False,
    help="Most memory accelerate may use on each device, e.g. 0=20GiB,1=20GiB,cpu=64GiB (or set QJL_MAX_MEMORY); "
         "implies "
         "--device-map auto. A model and document that cannot fit are refused before loading.")]
Idle = Annotated[Optional[str], typer.Option(
    "--idle", metavar="DURATION", show_default=False,
    help="Stop after this long without a command (90s, 30m, 2h). Default: run until Ctrl-C or SIGTERM.")]
