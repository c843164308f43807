"""What `qjl bench` can measure, without torch: modes, random-weight shapes, context sizes, a memory estimate.

Everything here is checked before a model is loaded, so a bad option is a one-line error in a blink.
"""

from __future__ import annotations

import importlib
import os
import re
from dataclasses import dataclass, field

from ..config import TURBO_PRESETS
from ..errors import BenchError


@dataclass(frozen=True)
class ModeSpec:
    """One cache to measure: one of qjl's own (`kv`) or transformers' QuantizedCache with a backend (a peer)."""

    name: str
    description: str
    kv: str | None = None  # qjl's --kv mode
    backend: str | None = None  # transformers QuantizedCache backend
    peer_kwargs: dict = field(default_factory=dict)
    module: str | None = None  # what a peer imports
    package: str | None = None  # the PyPI package that provides it
    default: bool = True
    config: dict = field(default_factory=dict)  # qjl's own modes: QJLConfig fields beside kv (a preset)

    @property
    def is_peer(self) -> bool:
        return self.backend is not None

    def missing(self) -> str | None:
        """None when the mode can run here, else why not and how to fix it (a peer not installed)."""
        if not self.is_peer:
            return None
        try:
            importlib.import_module(self.module)
        except ImportError:
            return f"{self.package} is not installed: pip install 'qjl[peers]' (or pip install {self.package})"
        return None


# Peers at their documentation's settings: transformers' QuantizedCache defaults (KIVI-style: 64-number groups,
# the last 128 tokens kept in the model's dtype); quanto at axis 0, HQQ at axis 1 as transformers' KV cache guide
# shows them.
_WINDOW = dict(q_group_size=64, residual_length=128)
MODES: dict[str, ModeSpec] = {m.name: m for m in (
    ModeSpec("turbo", "qjl's default: rotation + Lloyd-Max codes, ~3 bits", kv="turbo"),
    ModeSpec("turbo-2.5", "turbo at about 2.5 bits: 2-bit keys (+ 16 channels apart), 2-bit values (not in "
             "the default set)", kv="turbo", config=TURBO_PRESETS["2.5"], default=False),
    ModeSpec("qjl", "1-bit QJL keys (residual signs) + 2-bit values", kv="qjl"),
    ModeSpec("exact", "transformers' ordinary cache, the model's dtype (the reference)", kv="exact"),
    ModeSpec("quanto-4bit", "QuantizedCache, optimum-quanto int4, group 64, residual 128", backend="quanto",
             peer_kwargs=dict(nbits=4, axis_key=0, axis_value=0, **_WINDOW), module="optimum.quanto",
             package="optimum-quanto"),
    ModeSpec("quanto-2bit", "QuantizedCache, optimum-quanto int2, group 64, residual 128", backend="quanto",
             peer_kwargs=dict(nbits=2, axis_key=0, axis_value=0, **_WINDOW), module="optimum.quanto",
             package="optimum-quanto"),
    ModeSpec("hqq-4bit", "QuantizedCache, HQQ 4-bit, axis 1, group 64, residual 128", backend="hqq",
             peer_kwargs=dict(nbits=4, axis_key=1, axis_value=1, **_WINDOW), module="hqq", package="hqq"),
    ModeSpec("hqq-2bit", "QuantizedCache, HQQ 2-bit, axis 1, group 64, residual 128 (not in the default set)",
             backend="hqq", peer_kwargs=dict(nbits=2, axis_key=1, axis_value=1, **_WINDOW), module="hqq",
             package="hqq", default=False),
)}
DEFAULT_MODES = tuple(name for name, m in MODES.items() if m.default)


@dataclass(frozen=True)
class Shape:
    """A Llama geometry built with random weights: speed and memory do not depend on the weights."""

    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int = 128256
    max_positions: int = 131072
    rope_theta: float = 500000.0
    tie_embeddings: bool = False

    def config_kwargs(self) -> dict:
        return dict(vocab_size=self.vocab, hidden_size=self.hidden, intermediate_size=self.intermediate,
                    num_hidden_layers=self.layers, num_attention_heads=self.heads,
                    num_key_value_heads=self.kv_heads, head_dim=self.head_dim,
                    max_position_embeddings=self.max_positions, rope_theta=self.rope_theta,
                    tie_word_embeddings=self.tie_embeddings)

    def parameters(self) -> int:
        attn = self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads)
        mlp = 3 * self.hidden * self.intermediate
        emb = self.vocab * self.hidden * (1 if self.tie_embeddings else 2)
        return self.layers * (attn + mlp + 2 * self.hidden) + emb + self.hidden


SHAPES: dict[str, Shape] = {s.name: s for s in (
    Shape("llama-3.1-8b", 4096, 14336, 32, 32, 8, 128),
    Shape("llama-3.2-1b", 2048, 8192, 16, 32, 8, 64, tie_embeddings=True),
    Shape("llama-2-7b", 4096, 11008, 32, 32, 32, 128, vocab=32000, max_positions=4096, rope_theta=10000.0),
    Shape("smollm2-135m", 576, 1536, 30, 9, 3, 64, vocab=49152, max_positions=8192, rope_theta=100000.0,
          tie_embeddings=True),
    # For tests: runs a bench row in well under a second.
    Shape("tiny", 128, 256, 2, 4, 2, 32, vocab=512, max_positions=131072, rope_theta=10000.0),
)}


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmM]?)\s*$")


def parse_size(text: str) -> int:
    """'32k' -> 32768, '1m' -> 1048576, '4096' -> 4096 (k and m are binary, as context sizes are)."""
    m = _SIZE.match(text)
    if not m:
        raise BenchError(f"{text.strip()!r} is not a size: give tokens like 4096, 8k or 32k")
    value = float(m.group(1)) * {"": 1, "k": 1024, "m": 1024 ** 2}[m.group(2).lower()]
    if value != int(value) or int(value) < 1:
        raise BenchError(f"{text.strip()!r} is not a whole number of tokens of at least 1: give tokens like 4096, 8k or 32k")
    return int(value)


def parse_contexts(text: str) -> list[int]:
    """'4k,8k,16k' -> [4096, 8192, 16384], in the order given, without repeats."""
    out: list[int] = []
    for part in text.split(","):
        n = parse_size(part)
        if n not in out:
            out.append(n)
    return out


def parse_modes(text: str | None) -> list[str]:
    if not text or text.strip() == "default":
        return list(DEFAULT_MODES)
    if text.strip() == "all":
        return list(MODES)
    out: list[str] = []
    for part in text.split(","):
        name = part.strip().lower()
        if name not in MODES:
            raise BenchError(f"unknown mode {part.strip()!r}; choose from {', '.join(MODES)} (or 'all')")
        if name not in out:
            out.append(name)
    return out


def check_shape(name: str) -> Shape:
    if name not in SHAPES:
        raise BenchError(f"unknown shape {name!r}; choose one of {', '.join(SHAPES)}")
    return SHAPES[name]


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


# --- memory: estimated before anything is allocated -----------------------------------------------------
@dataclass(frozen=True)
class Geometry:
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    hidden: int
    intermediate: int
    vocab: int
    parameters: int

    @classmethod
    def of_config(cls, cfg) -> "Geometry":
        """From a transformers config (or anything with its attribute names)."""
        heads = int(cfg.num_attention_heads)
        head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
        kv = int(getattr(cfg, "num_key_value_heads", None) or heads)
        h, inter, L, V = int(cfg.hidden_size), int(cfg.intermediate_size), int(cfg.num_hidden_layers), int(cfg.vocab_size)
        tied = bool(getattr(cfg, "tie_word_embeddings", False))
        params = L * (h * head_dim * (2 * heads + 2 * kv) + 3 * h * inter + 2 * h) + V * h * (1 if tied else 2) + h
        return cls(L, heads, kv, head_dim, h, inter, V, params)


def estimate_bytes(geom: Geometry, context: int, mode: str, chunk: int | None, dtype_bytes: int) -> int:
    """A generous estimate of the memory one bench row needs at its peak: weights, the cache, and the largest
    activations of a prefill chunk (attention scores over the whole context, in float32, a few copies)."""
    numbers = 2 * context * geom.layers * geom.kv_heads * geom.head_dim  # keys and values
    spec = MODES[mode]
    if spec.kv == "exact":
        kv = numbers * dtype_bytes
    elif spec.is_peer:  # quantised states, plus one layer dequantised (and concatenated) at a time
        kv = numbers * (spec.peer_kwargs["nbits"] + 2) // 8 + 3 * numbers // geom.layers * dtype_bytes
    else:  # qjl and turbo hold ~3 bits a number; encoding a layer's chunk takes a [groups, 512] search
        kv = numbers * 4 // 8 + 128 * min(chunk or context, context) * geom.kv_heads * geom.head_dim * 4
    chunk = min(chunk or context, context)
    # One pass over the whole context runs causal SDPA, which never holds the [chunk, context] scores; a later
    # chunk of several attends with a mask, which does (float32, a few copies).
    scores = 3 * geom.heads * chunk * (256 if chunk == context else context) * 4
    mlp = 4 * chunk * geom.intermediate * 4 + 6 * chunk * geom.hidden * 4
    return geom.parameters * dtype_bytes + kv + scores + mlp


def available_bytes() -> int | None:
    """Memory this process could still take on the CPU: MemAvailable from /proc/meminfo (None if unknown)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(geom: Geometry, contexts: list[int], modes: list[str], chunk: int | None, dtype_bytes: int,
                 available: int | None, where: str) -> None:
    """BenchError naming the largest row that would not fit, before anything is allocated."""
    if available is None:
        return
    worst = max(((estimate_bytes(geom, c, m, chunk, dtype_bytes), c, m) for c in contexts for m in modes))
    need, context, mode = worst
    if need > available:
        raise BenchError(f"--context {context} with mode {mode} would need about {human_bytes(need)} of memory "
                         f"({where} has {human_bytes(available)} free); give a smaller --context, fewer --modes "
                         f"or a smaller --prefill-chunk")
