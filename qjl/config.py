"""Every knob of the compressed cache, with the reason for its default.

A `QJLConfig` is frozen: a cache, a cache file and a benchmark row each carry
exactly one, so two runs with equal configs compress identically.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from .errors import ConfigError  # noqa: F401 - re-exported

KV_MODES = ("qjl", "turbo", "exact")
# Seeds of the per-model matrices: config.seed * 1000 + the role's number, so every matrix of a model has its own
# seed and equal configs draw equal matrices (cache files store the matrices anyway).
MATRIX_ROLES = {"early_projection": 0, "projection": 1, "key_rotation": 2, "key_residual": 3, "value_rotation": 4}



@dataclass(frozen=True)
class QJLConfig:
    # "turbo": rotation + Lloyd-Max codes for both (qjl/turbo.py), the default: at 2.98 bits a number it
    # measured ppl x1.014-1.017 against x1.058 for "qjl" at 2.99 (BENCHMARKS.md); "qjl": the paper's 1-bit JL
    # keys + integer values; "exact": transformers' ordinary cache, for comparison.
    kv: str = "turbo"
    # JL sketch rows per key, as a multiple of head_dim: 2x is the paper's choice, 2 bits a key number in signs.
    sketch_ratio: float = 2.0
    # The paper gives its first layers a larger sketch; on SmolLM2 two early layers at 2x cost 0.13 bits a key
    # number and did not lower perplexity (BENCHMARKS.md), so the default gives none.
    early_sketch_factor: int = 2
    early_layers: int = 0
    # Softmax over noisy logits favours the noisiest: E[exp(l + e)] = exp(l + var/2), so compressed tokens gain
    # weight against the exact sink, window and question tokens, most where ||q'|| ||k_in|| is large. Each sketch
    # logit is lowered by this multiple of var/2, var = (pi/2 - 1)/m * (||q'||^2 ||k_in||^2 - <q',k_in>^2) (the sign
    # estimate's variance for orthogonal sketch rows; <q',k_in> is the estimate itself). No bits, no layout: decode
    # only. 0.75 measured best of 0.75/1/1.25 on four genres; at 4,352 tokens ppl x1.039/1.051/1.090/1.065 ->
    # x1.028/1.047/1.081/1.057 (prose, docs, code, numbers), KL -10% to -22%. 0 turns it off. (turbo's 3-bit code
    # error is ~8x smaller: the same correction measured no gain there, so it is the qjl mode's only; BENCHMARKS.md
    # "The softmax's noise bias".)
    sketch_softmax_correction: float = 0.75
    # Residual signs: the sketch's second block of d rows (weighted by this, the b-th by its b-th power) signs what
    # the first block's signs leave of the key rather than the key itself, the blocks then re-signed in turn given
    # the others (3 passes), and each key's scale stored so the estimate stays unbiased along the key. The same
    # bits, the same estimate <Sq, signs> (ops and kernels unchanged); the logit error's variance is 2.2x lower
    # (0.26/m against (pi/2 - 1)/m). 0 = the paper's signs, sign(S k). 0.65: the least error on Gaussian keys; 0.6
    # and 0.75 measured alike on code and numbers (KL within 4%). At 4,352 tokens ppl x1.028/1.047/1.081/1.057 ->
    # x1.015/1.024/1.051/1.024 (prose, docs, code, numbers), KL -36% to -38% (BENCHMARKS.md "Residual signs").
    sketch_residual_weight: float = 0.65
    # Outlier channels kept apart from the sketch, as a fraction of head_dim (8 of 64, 16 of 128): they carry
    # most of a key's norm, and the sketch's noise grows with the norm it has to cover.
    outlier_fraction: float = 1 / 8
    # "group": outlier channels chosen per token group (the paper); "head": chosen once per KV head from the
    # first compressed tokens, so the query's matching channels can be left out of the sketch estimate.
    outlier_scope: str = "head"
    # Scope "head": pick the channels by q_j^2 * k_j^2 over the prefill's queries and keys (the variance each
    # channel would add to the estimate) rather than by k_j^2 alone: -2 to -3 points of perplexity, no bits.
    query_aware_outliers: bool = True
    # Bits of each outlier number: 16 keeps them exactly (fp16); 8 or 4 quantise each channel over a token
    # group with an fp16 scale and minimum (scope "head" only).
    outlier_bits: int = 4
    # The document's first tokens, kept exact in 16 bits (attention sinks: most heads put much of their weight
    # on them, so their error is not averaged away). Costs 16 bits a number for these few tokens only.
    # 4 (StreamingLLM's choice): on SmolLM2 one token gives most of the gain (turbo K3/V2: x1.043 -> x1.024).
    sink_tokens: int = 4
    # Tokens per group: outlier channels are chosen per group, and the buffer flushes whole groups.
    group_size: int = 32
    # Most recent document tokens kept exact in 16 bits (the window holds buffer to buffer + group_size - 1 of
    # them). None: 64 for qjl, rather than the paper's 128 (at 4k tokens each 64 exact tokens cost 0.25 bits a
    # number, and the question and answer tokens are exact anyway); 0 for turbo, whose codes are good enough
    # that the window's bits are better spent elsewhere (buffer 32: x1.018 at 3.07 bits; 0: x1.020 at 2.98).
    buffer: int | None = None
    # Subtract each head's mean key (computed once, from the first flushed group onward, kept exactly) before
    # sketching: keys share a large common direction that otherwise dominates ||k|| and so the estimator's noise.
    center_keys: bool = False  # measured: centring raised perplexity (BENCHMARKS.md), so it is off
    # Bits per value number; 2 is KIVI's setting and keeps the cache near 3 bits per number overall.
    value_bits: int = 2
    # Channels per value group: one fp16 scale and minimum per group. 64 costs 0.5 bits a value number
    # less than KIVI's 32 and measured no worse on SmolLM2.
    value_group: int = 64
    # --kv qjl: each value group's scale and minimum fitted to its codes by least squares, then the scale stretched
    # about the group's mean so the decoded group keeps its own projection on itself (qjl::int_quantize's `fit`):
    # about half the squared error of min/max codes at 2 bits, without least squares' shrinkage. At 4,352 tokens:
    # ppl x1.057/1.057/1.101/1.083 -> x1.039/1.051/1.090/1.065 (prose, docs, code, numbers), KL -8% to -19%; least
    # squares without the stretch was worse than min/max (code x1.141), and fitting the 4-bit key channels apart
    # measured nothing (BENCHMARKS.md "Fitted integer values").
    value_fit: bool = True
    # --kv turbo: bits per key coordinate, 1 to 4; a fraction puts that share of the rotated coordinates (in
    # multiples of 8) at one bit more (2.5: half at 3 bits). 3: on SmolLM2 (2,304 tokens, V 2-bit) K3 gave ppl
    # x1.043 at 3.12 bits a number against x1.144 for K2 at 2.64; softmax amplifies key error.
    turbo_key_bits: float = 3
    # --kv turbo, 3-bit keys: "vq2" codes each pair of rotated coordinates as the nearest of 64 points of a 2-D
    # k-means codebook (qjl/data/vq2_64.txt; the same 6-bit pair indices the scoring tables read): 0.030 against
    # 0.0345 mean squared error for "scalar" Lloyd-Max codes, the same bits (BENCHMARKS.md "Cache format 5").
    turbo_key_codebook: str = "vq2"
    # --kv turbo: bits per value coordinate, as the keys'. Values carried ~70% of the output error, so the bits
    # the 8-bit scales free go here: 2.25 with the 4-D codebook took KL -22% to -30% on every genre.
    turbo_value_bits: float = 2.25
    # --kv turbo, 2 or 2.25-bit values: "vq4" codes each 4 rotated coordinates as the nearest of 2^(4 bits) points
    # of a 4-D k-means codebook (qjl/data/vq4_256.txt: one byte, 0.096 mean squared error against 0.1175 for
    # "scalar" per-coordinate Lloyd-Max; vq4_512.txt: 9 bits, 0.070). Other value bit widths are scalar.
    turbo_value_codebook: str = "vq4"
    # --kv turbo: bits of each key's and value's scale: 16 (fp16), or 8 (a code times an fp16 step per group_size
    # tokens, 8.5 bits) so that 2.25-bit values fit under 3 bits a number. Measured on four genres at 4,352
    # tokens: KL within 0.0008 of fp16 scales (BENCHMARKS.md "Cache format 5").
    turbo_norm_bits: int = 8
    # --kv turbo: layers whose keys (k) or values (v) take other bits than turbo_key_bits / turbo_value_bits, as
    # "v1=3" or "v1=3,k11=4" (0-based layer indices; bits 1 to 4, scalar codes where no codebook has those bits).
    # SmolLM2's layer-1 values weigh about 5x the median layer's in the output's KL (one layer's codes at a time,
    # code and docs alike): 3 bits there cost 0.012 bits a number over 30 layers and took KL -3% to -13% per genre
    # (BENCHMARKS.md "Per-layer bits"). Other layers, and keys, measured no gain worth their bits. For another
    # model, measure with scripts/genre_probe.py --layers; "" codes every layer alike (cache format 5's layout).
    turbo_layer_bits: str = "v1=3"
    # --kv turbo: store each value's scale as ||v|| / <y, y_hat> (y the rotated unit vector, y_hat its codes), so the
    # decoded value has v's own projection on v, rather than the least-squares fit, which shortens every value by
    # the codes' relative error (~7% at 2.25 bits) alike: a bias the weighted sum of many tokens keeps while their
    # independent errors average out. Same bits, layout and kernels (only the stored number changes).
    turbo_unbiased_values: bool = True
    # The same for keys: least-squares keys shrink every compressed logit (~3% at 3 bits, ~12% at 2) against the
    # exact sink and question tokens'. Both on, at 4,352 tokens: KL -38% to -50% on every genre, code's
    # perplexity excess 4.0% -> 2.0%; turbo-2.5's 4.9-16% -> 2.2-4.8% (BENCHMARKS.md "Unbiased scales").
    turbo_unbiased_keys: bool = True
    # --kv turbo: rows of the 1-bit QJL sketch of each key's residual, as a multiple of head_dim; 0 = none:
    # K2 + a residual with m = d measured x1.062 at 3.25 bits, worse than K3 alone (x1.043 at 3.12).
    turbo_residual_ratio: float = 0.0
    # --kv turbo: key channels kept apart from the rotation, as a fraction of head_dim (rounded to a multiple of 8,
    # so the rotated rest packs into whole bytes), chosen per KV head by q^2 k^2 and stored with outlier_bits over
    # group_size tokens like the QJL mode's outliers. The rotation and codes then cover the other channels.
    # 1/8 with K3: x1.020 at 2.98 bits against x1.027 at 2.95 bits with none, and K3 on all channels costs more.
    turbo_outlier_fraction: float = 0.125
    # Seed of the JL projections; the matrices themselves go into cache files, so results never depend on the RNG.
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kv not in KV_MODES:
            raise ConfigError(f"unknown --kv mode {self.kv!r}; choose one of {', '.join(KV_MODES)}")
        if self.value_bits not in (2, 4, 8):
            raise ConfigError(f"value_bits must be 2, 4 or 8, not {self.value_bits}")
        if not (1 <= self.turbo_key_bits <= 4 and 1 <= self.turbo_value_bits <= 4):
            raise ConfigError(f"turbo_key_bits and turbo_value_bits must be 1 to 4, not "
                              f"{self.turbo_key_bits} and {self.turbo_value_bits}")
        if self.turbo_value_codebook not in ("scalar", "vq4"):
            raise ConfigError(f"turbo_value_codebook must be 'scalar' or 'vq4', not {self.turbo_value_codebook!r}")
        if self.turbo_key_codebook not in ("scalar", "vq2"):
            raise ConfigError(f"turbo_key_codebook must be 'scalar' or 'vq2', not {self.turbo_key_codebook!r}")
        self.layer_bits()  # raises ConfigError on a malformed turbo_layer_bits
        if self.turbo_norm_bits not in (8, 16):
            raise ConfigError(f"turbo_norm_bits must be 8 or 16, not {self.turbo_norm_bits}")
        if not 0 <= self.turbo_outlier_fraction < 1:
            raise ConfigError("turbo_outlier_fraction must be in [0, 1)")
        if self.turbo_residual_ratio < 0:
            raise ConfigError("turbo_residual_ratio must be >= 0")
        if self.sink_tokens < 0:
            raise ConfigError("sink_tokens must be >= 0")
        if self.group_size < 1 or (self.buffer is not None and self.buffer < 0):
            raise ConfigError("group_size must be >= 1 and buffer >= 0")
        if self.sketch_ratio <= 0 or self.early_sketch_factor < 1 or self.early_layers < 0:
            raise ConfigError("sketch_ratio must be > 0, early_sketch_factor >= 1, early_layers >= 0")
        if not 0 <= self.sketch_softmax_correction <= 4:
            raise ConfigError(f"sketch_softmax_correction must be 0 to 4, not {self.sketch_softmax_correction}")
        if not 0 <= self.sketch_residual_weight <= 1:
            raise ConfigError(f"sketch_residual_weight must be 0 to 1, not {self.sketch_residual_weight}")
        if not 0 <= self.outlier_fraction < 1:
            raise ConfigError("outlier_fraction must be in [0, 1)")
        if self.outlier_scope not in ("group", "head"):
            raise ConfigError(f"outlier_scope must be 'group' or 'head', not {self.outlier_scope!r}")
        if self.outlier_bits not in (2, 4, 8, 16):
            raise ConfigError(f"outlier_bits must be 2, 4, 8 or 16, not {self.outlier_bits}")
        if self.outlier_bits < 16 and self.group_size * self.outlier_bits % 8:
            raise ConfigError(f"group_size {self.group_size} of {self.outlier_bits}-bit outliers does not fill whole "
                              f"bytes; use a multiple of {8 // self.outlier_bits}")
        if self.outlier_bits < 16 and self.outlier_scope != "head":
            raise ConfigError("quantised outliers (outlier_bits < 16) need outlier_scope='head'")
        if self.value_group < 1:
            raise ConfigError("value_group must be >= 1")

    # --- derived sizes, per layer -------------------------------------------------------
    def exact_buffer(self) -> int:
        """Most recent document tokens kept exact: `buffer`, or the mode's default when it is None."""
        if self.buffer is not None:
            return self.buffer
        return 0 if self.kv == "turbo" else 64

    def sketch_dim(self, layer_idx: int, head_dim: int) -> int:
        """Sketch rows m for a layer, a multiple of 8 so signs pack into whole bytes."""
        m = self.sketch_ratio * head_dim
        if layer_idx < self.early_layers:
            m *= self.early_sketch_factor
        return max(8, int(round(m / 8)) * 8)

    def turbo_residual_dim(self, head_dim: int) -> int:
        """Rows m of the turbo key residual's sketch (0: none), a multiple of 8 so signs pack into bytes."""
        if self.turbo_residual_ratio == 0:
            return 0
        return max(8, int(round(self.turbo_residual_ratio * head_dim / 8)) * 8)

    def turbo_outliers(self, head_dim: int) -> int:
        """Key channels turbo keeps apart in a head: a multiple of 8 (at least 8 when the fraction is not 0)."""
        if self.turbo_outlier_fraction == 0:
            return 0
        r = max(8, int(round(self.turbo_outlier_fraction * head_dim / 8)) * 8)
        if r >= head_dim:
            raise ConfigError(f"turbo_outlier_fraction {self.turbo_outlier_fraction} leaves no channel of {head_dim} "
                              f"to rotate")
        return r

    def layer_bits(self) -> dict[tuple[str, int], float]:
        """turbo_layer_bits parsed: {("k" or "v", layer index): bits}."""
        out: dict[tuple[str, int], float] = {}
        for item in filter(None, (s.strip() for s in self.turbo_layer_bits.split(","))):
            kind, rest = item[:1], item[1:]
            layer, eq, bits = rest.partition("=")
            try:
                key, value = (kind, int(layer)), float(bits)
            except ValueError:
                key, value = None, 0.0
            if kind not in ("k", "v") or not eq or key is None or key[1] < 0 or not 1 <= value <= 4:
                raise ConfigError(f"turbo_layer_bits entry {item!r} is not k<layer>=<bits> or v<layer>=<bits> "
                                  f"with bits 1 to 4 (for example \"v1=3\")")
            out[key] = value
        return out

    def turbo_bits(self, kind: str, layer_idx: int) -> float:
        """Bits of turbo's key ("k") or value ("v") codes in a layer: turbo_layer_bits' entry, else the global."""
        default = self.turbo_key_bits if kind == "k" else self.turbo_value_bits
        return self.layer_bits().get((kind, layer_idx), default)

    def matrix_seed(self, role: str) -> int:
        """The seed of a per-model matrix (MATRIX_ROLES)."""
        return self.seed * 1000 + MATRIX_ROLES[role]

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


# Turbo presets by bits per number: a preset's changes to the defaults. "3" is the default (2.9-3.1 bits everything
# counted); "2.5", the bench's turbo-2.5: 2-bit keys with 16 channels of 64 kept apart (4-bit codes) instead of 8,
# paid for in part by 2-bit values from the 256-point 4-D codebook: 2.63 bits at 4,352 tokens. Softmax amplifies key
# error most at 2 bits, and the channels that carry q.k are where it pays to spend: against the first turbo-2.5
# (8 apart, 2.25-bit values, 2.56 bits) KL -22% to -34% on every genre, ppl x1.022/1.014/1.042/1.022 (prose, docs,
# code, numbers; BENCHMARKS.md "The 2.5-bit preset with 16 channels apart"). Not a user option: code is still past
# the 3% a second preset needs.
TURBO_PRESETS: dict[str, dict] = {
    "3": {},
    "2.5": {"turbo_key_bits": 2, "turbo_outlier_fraction": 0.25, "turbo_value_bits": 2},
}
