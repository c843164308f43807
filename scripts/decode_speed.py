"""Decode ms/token of each KV mode at the same context, in one run.

`qjl bench --context 4k` measures this (and prefill, first token, memory, the peers) in one command; this
script stays for the figures BENCHMARKS.md quotes from it.

    python scripts/decode_speed.py --context 4096 --steps 32 --modes exact qjl turbo
    python scripts/decode_speed.py --synthetic llama-8b --context 4096 32768 --prefill-chunk 2048   # on a GPU

Every mode prefills the same random tokens, then times greedy decode steps;
the ratios to the first mode are the figures to compare across machines.
--synthetic builds a Llama of that geometry with random weights on the device
(no download, no tokenizer): speed and memory do not depend on the weights.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from qjl.bench import decode_speed
from qjl.config import QJLConfig
from qjl.models import load_model

# Geometries of Llama 3.2 1B and Llama 3.1 8B (hidden, MLP, layers, heads, KV heads, head_dim).
SYNTHETIC = {
    "llama-1b": (2048, 8192, 16, 32, 8, 64),
    "llama-8b": (4096, 14336, 32, 32, 8, 128),
}


def synthetic_model(name: str, device: str, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    import qjl.attention

    hidden, mlp, layers, heads, kv_heads, head_dim = SYNTHETIC[name]
    cfg = LlamaConfig(vocab_size=128256, hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                      max_position_embeddings=131072, rope_theta=500000.0, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype).eval()  # initialised on the device: seconds, not minutes
    model.set_attn_implementation(qjl.attention.ATTN_IMPLEMENTATION)
    return model, f"{name} (random weights, {str(dtype).removeprefix('torch.')})"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--context", type=int, nargs="+", default=[4096])
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2, help="alternate the modes this many times; best of each")
    p.add_argument("--modes", nargs="+", default=["exact", "qjl"], help="caches to compare; the first is the reference")
    p.add_argument("--model", default=None)
    p.add_argument("--synthetic", choices=sorted(SYNTHETIC), default=None)
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None)
    p.add_argument("--prefill-chunk", type=int, default=None, help="prefill this many tokens at a time")
    args = p.parse_args()
    torch.set_grad_enabled(False)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    if args.synthetic:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        model, name = synthetic_model(args.synthetic, device, dtype or torch.bfloat16)
    else:
        loaded = load_model(args.model, dtype=dtype)
        model, name = loaded.model, loaded.name
    dev = next(model.parameters()).device
    where = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"{torch.get_num_threads()} CPU threads"
    print(f"# {name}, {where}, torch {torch.__version__}", file=sys.stderr)
    ref = args.modes[0]
    others = args.modes[1:]
    print("| context | " + " | ".join(f"{m} ms/token" for m in args.modes) + " | "
          + " | ".join(f"ratio {m}/{ref}" for m in others) + " |")
    print("| --- " * (1 + len(args.modes) + len(others)) + "|")
    rows = []
    for context in args.context:
        best, extra = {}, {}
        for _ in range(args.repeats):
            for kv in args.modes:
                r = decode_speed(model, context, QJLConfig(kv=kv), steps=args.steps, prefill_chunk=args.prefill_chunk)
                best[kv] = min(best.get(kv, float("inf")), r["decode_ms_per_token"])
                extra[kv] = {k: r[k] for k in ("prefill_tokens_per_s", "peak_gib") if k in r}
        ratios = {m: best[m] / best[ref] for m in others}
        rows.append({"context": context, **{f"{k}_ms": v for k, v in best.items()},
                     **{f"ratio_{m}": r for m, r in ratios.items()}, "detail": extra})
        print(f"| {context} | " + " | ".join(f"{best[m]:.1f}" for m in args.modes) + " | "
              + " | ".join(f"{r:.2f}" for r in ratios.values()) + " |", flush=True)
    print(json.dumps(rows), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
