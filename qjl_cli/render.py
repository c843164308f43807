"""What the user sees: the stderr console, answers on stdout, JSON results, summaries and warnings.

Answers (or one JSON object per question with --json) go to stdout and nothing else does; spinners,
timings and warnings go to stderr, in colour only on a terminal without NO_COLOR.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Optional

from rich.console import Console

from qjl.config import QJLConfig

if TYPE_CHECKING:
    from qjl.results import Answer, DocumentStats

    from .seams import LoadedModelLike, SessionLike


def is_terminal(stream) -> bool:
    """Whether `stream` is a terminal; every module asks here, so tests can pretend one is."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def stderr_console() -> Console:
    no_color = bool(os.environ.get("NO_COLOR")) or not is_terminal(sys.stderr)
    return Console(file=sys.stderr, no_color=no_color, highlight=False,
                   force_terminal=is_terminal(sys.stderr) or None)


def say(console: Console, message: str, style: Optional[str] = None) -> None:
    """One plain line on stderr: no markup, no highlighting, long lines left to the terminal."""
    console.print(message, markup=False, highlight=False, soft_wrap=True, style=style)


def warn(console: Console, message: str) -> None:
    say(console, f"qjl: warning: {message}")


def mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


class AnswerOutput:
    """Streams pieces to stdout when asked; on a terminal a spinner on stderr fills the wait for the first token."""

    def __init__(self, console: Console, stream: bool):
        self.stream = stream
        self.status = console.status("Answering...", spinner="dots") if console.is_terminal else None
        self.pieces = 0
        # None when there is nothing to do per piece, so the session need not call back.
        self.on_text = self._on_text if stream or self.status else None

    def __enter__(self) -> "AnswerOutput":
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


def answer_once(session: SessionLike, question: str, max_new_tokens: int, console: Console, stream: bool) -> Answer:
    with AnswerOutput(console, stream) as output:
        return session.ask(question, max_new_tokens=max_new_tokens, on_text=output.on_text)


def result(answer: Answer, stats: DocumentStats, loaded: LoadedModelLike, kv: str, name: str,
           question: str) -> dict:
    """The --json object of one answer."""
    return {
        "answer": answer.text,
        "model": loaded.name,
        "kv": kv,
        "document": name,
        "question": question,
        "document_tokens": stats.document_tokens,
        "question_tokens": answer.question_tokens,
        "history_tokens": answer.history_tokens,
        "prompt_tokens": stats.document_tokens + answer.history_tokens + answer.question_tokens,
        "generated_tokens": answer.generated_tokens,
        "kv_bytes": stats.kv_bytes,
        "fp16_bytes": stats.fp16_bytes,
        "bits_per_number": round(stats.kv_bits_per_number, 4),
        "prefill_s": round(stats.prefill_s, 4),
        "prefill_tokens_per_s": round(stats.prefill_tokens_per_s, 2),
        "first_token_s": round(answer.first_token_s, 4),
        "decode_ms_per_token": round(answer.decode_ms_per_token, 3),
        "stopped": answer.stopped,
        "layers": dict(loaded.placement),  # {device: decoder layers on it}
        **stats.extra,
    }


def summary(stats: DocumentStats, answer: Answer, loaded: LoadedModelLike, kv: str) -> str:
    """The dim line after the answers: model, document, cache size and speeds."""
    if "cache_file" in stats.extra:
        where = "the document cache" if stats.extra.get("cache") == "hit" else stats.extra["cache_file"]
        read = f"{stats.document_tokens:,} document tokens loaded from {where} in {stats.extra['cache_load_s']:.2f} s"
    else:
        read = (f"{stats.document_tokens:,} document tokens read in {stats.prefill_s:.1f} s "
                f"({stats.prefill_tokens_per_s:,.0f} tokens/s)")
    return (f"{loaded.name}, --kv {kv}: {read}; KV cache {mb(stats.kv_bytes)}, "
            f"{stats.kv_bits_per_number:.2f} bits/number (16-bit: {mb(stats.fp16_bytes)}); "
            f"first token {answer.first_token_s:.2f} s, {answer.decode_ms_per_token:.0f} ms/token, "
            f"{answer.generated_tokens} tokens")


def session_info(stats: DocumentStats, loaded: LoadedModelLike, kv: str, name: str, asked: int,
                 session: SessionLike) -> str:
    """What /info shows in the interactive loop."""
    return (f"model {loaded.name}, --kv {kv}; document {name}: {stats.document_tokens:,} tokens; "
            f"KV cache {stats.kv_bytes:,} bytes ({mb(stats.kv_bytes)}), "
            f"{stats.kv_bits_per_number:.2f} bits/number (16-bit: {mb(stats.fp16_bytes)}); "
            f"{asked} questions answered; conversation: {len(session.history())} turns kept, "
            f"{session.tail_tokens():,} tokens after the document (context {loaded.context_length:,}); "
            f"layers: {layers(loaded.placement)}")


def layers(placement: dict[str, int]) -> str:
    """'cuda:0 16, cpu 16': where the decoder layers are, device by device."""
    return ", ".join(f"{device} {n}" for device, n in placement.items())


def dropped(answer: Answer) -> Optional[str]:
    """The one-line notice when the oldest turns of a conversation were dropped to fit the context."""
    n = answer.dropped_turns
    if not n:
        return None
    return (f"(the {'oldest turn was' if n == 1 else f'{n} oldest turns were'} dropped to fit the model's context; "
            f"the document stays)")


def saved(stats: DocumentStats, output: str, size: int, seconds: float) -> str:
    """The line `qjl cache save` ends with."""
    ratio = size / stats.fp16_bytes if stats.fp16_bytes else 0.0
    return (f"Saved {stats.document_tokens:,} document tokens to {output} in {seconds:.2f} s: {mb(size)} on disk, "
            f"{stats.kv_bits_per_number:.2f} bits/number ({ratio:.1%} of a 16-bit cache, {mb(stats.fp16_bytes)}); "
            f"document read in {stats.prefill_s:.1f} s")


def truncation(cut: dict) -> str:
    """The warning after --truncate dropped part of the document."""
    part = {"head": "the end", "tail": "the beginning", "middle": "the middle"}[cut["mode"]]
    return (f"--truncate {cut['mode']}: the document is {cut['document_tokens']:,} tokens and at most "
            f"{cut['limit']:,} fit; dropped {cut['dropped_tokens']:,} tokens "
            f"({cut['dropped_chars']:,} characters) from {part}, kept {cut['kept_tokens']:,}")


def render_info(file: str, info: dict) -> str:
    """`qjl cache info` as text: one aligned row per fact."""
    ratio = info["ratio_vs_fp16"]
    rows = [
        ("file", file),
        ("format", f"{info['format']} version {info['format_version']}"),
        ("model", f"{info['model_name']}; identity {info['model_identity']}"),
        ("tokens", f"{info['document_tokens']:,}"),
        ("bits/number", f"{info['bits_per_number']:.2f}"),
        ("size", f"{mb(info['file_bytes'])} on disk; a 16-bit cache of the same tokens: {mb(info['fp16_bytes'])} "
                 f"(ratio {ratio:.3f}, {1 / ratio if ratio else 0:.1f}x smaller)"),
        ("source", _source(info["source"])),
        ("created", info["created"]),
        ("settings", _settings(info["config"])),
    ]
    return "\n".join(f"{k:<12} {v}" for k, v in rows)


def _source(src: dict) -> str:
    source = src["name"] or "?"
    if src["size"]:
        source += f", {int(src['size']):,} bytes" if str(src["size"]).isdigit() else f", {src['size']} bytes"
    if src["sha256"]:
        source += f", sha256 {src['sha256']}"
    return source


def _settings(config: dict) -> str:
    settings = dict(config)
    if settings.get("buffer") is None:  # the mode's default window, as the cache used it
        settings["buffer"] = f"{QJLConfig.from_dict(config).exact_buffer()} (the {settings.get('kv')} default)"
    return ", ".join(f"{k}={v}" for k, v in sorted(settings.items()))
