"""`qjl bench`: one row per (mode, context), every ratio against the exact cache of the same run.

The run, for each context: a warm-up of every mode at a short context (once), then `repeat` rounds that each
measure every mode in turn (so drift of a shared machine spreads over all modes alike), then with quality on
a teacher-forced pass of the essays and the needle documents through every mode. Each number is the median
of the rounds, with the smallest and largest beside it.
"""

from __future__ import annotations

import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Protocol

import torch

from .devices import describe_layers, gpus_used, memory_named, placement_of, resolve_device_dtype
from .spec import MODES, SHAPES, Geometry, check_memory, check_shape

SCHEMA_VERSION = 1
# Measured numbers whose ratio to the exact row of the same context goes into row["vs_exact"].
RATIO_FIELDS = ("kv_bytes", "bits_per_number", "prefill_tokens_per_s", "first_token_s", "decode_ms_per_token",
                "peak_memory_bytes")
TIMED_FIELDS = ("prefill_tokens_per_s", "first_token_s", "decode_ms_per_token", "peak_memory_bytes")
# A decode step costs about as much as prefilling this many tokens (progress weights only).
_STEP_WEIGHT = 16


@dataclass
class BenchSettings:
    contexts: list[int]
    modes: list[str]
    model: str | None = None  # None: $QJL_MODEL or the embedded model
    shape: str | None = None  # a random-weight shape instead of a model
    quality: bool = False
    texts: list[str] = field(default_factory=lambda: ["prose"])  # genres of qjl/data/corpus or text files
    repeat: int = 3
    steps: int = 32
    prefill_chunk: int | None = None  # None: the whole context in one pass, as `qjl ask` reads a document
    question_tokens: int = 32
    dtype: str | None = None  # None: float32 on a CPU, bfloat16 on a GPU
    device: str | None = None  # --device; or accelerate's placement over max_memory ({GPU index or "cpu": bytes})
    device_map: str | None = None
    max_memory: dict | None = None
    depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    quality_chunk: int = 32
    score_from: int = 256
    seed: int = 0
    warmup_context: int = 256

    def to_dict(self) -> dict:
        d = asdict(self)
        d["depths"] = list(self.depths)
        return d


class Reporter(Protocol):
    def start(self, total: float) -> None: ...
    def stage(self, text: str) -> None: ...
    def advance(self, amount: float) -> None: ...
    def row(self, row: dict) -> None: ...


class _Quiet:
    def start(self, total: float) -> None: pass
    def stage(self, text: str) -> None: pass
    def advance(self, amount: float) -> None: pass
    def row(self, row: dict) -> None: pass


# --- the machine --------------------------------------------------------------------------------------------
def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def kernels_state(device: torch.device) -> str:
    """Whether compiled kernels run beneath the ops on this device: the CPU ones of qjl/native, the CUDA ones of
    qjl/kernels (read after the run: both are built on first use). "off" where the module is absent."""
    try:
        if device.type == "cuda":
            from .. import kernels

            if not kernels.enabled():
                return f"off ({kernels.ENV}=0)"
            st = kernels.status()
            return "on (CUDA)" if st["status"] == "loaded" else f"off ({st['status']}{': ' if st['reason'] else ''}{st['reason']})"
        from .. import native

        return "on (CPU, qjl/native)" if native.library() is not None else "off"
    except ImportError:
        return "off"


def machine_info(device: torch.device, dtype: torch.dtype, peak_kind: str, layers: dict | None = None) -> dict:
    """The machine line's facts; layers: decoder layers per device (shown when there are several devices)."""
    import transformers

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        where = name
        threads = None
    else:
        name, threads = _cpu_name(), torch.get_num_threads()
        where = f"{name}, {threads} thread{'' if threads == 1 else 's'}"
    info = {"device": device.type, "name": name, "threads": threads, "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "dtype": str(dtype).removeprefix("torch."), "kernels": kernels_state(device), "peak_memory": peak_kind,
            "layers": layers or {}}
    info["line"] = (f"{where} · torch {info['torch']} · transformers {info['transformers']} · {info['dtype']} · "
                    f"kernels {info['kernels']}" + (f" · layers {describe_layers(layers)}" if len(layers or {}) > 1
                                                    else ""))
    return info


# --- the model ----------------------------------------------------------------------------------------------
@dataclass
class Target:
    """What is measured: a model (and its tokenizer, when it has one) on a device."""

    model: object
    name: str
    loaded: object | None  # qjl.models.LoadedModel: tokenizer and Session for quality; None for shapes
    max_positions: int
    device: torch.device
    dtype: torch.dtype
    extra: dict = field(default_factory=dict)
    layer_devices: list = field(default_factory=list)  # each decoder layer's device (empty: all on `device`)

    @property
    def watched(self) -> list[torch.device]:
        """The devices whose clocks and peak memory a measurement covers: every GPU a layer is on, else `device`."""
        return gpus_used(self.layer_devices) or [self.device]


def geometry_for(settings: BenchSettings, progress: Callable[[str], None] | None = None) -> tuple[Geometry, int]:
    """(geometry, max positions) of what is to be measured, from its config alone (no weights loaded)."""
    if settings.shape:
        shape = check_shape(settings.shape)
        return Geometry.of_config(_AttrDict(shape.config_kwargs())), shape.max_positions
    from transformers import AutoConfig

    from ..models import resolve_model

    _, source = resolve_model(settings.model, progress)
    cfg = AutoConfig.from_pretrained(source)
    cfg = cfg.get_text_config(decoder=True) if hasattr(cfg, "get_text_config") else cfg
    return Geometry.of_config(cfg), int(getattr(cfg, "max_position_embeddings", 0) or 0)


class _AttrDict(dict):
    __getattr__ = dict.get


def check_fits(settings: BenchSettings, geom: Geometry) -> None:
    """BenchError before anything is allocated when a row would not fit in memory."""
    _, dtype = resolve_device_dtype(settings)
    dtype_bytes = torch.finfo(dtype).bits // 8
    free, where = memory_named(settings)
    check_memory(geom, settings.contexts, settings.modes, settings.prefill_chunk, dtype_bytes, free, where)


def load_target(settings: BenchSettings, progress: Callable[[str], None] | None = None) -> Target:
    """The model on its device, or placed by accelerate over the devices --device-map / --max-memory name."""
    from ..placement import Placement, dispatch, input_device, layer_devices

    device, dtype = resolve_device_dtype(settings)
    placement = placement_of(settings)
    if settings.shape:
        from .shapes import synthetic_model

        model, name = synthetic_model(settings.shape, "cpu" if placement.split else device, dtype, settings.seed)
        if placement.split:
            model = dispatch(model, placement)
        return Target(model, name, None, SHAPES[settings.shape].max_positions, input_device(model), dtype,
                      layer_devices=layer_devices(model))
    from transformers.utils import logging as hf_logging

    from ..models import load_model

    hf_logging.disable_progress_bar()  # transformers' own bars; the bench shows its own
    placement = placement if placement.split else Placement(device=str(device))
    loaded = load_model(settings.model, dtype=dtype, placement=placement, progress=progress)
    return Target(loaded.model, loaded.name, loaded, loaded.context_length, loaded.input_device, dtype,
                  layer_devices=loaded.layer_devices)


# --- the run ------------------------------------------------------------------------------------------------
def _median_range(values: list[float | None]) -> tuple[float | None, list[float] | None]:
    vals = [v for v in values if v is not None]
    if not vals:
        return None, None
    return statistics.median(vals), [min(vals), max(vals)]


def _random_ids(n: int, vocab: int, seed: int, device) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(min(100, vocab - 1), vocab, (1, n), generator=gen).to(device)


def _add_ratios(rows: list[dict]) -> None:
    """row["vs_exact"][f] = row[f] / exact[f] for the exact row of the same context, from the same floats."""
    exact = {r["context"]: r for r in rows if r["mode"] == "exact" and r["status"] == "ok"}
    for row in rows:
        ref = exact.get(row["context"])
        if row["status"] != "ok" or ref is None:
            row["vs_exact"] = None
            continue
        row["vs_exact"] = {f: (row[f] / ref[f] if row.get(f) is not None and ref.get(f) else None)
                           for f in RATIO_FIELDS}


def _work(settings: BenchSettings, target: Target, runnable: list[str]) -> float:
    per_run = sum(c + (settings.steps + 2 + settings.question_tokens) * _STEP_WEIGHT for c in settings.contexts)
    total = len(runnable) * (settings.repeat * per_run + settings.warmup_context)
    if settings.quality and target.loaded is not None:
        for c in settings.contexts:
            if c <= target.max_positions:
                n = min(c, target.max_positions)
                total += len(settings.texts) * n * (1 + len(runnable)) + len(runnable) * n * len(settings.depths)
    return float(total)


def _row(mode: str, context: int, skipped: str | None, runs: list[dict] | None, quality: dict, needles: dict,
         qnote: str | None) -> dict:
    """One table row: a skipped peer, or the medians (and ranges) of a mode's rounds at a context."""
    row = {"mode": mode, "context": context, "description": MODES[mode].description}
    if skipped:
        return row | {"status": "skipped", "note": skipped}
    first = runs[0]
    row.update(status="ok", note=None, document_tokens=first["document_tokens"],
               bits_per_number=first["bits_per_number"], kv_bytes=first["kv_bytes"],
               fp16_bytes=first["fp16_bytes"], kv_vs_fp16=first["kv_bytes"] / first["fp16_bytes"])
    for f in TIMED_FIELDS:
        row[f], row[f + "_range"] = _median_range([x[f] for x in runs])
    by_text = {text: q[mode] for text, q in quality.items() if mode in q}
    row.update(runs=runs, quality=next(iter(by_text.values()), None), quality_by_text=by_text or None,
               needle=needles.get(mode), quality_note=qnote)
    return row


def run_bench(settings: BenchSettings, target: Target, reporter: Reporter | None = None,
              command: str | None = None) -> dict:
    """Measure every (mode, context) of settings on target; returns {"schema", "machine", "settings", "rows"}."""
    from .peers import make_mode_cache
    from .speed import PeakMemory, measure_once

    rep = reporter or _Quiet()
    model, device = target.model, target.device
    torch.set_grad_enabled(False)
    skipped = {m: MODES[m].missing() for m in settings.modes}
    runnable = [m for m in settings.modes if skipped[m] is None]
    vocab = int(model.config.vocab_size)
    rep.start(_work(settings, target, runnable))
    question = _random_ids(settings.question_tokens, vocab, settings.seed + 1, device)

    def factory(mode: str):
        return lambda: make_mode_cache(model.config, mode, target.layer_devices)

    # Warm-up: every mode once at a short context (imports, allocator, first-call paths), not recorded.
    for mode in runnable:
        rep.stage(f"warm-up {mode}")
        n = min(settings.warmup_context, min(settings.contexts))
        measure_once(model, factory(mode), _random_ids(n, vocab, settings.seed, device), question, 2,
                     settings.prefill_chunk, devices=target.watched)
        rep.advance(settings.warmup_context)

    rows: list[dict] = []
    haystack = None
    for context in settings.contexts:
        ids = _random_ids(context, vocab, settings.seed, device)
        runs: dict[str, list[dict]] = {m: [] for m in runnable}
        for r in range(settings.repeat):
            for mode in runnable:
                rep.stage(f"{mode} @ {context:,} tokens, round {r + 1}/{settings.repeat}")
                t0 = time.perf_counter()
                res = measure_once(model, factory(mode), ids, question, settings.steps, settings.prefill_chunk,
                                   on_tokens=rep.advance, devices=target.watched)
                res["seconds"] = time.perf_counter() - t0
                runs[mode].append(res)
                rep.advance((settings.steps + 2 + settings.question_tokens) * _STEP_WEIGHT)
        quality, needles, qnote = _quality_for(settings, target, context, runnable, rep)
        for mode in settings.modes:
            row = _row(mode, context, skipped[mode], runs.get(mode), quality, needles, qnote)
            rows.append(row)
            rep.row(row)
    _add_ratios(rows)
    from ..placement import layer_counts

    peak_kind = PeakMemory(target.watched).kind
    layers = layer_counts(target.layer_devices)
    return {"schema": SCHEMA_VERSION, "machine": machine_info(target.watched[0], target.dtype, peak_kind, layers),
            "settings": {**settings.to_dict(), "model_name": target.name, "max_positions": target.max_positions,
                         "command": command}, "rows": rows}


def _quality_for(settings: BenchSettings, target: Target, context: int, modes: list[str],
                 rep: Reporter) -> tuple[dict, dict, str | None]:
    """({text: {mode: quality dict}}, {mode: needle dict}, note when not applicable) at one context."""
    if not settings.quality:
        return {}, {}, None
    if target.loaded is None:
        return {}, {}, "n/a: random weights (quality needs a trained model)"
    if context > target.max_positions:
        return {}, {}, (f"n/a: {context:,} tokens is beyond the model's {target.max_positions:,}-token context "
                        f"(speed and memory are still measured)")
    from .corpus import label_of, text_of

    quality = {}
    for name in settings.texts:
        quality[label_of(name)] = _text_quality(settings, target, context, modes, rep, name, text_of(name))
    return quality, _needles(settings, target, context, modes, rep), None


def _text_quality(settings: BenchSettings, target: Target, context: int, modes: list[str], rep: Reporter,
                  name: str, text: str) -> dict:
    """{mode: quality dict} of every mode on the first `context` tokens of one text, against one exact pass."""
    from .corpus import label_of
    from .peers import make_mode_cache
    from .perplexity import exact_logprobs, quality_of

    model, tok = target.model, target.loaded.tokenizer
    ids = tok(text[: context * 8], return_tensors="pt", add_special_tokens=False)["input_ids"][:, :context]
    ids = ids.to(target.device)
    label = label_of(name)
    rep.stage(f"quality @ {context:,}, {label}: exact reference pass")
    reference = exact_logprobs(model, ids)
    rep.advance(context)
    out = {}
    for mode in modes:
        rep.stage(f"quality @ {context:,}, {label}: {mode}, teacher-forced")
        make = lambda m=mode: make_mode_cache(model.config, m, target.layer_devices)  # noqa: E731
        out[mode] = quality_of(model, ids, make, reference, settings.score_from,
                               settings.quality_chunk) | {"text": label}
        rep.advance(context)
    return out


def _needles(settings: BenchSettings, target: Target, context: int, modes: list[str], rep: Reporter) -> dict:
    """{mode: needle dict}: the needle at every depth of the essays (the corpus's prose), each mode."""
    from .corpus import text_of
    from .haystack import NEEDLE_MARGIN, needle
    from .peers import make_mode_cache

    length = min(context, target.max_positions - NEEDLE_MARGIN)
    found: dict[str, list[dict]] = {m: [] for m in modes}
    configs = {m: (lambda cfg, m=m: make_mode_cache(cfg, m, target.layer_devices)) for m in modes}

    def on_row(row: dict) -> None:
        found[row["config"]].append({"depth": row["depth"], "found": row["found"], "answer": row["answer"]})
        rep.advance(length)
        rep.stage(f"needle @ {length:,}: {row['config']} depth {row['depth']:.0%}")

    needle(target.loaded, configs, [length], list(settings.depths), trials=1, seed=settings.seed,
           on_row=on_row, haystack=text_of("prose"))
    return {m: {"hits": sum(t["found"] for t in found[m]), "trials": len(found[m]), "length": length,
                "trials_detail": found[m]} for m in modes}


def describe_command(argv: list[str] | None = None) -> str:
    return " ".join(["qjl", *(argv if argv is not None else sys.argv[1:])])
