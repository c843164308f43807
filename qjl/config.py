"""Every knob of the compressed cache, with the reason for its default.

A `QJLConfig` is frozen: a cache, a cache file and a benchmark row each carry
exactly one, so two runs with equal configs compress identically.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

KV_MODES = ("qjl", "exact")


class ConfigError(ValueError):
    """An invalid combination of settings (a user error, not a bug)."""


@dataclass(frozen=True)
class QJLConfig:
    # "qjl": 1-bit JL keys + integer values; "exact": transformers' ordinary cache, for comparison.
    kv: str = "qjl"
    # JL sketch rows per key, as a multiple of head_dim: 2x gives 2 bits a key number and +16%..+5% ppl (see BENCHMARKS.md).
    sketch_ratio: float = 2.0
    # The first layers are the most sensitive (paper §4): they get this many times the sketch.
    early_sketch_factor: int = 2
    # How many of the first layers count as "early"; 2 of 30 costs +0.14 bits a key number on SmolLM2.
    early_layers: int = 2
    # Outlier channels kept exactly per token group and KV head, as a fraction of head_dim (4 of 64, 8 of 128).
    outlier_fraction: float = 1 / 16
    # Tokens per group: outlier channels are chosen per group, and the buffer flushes whole groups.
    group_size: int = 32
    # Most recent tokens kept exact; they get the most attention and cost little at long context.
    buffer: int = 128
    # Subtract each head's mean key (computed once, from the first flushed group onward, kept exactly) before
    # sketching: keys share a large common direction that otherwise dominates ||k|| and so the estimator's noise.
    center_keys: bool = True
    # Bits per value number; 2 is KIVI's setting and keeps the cache near 3 bits per number overall.
    value_bits: int = 2
    # Channels per value quantisation group: one fp16 scale and minimum per group of this many numbers.
    value_group: int = 32
    # Seed of the JL projections; the matrices themselves go into cache files, so results never depend on the RNG.
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kv not in KV_MODES:
            raise ConfigError(f"unknown --kv mode {self.kv!r}; choose one of {', '.join(KV_MODES)}")
        if self.value_bits not in (2, 4, 8):
            raise ConfigError(f"value_bits must be 2, 4 or 8, not {self.value_bits}")
        if self.group_size < 1 or self.buffer < 0:
            raise ConfigError("group_size must be >= 1 and buffer >= 0")
        if self.sketch_ratio <= 0 or self.early_sketch_factor < 1 or self.early_layers < 0:
            raise ConfigError("sketch_ratio must be > 0, early_sketch_factor >= 1, early_layers >= 0")
        if not 0 <= self.outlier_fraction < 1:
            raise ConfigError("outlier_fraction must be in [0, 1)")
        if self.value_group < 1:
            raise ConfigError("value_group must be >= 1")

    # --- derived sizes, per layer -------------------------------------------------------
    def sketch_dim(self, layer_idx: int, head_dim: int) -> int:
        """Sketch rows m for a layer, a multiple of 8 so signs pack into whole bytes."""
        m = self.sketch_ratio * head_dim
        if layer_idx < self.early_layers:
            m *= self.early_sketch_factor
        return max(8, int(round(m / 8)) * 8)

    def outliers(self, head_dim: int) -> int:
        return int(round(self.outlier_fraction * head_dim))

    def value_group_for(self, head_dim: int) -> int:
        """The value group, shrunk to head_dim when a head is smaller than one group."""
        g = min(self.value_group, head_dim)
        if head_dim % g:
            raise ConfigError(f"value_group {self.value_group} does not divide head_dim {head_dim}")
        return g

    # --- serialisation (cache files, --json, bench rows) -------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "QJLConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown config fields: {', '.join(sorted(unknown))}")
        return cls(**d)

    def replace(self, **changes) -> "QJLConfig":
        return dataclasses.replace(self, **changes)
