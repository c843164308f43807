"""Where the compressed cache's error comes from, per genre: layers, heads, keys or values, sinks, heavy tokens.

One exact forward pass over the first --tokens tokens of each text records every layer's queries, keys and
values (after RoPE). Then, per layer and KV head, the keys after the sink and the values are encoded and decoded
with the turbo codecs of a config, and the attention outputs of the queries at positions >= 256 (every
--stride-th) are compared with the exact ones:

  K err / V err   relative squared error of the decoded keys / values, sum |x - x_hat|^2 / sum |x|^2
  oK / oV / oKV   relative squared error of the attention output with only the keys, only the values, or both
                  decoded (all tokens after the sink compressed, the recent window and the chunk included: a
                  little harsher than the teacher-forced measurement, where the current chunk is exact)
  heavy8          oKV with the 8 tokens beyond the sink that draw the most attention in the head kept exact
  sink mass       share of attention weight on the sink tokens; top8 mass: on the 8 heaviest other tokens

Usage:
    python scripts/genre_probe.py --tokens 2304 --text all [--config '{"sink_tokens": 16}'] [--json out.json]

    python scripts/genre_probe.py --layers --tokens 2304 --text code,docs --config '{"turbo_layer_bits": ""}'

The output-error figures are a proxy: they rank layers and genres and tell keys from values, while perplexity
and KL (scripts/quality_table.py) remain the measure.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from transformers import AttentionInterface

from qjl.attention import ATTN_IMPLEMENTATION, qjl_attention_forward
from qjl.bench.corpus import label_of, parse_texts, text_of
from qjl.codecs import make_codecs
from qjl.config import QJLConfig
from qjl.models import load_model


def record(model, ids):
    """[(q, k, v)] per layer from one exact forward pass: q [1, Hq, T, D], k/v [1, H, T, D] float32."""
    seen = []

    def recorder(module, query, key, value, *args, **kwargs):
        seen.append((query.detach().float().clone(), key.detach().float().clone(), value.detach().float().clone()))
        return qjl_attention_forward(module, query, key, value, *args, **kwargs)

    AttentionInterface.register(ATTN_IMPLEMENTATION, recorder)
    try:
        model(input_ids=ids, use_cache=False)
    finally:
        AttentionInterface.register(ATTN_IMPLEMENTATION, qjl_attention_forward)
    return seen


def decoded(config, i, q, k, v):
    """k, v [1, H, T, D] with the tokens after the sink replaced by the turbo codecs' decoded ones."""
    H, T, D = k.shape[1:]
    s = config.sink_tokens
    n = (T - s) // config.group_size * config.group_size
    kc, vc = make_codecs(config, i, D)
    qe = q[0, :, s + 32: s + 64].float().pow(2).reshape(H, -1, D).mean(1).unsqueeze(0)
    kh, vh = k.clone(), v.clone()
    kh[:, :, s:s + n] = kc.decode(kc.encode(k[:, :, s:s + n].float(), qe)).to(k.dtype)
    vh[:, :, s:s + n] = vc.decode(vc.encode(v[:, :, s:s + n].float())).to(v.dtype)
    return kh, vh


def compressed_log_probs(model, ids, config, parts: dict[int, str] | None = None):
    """Log-probabilities [T, V] of one forward pass in which the layers of `parts` have their keys ("k"), values
    ("v") or both ("kv") decoded by the config's codecs; None: every layer's keys and values."""
    import torch.nn.functional as F

    def squeezed(module, query, key, value, *args, **kwargs):
        part = "kv" if parts is None else parts.get(module.layer_idx, "")
        if part:
            kh, vh = decoded(config, module.layer_idx, query, key, value)
            key, value = (kh if "k" in part else key), (vh if "v" in part else value)
        return qjl_attention_forward(module, query, key, value, *args, **kwargs)

    AttentionInterface.register(ATTN_IMPLEMENTATION, squeezed)
    try:
        return F.log_softmax(model(input_ids=ids, use_cache=False).logits[0].float(), -1)
    finally:
        AttentionInterface.register(ATTN_IMPLEMENTATION, qjl_attention_forward)


def token_kl(ref, lp):
    """KL(exact || compressed) per predicted position from 256 on."""
    return (ref.exp() * (ref - lp)).sum(-1)[256:-1]


def copy_split(model, ids, config, ref=None):
    """Per-token KL(exact || compressed) of one forward pass whose keys and values are decoded in every layer,
    split into tokens that continue a bigram seen earlier in the text (copies) and the others."""
    import torch.nn.functional as F

    if ref is None:
        ref = F.log_softmax(model(input_ids=ids, use_cache=False).logits[0].float(), -1)
    kl = token_kl(ref, compressed_log_probs(model, ids, config))
    t = ids[0].tolist()
    seen, copy = set(), []
    for j in range(len(t) - 1):
        copy.append((t[j], t[j + 1]) in seen)
        seen.add((t[j], t[j + 1]))
    copy = torch.tensor(copy[256:])
    return {"kl": kl.mean().item(), "copy_share": copy.float().mean().item(),
            "kl_copy": kl[copy].mean().item(), "kl_other": kl[~copy].mean().item(),
            "kl_from_copies": (kl[copy].sum() / kl.sum()).item()}


def layer_kl(model, ids, config, ref, parts: dict[int, str]) -> float:
    """Mean KL(exact || compressed) over positions >= 256 with only the layers of `parts` decoded."""
    return token_kl(ref, compressed_log_probs(model, ids, config, parts)).mean().item()


def layer_sensitivity(model, ids, config, label) -> dict:
    """KL with every layer's K/V decoded, then with one layer's keys or values decoded at a time: which layers'
    codes weigh most in the output (2 x layers + 2 forward passes)."""
    import torch.nn.functional as F

    ref = F.log_softmax(model(input_ids=ids, use_cache=False).logits[0].float(), -1)
    n = model.config.num_hidden_layers
    out = {"all": layer_kl(model, ids, config, ref, {i: "kv" for i in range(n)})}
    for part in ("v", "k"):
        out[part] = [layer_kl(model, ids, config, ref, {i: part}) for i in range(n)]
        order = sorted(range(n), key=lambda i: -out[part][i])
        print(f"{label} {part}: every layer's KL / all layers' K+V KL {out['all']:.4f}, heaviest first: "
              + ", ".join(f"L{i} {out[part][i] / out['all']:.3f}" for i in order), flush=True)
    return out


def attention(q, k, v, pos, heavy=None, k_exact=None, v_exact=None):
    """Outputs [H, g, Q, D] and weights [H, g, Q, T] of queries at positions pos over keys before them."""
    H, T, D = k.shape
    g = q.shape[0] // H
    qq = q.view(H, g, -1, D)[:, :, pos]  # [H, g, Q, D]
    if heavy is not None:  # the heavy tokens exact: [H, m] indices
        k, v = k.clone(), v.clone()
        idx = heavy.unsqueeze(-1).expand(-1, -1, D)
        k.scatter_(1, idx, k_exact.gather(1, idx))
        v.scatter_(1, idx, v_exact.gather(1, idx))
    logits = torch.einsum("hgqd,htd->hgqt", qq, k) * D ** -0.5
    mask = torch.arange(T).view(1, -1) > pos.view(-1, 1)  # key after the query
    w = logits.masked_fill(mask, float("-inf")).softmax(-1)
    return torch.einsum("hgqt,htd->hgqd", w, v), w


def rel(a, b):
    """Per KV head: sum |a - b|^2 / sum |a|^2 over everything but dim 0."""
    return ((a - b).pow(2).flatten(1).sum(1) / a.pow(2).flatten(1).sum(1)).tolist()


def probe_layer(i, q, k, v, config, pos):
    q, k, v = q[0], k[0], v[0]
    H, T, D = k.shape
    s = config.sink_tokens
    n = (T - s) // config.group_size * config.group_size
    kc, vc = make_codecs(config, i, D)
    qe = q[:, s + 32: s + 64].pow(2).reshape(H, -1, D).mean(1).unsqueeze(0)  # the queries of the first flush
    kh, vh = k.clone(), v.clone()
    kh[:, s:s + n] = kc.decode(kc.encode(k[None, :, s:s + n], qe))[0]
    vh[:, s:s + n] = vc.decode(vc.encode(v[None, :, s:s + n]))[0]
    o, w = attention(q, k, v, pos)
    oK, _ = attention(q, kh, v, pos)
    oV, _ = attention(q, k, vh, pos)
    oKV, _ = attention(q, kh, vh, pos)
    load = w[..., s:].sum(dim=(1, 2))  # [H, T - s]: attention each token beyond the sink draws
    heavy = load.topk(8, dim=-1).indices + s
    o8, _ = attention(q, kh, vh, pos, heavy, k, v)
    top8 = w.gather(3, heavy[:, None, None, :].expand(-1, w.shape[1], w.shape[2], -1)).sum(-1).mean((1, 2))
    return {"layer": i, "k_err": rel(k[:, s:s + n], kh[:, s:s + n]), "v_err": rel(v[:, s:s + n], vh[:, s:s + n]),
            "oK": rel(o, oK), "oV": rel(o, oV), "oKV": rel(o, oKV), "heavy8": rel(o, o8),
            "sink_mass": w[..., :s].sum(-1).mean((1, 2)).tolist(), "top8_mass": top8.tolist(),
            "k_norm_max_over_median": (k.norm(dim=-1).max(1).values / k.norm(dim=-1).median(1).values).tolist()}


def summary(name, rows):
    def mean(key):
        return sum(sum(r[key]) / len(r[key]) for r in rows) / len(rows)

    worst = sorted(rows, key=lambda r: -max(r["oKV"]))[:5]
    print(f"## {name}: mean over layers and heads: K err {mean('k_err'):.4f}, V err {mean('v_err'):.4f}, "
          f"oK {mean('oK'):.4f}, oV {mean('oV'):.4f}, oKV {mean('oKV'):.4f}, heavy8 {mean('heavy8'):.4f}, "
          f"sink mass {mean('sink_mass'):.3f}, top8 mass {mean('top8_mass'):.3f}")
    print("   worst (layer, head): " + ", ".join(
        f"L{r['layer']}h{max(range(len(r['oKV'])), key=lambda h: r['oKV'][h])} oKV {max(r['oKV']):.3f} "
        f"(oK {r['oK'][max(range(len(r['oKV'])), key=lambda h: r['oKV'][h])]:.3f})" for r in worst))
    print("| layer | K err | V err | oK | oV | oKV | heavy8 | sink mass | top8 mass | max/median |k| |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        cells = [f"{sum(r[k]) / len(r[k]):.4f}" for k in ("k_err", "v_err", "oK", "oV", "oKV", "heavy8")]
        cells += [f"{sum(r[k]) / len(r[k]):.3f}" for k in ("sink_mass", "top8_mass")]
        cells += [f"{max(r['k_norm_max_over_median']):.1f}"]
        print(f"| {r['layer']} | " + " | ".join(cells) + " |")
    sys.stdout.flush()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=2304)
    p.add_argument("--text", default="all")
    p.add_argument("--stride", type=int, default=4, help="every n-th query position from 256 on")
    p.add_argument("--config", default="{}", help="QJLConfig fields as JSON (default: the turbo default)")
    p.add_argument("--screen", nargs="*", default=None,
                   help="with --copy: more configs (JSON each) measured against the same exact pass")
    p.add_argument("--json", default=None)
    p.add_argument("--layers", action="store_true", help="instead: the KL of one forward pass with one layer's keys "
                   "or values decoded, for every layer (which layers' codes weigh most; turbo_layer_bits)")
    p.add_argument("--copy", action="store_true", help="instead: one forward pass with decoded K/V in every "
                   "layer, its KL per token split into copies (a bigram seen before) and the rest")
    args = p.parse_args()
    config = QJLConfig.from_dict(QJLConfig().to_dict() | json.loads(args.config))
    torch.set_grad_enabled(False)
    loaded = load_model(None)
    out = {}
    for name in parse_texts(args.text):
        ids = loaded.tokenizer(text_of(name), return_tensors="pt", add_special_tokens=False)["input_ids"]
        ids = ids[:, :args.tokens]
        if args.layers:
            out[label_of(name)] = layer_sensitivity(loaded.model, ids, config, label_of(name))
            continue
        if args.copy:
            import torch.nn.functional as F

            ref = F.log_softmax(loaded.model(input_ids=ids, use_cache=False).logits[0].float(), -1)
            out[label_of(name)] = {}
            for extra in [args.config] + (args.screen or []):
                cfg = QJLConfig.from_dict(QJLConfig().to_dict() | json.loads(extra))
                out[label_of(name)][extra] = r = copy_split(loaded.model, ids, cfg, ref)
                print(f"{label_of(name)} {extra}: " + ", ".join(f"{k} {v:.4f}" for k, v in r.items()), flush=True)
            continue
        seen = record(loaded.model, ids)
        pos = torch.arange(256, ids.shape[1], args.stride)
        rows = [probe_layer(i, q, k, v, config, pos) for i, (q, k, v) in enumerate(seen)]
        out[label_of(name)] = rows
        summary(label_of(name), rows)
        del seen
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"tokens": args.tokens, "config": config.to_dict(), "texts": out}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
