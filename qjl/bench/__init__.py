"""Measurements returned as data; the CLI (`qjl bench`) and the scripts render them.

spec      modes, random-weight shapes, context sizes, the memory estimate (no torch: the CLI checks options
          with it before anything heavy is imported)
perplexity teacher-forced perplexity, KL and top-1 agreement against exact attention, on real prose
haystack  needle in a haystack over depths
speed     prefill, first token, decode and peak memory of one cache at one context
peers     transformers' QuantizedCache (quanto, HQQ) with qjl's document accounting
shapes    random-weight Llamas of real geometries
runner    `qjl bench`: every (mode, context) row in one run, ratios against the exact cache of the same run

The names below are imported on first use, so `import qjl.bench.spec` stays torch-free.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "essays_text": "perplexity", "QualityRow": "perplexity", "exact_logprobs": "perplexity",
    "compressed_logprobs": "perplexity", "teacher_forced_logprobs": "perplexity", "key_value_bits": "perplexity",
    "quality": "perplexity", "quality_of": "perplexity",
    "needle": "haystack", "needle_document": "haystack", "NEEDLE": "haystack", "NEEDLE_QUESTION": "haystack",
    "decode_speed": "speed", "measure_once": "speed",
    "PeerCache": "peers", "make_mode_cache": "peers",
    "synthetic_model": "shapes",
    "BenchSettings": "runner", "run_bench": "runner", "machine_info": "runner",
    "MODES": "spec", "SHAPES": "spec", "DEFAULT_MODES": "spec", "parse_contexts": "spec",
    "BenchError": "spec",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'qjl.bench' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
