"""Quality per bit of compressed-cache settings on the corpus's genres (qjl/data/corpus, or any text file).

Teacher-forced perplexity and mean KL divergence against exact attention, one
row per (text, setting), all in one run on one model. Usage:

    python scripts/quality_table.py --tokens 2304 --preset table [--json out.json]
    python scripts/quality_table.py --tokens 4352 --preset genres --text all

--text: a genre (prose: the essays, docs, code, numbers), 'all', a comma list, or a text file; default prose.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import torch

from qjl.bench import exact_logprobs, quality
from qjl.bench.corpus import label_of, parse_texts, text_of
from qjl.config import QJLConfig
from qjl.models import load_model

# The qjl mode's defaults before cache format 6's changes (2d sketch, 8 channels apart, min/max values, no softmax
# correction, the paper's signs), and as measured before sink tokens existed
QJL6 = QJLConfig(kv="qjl", sketch_ratio=2.0, outlier_fraction=1 / 8, value_fit=False, sketch_softmax_correction=0.0,
                 sketch_residual_weight=0.0)
PAPER_SIGNS = QJLConfig(kv="qjl", sketch_residual_weight=0.0)  # the qjl mode of format 6, before residual signs
QJL = QJL6.replace(sink_tokens=0)
PAPER = QJL.replace(center_keys=False, outlier_scope="group", outlier_fraction=1 / 16, outlier_bits=16,
                  early_layers=2, value_group=32, buffer=128)  # the paper's recipe, group outliers kept in fp16
TURBO0 = QJLConfig(kv="turbo", turbo_key_bits=3, turbo_value_bits=2, turbo_outlier_fraction=0.0, sink_tokens=0,
                   buffer=64, turbo_value_codebook="scalar", turbo_norm_bits=16, turbo_key_codebook="scalar",
                   turbo_layer_bits="", turbo_unbiased_values=False,
                   turbo_unbiased_keys=False)  # turbo as first built (least-squares scales aside)
# the default of cache format 5 (the same bits in every layer), and of format 4 (scalar K3, V2 vq4-256, fp16 scales)
F5 = QJLConfig(turbo_layer_bits="", turbo_unbiased_values=False, turbo_unbiased_keys=False)
F6 = QJLConfig(turbo_unbiased_values=False, turbo_unbiased_keys=False)  # format 6 as first built
F4 = F5.replace(turbo_key_codebook="scalar", turbo_value_bits=2, turbo_norm_bits=16)
HEAD8 = PAPER.replace(outlier_scope="head", outlier_fraction=1 / 8, query_aware_outliers=False)

PRESETS = {
    # The table in BENCHMARKS.md: the paper's recipe, one change at a time, then the defaults.
    "table": {
        "paper: m=2d (4d in 2 early layers), 4 fp16 outliers/group, V 2-bit g32, buffer 128": PAPER,
        "paper, no outliers": PAPER.replace(outlier_fraction=0.0),
        "paper + centred keys": PAPER.replace(center_keys=True),
        "paper, m=4d": PAPER.replace(sketch_ratio=4.0),
        "paper, outliers per head": PAPER.replace(outlier_scope="head", query_aware_outliers=False),
        "8 fp16 outliers per head": HEAD8,
        "8 4-bit outliers per head": HEAD8.replace(outlier_bits=4),
        "qjl: 8 4-bit outliers/head by q^2k^2, no early layers, V g64, buffer 64": QJL,
        "qjl, outliers by k^2 only": QJL.replace(query_aware_outliers=False),
        "16 4-bit outliers/head, m=1.5d, V g64, buffer 64": QJL.replace(outlier_fraction=1 / 4, sketch_ratio=1.5),
        "qjl, buffer 96": QJL.replace(buffer=96),
    },
    # Where the default's loss comes from: remove one source of error at a time.
    "ablate": {
        "qjl": QJL,
        "qjl, 8-bit V": QJL.replace(value_bits=8),
        "qjl, m=8d": QJL.replace(sketch_ratio=8.0),
        "qjl, V g32": QJL.replace(value_group=32),
        "qjl, buffer 128": QJL.replace(buffer=128),
        "qjl, 2 early layers": QJL.replace(early_layers=2),
    },
    # --kv turbo (qjl/turbo.py) as first built: b bits a coordinate + an fp16 norm a vector; "+r1" adds a 1-bit QJL
    # sketch of the key residual with m = d rows (+ its fp16 norm). Buffer 64, no sink, no channels apart.
    "turbo": {
        "turbo K3/V2": TURBO0,
        "turbo K2/V2": TURBO0.replace(turbo_key_bits=2),
        "turbo K2+r1 (m=d)/V2": TURBO0.replace(turbo_key_bits=2, turbo_residual_ratio=1.0),
        "turbo K3/V3": TURBO0.replace(turbo_value_bits=3),
        "turbo K4/V2": TURBO0.replace(turbo_key_bits=4),
    },
    # The defaults of both modes and what each part of the turbo default buys (BENCHMARKS.md).
    "final": {
        "turbo default: K3 + 8 channels apart, V2 (4-D codebook), 4 sink tokens, buffer 0": F4,
        "turbo default, scalar V2 codes": F4.replace(turbo_value_codebook="scalar"),
        "turbo default, no sink": F4.replace(sink_tokens=0),
        "turbo default, no channels apart": F4.replace(turbo_outlier_fraction=0.0),
        "turbo default, buffer 32": F4.replace(buffer=32),
        "turbo default, V2.25": F4.replace(turbo_value_bits=2.25, turbo_value_codebook="scalar"),
        "turbo default, V3": F4.replace(turbo_value_bits=3),
        "turbo default, K4": F4.replace(turbo_key_bits=4),
        "turbo K2 + 16 channels apart, V2": F4.replace(turbo_key_bits=2, turbo_outlier_fraction=0.25),
        "turbo as first built: K3/V2, buffer 64": TURBO0,
        "qjl default: as the table's, + 4 sink tokens": QJL6,
        "qjl, no sink": QJL,
        "paper: m=2d (4d in 2 early layers), 4 fp16 outliers/group, V 2-bit g32, buffer 128": PAPER,
    },
    # Issue 16: the defaults on every genre, and what removing each error source buys (where the excess is);
    # measured with format 4's default.
    "genres": {
        "turbo default (K3 + 8 apart, V2 vq4, 4 sinks)": F4,
        "qjl default (+ 4 sinks)": QJL6,
        "turbo default, K4": F4.replace(turbo_key_bits=4),
        "turbo default, V4": F4.replace(turbo_value_bits=4),
        "turbo default, 64 sink tokens": F4.replace(sink_tokens=64),
    },
    # Issue 16, cache format 5: 8-bit scales pay for 2.25-bit values from a 512-point 4-D codebook; 3-bit keys
    # from a 64-point 2-D codebook (the same bits and layout).
    "format5": {
        "turbo default (format 5: K3 vq2 + 8 apart, V2.25 vq4-512, 8-bit scales)": F5,
        "format 5, scalar K3": F5.replace(turbo_key_codebook="scalar"),
        "format 4's default (V2 vq4-256, fp16 scales)": F4,
        "format 4's default + 8-bit scales": F4.replace(turbo_norm_bits=8),
        "format 5's codes, fp16 scales": F5.replace(turbo_norm_bits=16),
        "turbo-2.5 (K2 + 8 apart, V2.25 vq4-512, 8-bit scales)": F5.replace(turbo_key_bits=2),
        "qjl default (+ 4 sinks)": QJL6,
    },
    # Issue 16, cache format 6: per-layer bits, layer 1's values at 3 bits (scripts/genre_probe.py --layers).
    "layers": {
        "turbo default (format 6: format 5 + layer-1 values at 3 bits)": F6,
        "format 5's default (every layer alike)": F5,
        "format 5 + layer-1 values at 4 bits": F6.replace(turbo_layer_bits="v1=4"),
        "turbo-2.5, layer-1 values at 3 bits": F6.replace(turbo_key_bits=2),
    },
    # Issue 16: scales that keep each decoded value's projection on itself (turbo_unbiased_values).
    "unbiased": {
        "unbiased value scales, least-squares key scales": QJLConfig(turbo_unbiased_keys=False),
        "least-squares scales (format 6 as first built)": F6,
        "turbo default (format 6, unbiased key and value scales)": QJLConfig(),
        "turbo-2.5 (K2), unbiased value scales": QJLConfig(turbo_key_bits=2, turbo_unbiased_keys=False),
        "turbo-2.5 (K2), unbiased key and value scales": QJLConfig(turbo_key_bits=2),
    },
    # Issue 16: the qjl mode's integer values with a fitted scale and minimum (value_fit).
    "fit": {
        "qjl, fitted values": QJL6.replace(value_fit=True),
        "qjl, min/max values (format 6 as first built)": QJL6,
    },
    # Issue 16: the qjl mode's sketch logits lowered by half their variance (sketch_softmax_correction).
    "softmax": {
        "qjl default (softmax correction 0.75)": PAPER_SIGNS,
        "qjl, no softmax correction": PAPER_SIGNS.replace(sketch_softmax_correction=0.0),
        "qjl, 16 apart, m = 1.375d, correction 0.75": PAPER_SIGNS.replace(outlier_fraction=1 / 4, sketch_ratio=1.375),
    },
    # Issue 16, cache format 7: the qjl mode's later sketch rows sign the residual (sketch_residual_weight).
    "residual": {
        "qjl default (residual signs, weight 0.65)": QJLConfig(kv="qjl"),
        "qjl, the paper's signs (format 6's default)": PAPER_SIGNS,
        "qjl, residual signs, no softmax correction": QJLConfig(kv="qjl", sketch_softmax_correction=0.0),
    },
    # Issue 16: the qjl mode's keys with 16 channels apart and an 11/8 d sketch, the same bits as 8 and 2d (better
    # perplexity and KL on every genre, but 3/5 in tests/test_answers.py: not the default).
    "qjlkeys": {
        "qjl default (8 apart, m = 2d, fitted values)": PAPER_SIGNS.replace(sketch_softmax_correction=0.0),
        "qjl, 16 apart, m = 1.375d": PAPER_SIGNS.replace(outlier_fraction=1 / 4, sketch_ratio=1.375,
                                                         sketch_softmax_correction=0.0),
        "qjl, 16 apart, m = 1.5d (+0.06 bits)": PAPER_SIGNS.replace(outlier_fraction=1 / 4, sketch_ratio=1.5,
                                                                    sketch_softmax_correction=0.0),
    },
    # Issue 16: the 2.5-bit preset with twice the key channels apart, paid for by 2-bit values (vq4-256).
    "preset25": {
        "turbo-2.5 (K2 + 8 apart, V2.25)": QJLConfig(turbo_key_bits=2),
        "K2 + 16 apart, V2 (vq4-256)": QJLConfig(turbo_key_bits=2, turbo_outlier_fraction=0.25, turbo_value_bits=2),
    },
    # Key bits traded for value bits around the turbo default (fractional bits: qjl/turbo.py split_bits).
    "trades": {
        "turbo K2.75/V2.25": F4.replace(turbo_key_bits=2.75, turbo_value_bits=2.25, turbo_value_codebook="scalar"),
        "turbo K2.875/V2.125": F4.replace(turbo_key_bits=2.875, turbo_value_bits=2.125),
        "turbo K3/V2.125": F4.replace(turbo_value_bits=2.125),
    },
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=2304)
    p.add_argument("--score-from", type=int, default=256)
    p.add_argument("--chunk", type=int, default=32)
    p.add_argument("--preset", default="table", choices=sorted(PRESETS))
    p.add_argument("--only", nargs="*", help="labels (substrings) to run")
    p.add_argument("--text", default="prose", help="genre(s), 'all', or a text file (default: prose, the essays)")
    p.add_argument("--model", default=None)
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                   help="model dtype (default: float32 on a CPU, bfloat16 on a GPU)")
    p.add_argument("--json", default=None, help="write the rows to this file")
    args = p.parse_args()

    texts = parse_texts(args.text)
    torch.set_grad_enabled(False)
    loaded = load_model(args.model, dtype=getattr(torch, args.dtype) if args.dtype else None)
    configs = PRESETS[args.preset]
    if args.only:
        configs = {k: v for k, v in configs.items() if any(s in k for s in args.only)}
    dev = next(loaded.model.parameters()).device
    where = (torch.cuda.get_device_name(dev) if dev.type == "cuda"
             else f"{platform.machine()} {torch.get_num_threads()} threads")
    print("| text | setting | bits/number | key bits | value bits | ppl ratio | KL (nats) | top-1 agree |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    rows, out = [], []
    for name in texts:
        ids = loaded.tokenizer(text_of(name), return_tensors="pt", add_special_tokens=False)["input_ids"]
        ids = ids[:, :args.tokens].to(dev)
        t0 = time.perf_counter()
        ref = exact_logprobs(loaded.model, ids)
        print(f"# {loaded.name} ({next(loaded.model.parameters()).dtype}), {ids.shape[1]} tokens of {label_of(name)}, "
              f"scored from {args.score_from}, chunk {args.chunk}, {where}, exact pass "
              f"{time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)
        for label, cfg in configs.items():
            (row,) = quality(loaded.model, ids, {label: cfg}, args.score_from, args.chunk, reference=ref)
            rows.append(row)
            out.append(row.to_dict() | {"text": label_of(name), "config": cfg.to_dict()})
            print(f"| {label_of(name)} | {label} | {row.bits_per_number:.2f} | {row.key_bits:.2f} | "
                  f"{row.value_bits:.2f} | {row.ppl_ratio:.3f} | {row.kl:.4f} | {row.top1_agree:.3f} |", flush=True)
        if rows:
            print(f"# {label_of(name)}: exact ppl {rows[-1].ppl_exact:.3f}", file=sys.stderr, flush=True)
        if args.json:  # after every text, so a run cut short keeps what it measured
            with open(args.json, "w") as f:
                json.dump({"tokens": args.tokens, "score_from": args.score_from, "chunk": args.chunk,
                           "model": loaded.name, "rows": out}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
