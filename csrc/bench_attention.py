"""Per-layer decode attention of a Llama-3.1-8B layer (32 query heads, 8 KV heads, head_dim 128, bf16), one run:
SDPA on the bf16 exact cache against each mode's CUDA kernel and torch path, with the GB/s of the bytes each reads
next to a measured copy bandwidth. Needs a GPU (never run yet: see csrc/README.md).

    python csrc/bench_attention.py --tokens 4k,16k,32k,64k,128k --json $OUT/attention.json
    python csrc/bench_attention.py --modes turbo,turbo-v2n16    # the default turbo layout against the one before

Modes: turbo (the default layout: 3-bit keys of the [64, 2] pair codebook, 9-bit vq4 values of 512 points, 8-bit
norms), turbo-v2n16 (Lloyd-Max keys, a vq4 byte per 4 values, fp16 norms: cache format 4's default), qjl. Both
key codebooks are scored alike (one 64-entry pair table), so they differ only in the values and norms read.

Times are medians of CUDA-graph replays (GPU time only, no Python dispatch), several input sets rotated so the
L2 cache does not hold them.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F

import qjl.kernels as K
from qjl.kernel_parity import _time_ms
from qjl.config import QJLConfig
from qjl.keys import QJLKeys
from qjl.turbo import TurboKeys, TurboValues
from qjl.values import QuantValues

HQ, H, D = 32, 8, 128
TURBO = {"turbo": {},  # mode -> QJLConfig fields
         "turbo-v2n16": {"turbo_key_codebook": "scalar", "turbo_value_bits": 2, "turbo_norm_bits": 16}}


def _tokens(s: str) -> int:
    s = s.strip().lower()
    return int(float(s[:-1]) * 1024) if s.endswith("k") else int(s)


def graph_ms(fn, reps: int = 50) -> float:
    """Median ms of one call, from CUDA-graph replays (falls back to events around plain calls)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    try:
        g = torch.cuda.CUDAGraph()
        s = torch.cuda.Stream()
        with torch.cuda.stream(s):
            with torch.cuda.graph(g, stream=s):
                fn()
        run = g.replay
    except Exception:  # noqa: BLE001 - a path that cannot be captured is timed plainly
        run = fn
    return _time_ms(run, reps)


def copy_gbps() -> float:
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    ms = graph_ms(lambda: y.copy_(x), reps=20)
    return 2 * x.numel() / ms / 1e6


def nbytes(ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts if isinstance(t, torch.Tensor))


def encode_chunks(codec, x, chunk=8192, **kw):
    states = [codec.encode(x[:, :, i:i + chunk], **kw) for i in range(0, x.shape[2], chunk)]
    return {n: torch.cat([s[n] for s in states], dim=2) for n in states[0]}


def layer(mode: str, T: int, gen):
    """(q, op, args tuple, bytes the op reads)."""
    k = torch.randn(1, H, T, D, generator=gen).to("cuda")
    v = torch.randn(1, H, T, D, generator=gen).to("cuda")
    q = torch.randn(1, HQ, 1, D, generator=gen).to("cuda", torch.bfloat16)
    sink_k, sink_v = k[:, :, :4].bfloat16(), v[:, :, :4].bfloat16()
    tail_k = torch.randn(1, H, 1, D, generator=gen).to("cuda", torch.bfloat16)
    tail_v = torch.randn(1, H, 1, D, generator=gen).to("cuda", torch.bfloat16)
    end = 4 + (T - 4) // 32 * 32  # the compressed part: whole groups of 32 tokens after the sink, as the cache
    if mode in TURBO:
        cfg = QJLConfig(**TURBO[mode])
        kc, vc = TurboKeys.for_layer(cfg, 0, D).to("cuda"), TurboValues.for_layer(cfg, 0, D).to("cuda")
        ks = encode_chunks(kc, k[:, :, 4:end], query_energy=torch.ones(1, H, D, device="cuda"))
        vs = encode_chunks(vc, v[:, :, 4:end])
        a = kc.op_args(ks) | vc.op_args(vs)
        args = (q, [sink_k, tail_k], [sink_v, tail_v], a["key_codes"], a["key_bits"], a["key_centroids"],
                a["key_norms"], a["key_norm_steps"], a["key_rotation"], a["channels"], a["rest"], a["outlier_values"],
                a["outlier_scales"], a["outlier_mins"], a["outlier_bits"], a["group_size"], a["residual_signs"],
                a["residual_norms"], a["residual_projection"], a["residual_scale"], a["value_codes"], a["value_bits"],
                a["value_tables"], a["value_norms"], a["value_norm_steps"], a["value_rotation"], D ** -0.5)
        return "qjl::turbo_attention", args, nbytes(list(ks.values()) + list(vs.values())) + nbytes(
            [sink_k, sink_v, tail_k, tail_v])
    cfg = QJLConfig(kv="qjl")
    kc, vc = QJLKeys.for_layer(cfg, 0, D).to("cuda"), QuantValues.for_layer(cfg, 0, D).to("cuda")
    ks, vs = encode_chunks(kc, k[:, :, 4:end]), encode_chunks(vc, v[:, :, 4:end])
    a = kc.op_args(ks) | vc.op_args(vs)
    args = (q, [sink_k, tail_k], [sink_v, tail_v], a["signs"], a["key_norms"], a["projection"], a["sketch_scale"],
            a["channels"], a["outlier_values"], a["outlier_scales"], a["outlier_mins"], a["outlier_index"],
            a["outlier_bits"], a["group_size"], a["key_mean"], a["value_codes"], a["value_scales"], a["value_mins"],
            a["value_bits"], a["value_group"], D ** -0.5)
    return "qjl::sketch_attention", args, nbytes(list(ks.values()) + list(vs.values())) + nbytes(
        [sink_k, sink_v, tail_k, tail_v])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", default="4k,16k,32k,64k,128k")
    p.add_argument("--modes", default="turbo,qjl", help=f"of {', '.join([*TURBO, 'qjl'])}")
    p.add_argument("--no-torch", action="store_true", help="skip the torch paths (slow at 128k)")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    if not torch.cuda.is_available():
        print("bench_attention: needs a CUDA device", file=sys.stderr)
        return 2
    if K.ensure_loaded() is None:
        print(f"bench_attention: kernels not loaded: {K.status()['reason']}", file=sys.stderr)
        return 1
    peak = copy_gbps()
    gen = torch.Generator().manual_seed(0)
    rows = []
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; measured copy bandwidth {peak:.0f} GB/s")
    print(f"{'tokens':>7} {'path':<22} {'ms':>8} {'GB/s':>7} {'% copy':>7} {'vs SDPA':>8}")
    for T in map(_tokens, a.tokens.split(",")):
        k = torch.randn(1, H, T, D, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        q = torch.randn(1, HQ, 1, D, device="cuda", dtype=torch.bfloat16)
        sdpa = graph_ms(lambda: F.scaled_dot_product_attention(q, k, v, scale=D ** -0.5, enable_gqa=True))
        exact_bytes = 2 * k.numel() * 2
        results = [("sdpa bf16 exact", sdpa, exact_bytes)]
        del k, v
        for mode in a.modes.split(","):
            op, args, nb = layer(mode, T, gen)
            impl = {"qjl::turbo_attention": K.turbo_attention_cuda,
                    "qjl::sketch_attention": K.sketch_attention_cuda}[op]
            results.append((f"{mode} kernel", graph_ms(lambda: impl(*args)), nb))
            if not a.no_torch:
                def torch_path(args=args, op=op):
                    with K.torch_only():
                        return K.TORCH_IMPL[op](*args)
                results.append((f"{mode} torch", graph_ms(torch_path, reps=10), nb))
            del args
            torch.cuda.empty_cache()
        for name, ms, nb in results:
            gbps = nb / ms / 1e6
            rows.append({"tokens": T, "path": name, "ms": ms, "bytes": nb, "gbps": gbps, "vs_sdpa": sdpa / ms})
            print(f"{T:>7} {name:<22} {ms:8.4f} {gbps:7.0f} {100 * gbps / peak:6.0f}% {sdpa / ms:7.2f}x")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "copy_gbps": peak,
                       "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
