"""Rotation + Lloyd-Max codecs (`--kv turbo`, after TurboQuant, arXiv 2504.19874).

Each vector x of a head is stored as a scale (about ||x||: fp16, or 8 bits, a code times an fp16 step per group
of tokens) and b-bit codes of the coordinates of y = R x / ||x||, where R is a random orthogonal matrix (one per
model and role, from a seed) and each coordinate is quantised with the Lloyd-Max codebook of a rotated unit
vector's coordinate (qjl/codebooks.py). 2 or 2.25-bit values may use a 4-D codebook instead: the nearest of 256
(one byte) or 512 points (9 bits) per 4 coordinates.

Keys are scored from the codes: with y = x R^T (row vectors), <q, k> = <q R^T, k R^T>, so the query is
rotated once and a per-query table of 2^b values per coordinate, (q R^T)_j * centroid_c, is summed by
code, times the scale. An optional 1-bit QJL sketch of the residual k - k_hat makes the estimate unbiased.
Values: sum_t w_t v_t = (sum_t w_t s_t y_hat_t) R, the rotation applied once to the weighted sum.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .codebooks import codebook_on, pair_codebook_on, rotation, rotation_on, split_bits, vq4_on
from .ops import norm_codes, pack_codes, packed_bytes, pair_index, scalar_quantize, sign_bits, unpack_codes, vq_nearest
from .ops.attention import scales, turbo_key_scores, turbo_value_sum, value_index
from .ops.tables import byte_table
from .outliers import OutlierChannels
from .shared import SharedMatrices
from .sketch import jl_projection, jl_projection_on, sign_estimator_scale


@torch.library.custom_op("qjl::turbo_encode", mutates_args=())
def turbo_encode(x: Tensor, rotation: Tensor, bits: list[int], lengths: list[int], centroids: list[Tensor],
                 boundaries: list[Tensor], vq_codebook: Optional[Tensor], unbiased: bool = False
                 ) -> tuple[list[Tensor], Tensor]:
    """x [..., dim] float32 -> (packed codes of each part, fp16 scales [...]).

    y = R x/||x|| is coded part by part (the next lengths[p] coordinates at bits[p] bits each, the Lloyd-Max
    cell among boundaries[p]), or, with a `vq_codebook` [K, 4], as the nearest point of each 4 coordinates
    (K = 256: a byte each; 512: 9-bit codes in pack_codes' layout), or, with a pair codebook [64, 2], of each
    2 coordinates (the 6-bit index w as the two 3-bit codes w & 7, w >> 3, so pair_index reads w back).
    The stored scale is ||x|| times the least-squares fit <y, y_hat> / ||y_hat||^2 of the codes to the unit
    vector, rather than ||x||: the same 16 bits, a smaller error (K3/V2 on SmolLM2: ppl x1.043 -> x1.028).
    `unbiased`: ||x|| / <y, y_hat> instead, the scale whose decoded vector has x's own projection on x (the
    least-squares one is shorter along x by the codes' relative error, about 7% at 2.25 bits, a shrinkage that
    does not average out over the tokens a query attends to: BENCHMARKS.md "Unbiased scales")."""
    norms = x.norm(dim=-1)
    safe = torch.where(norms > 0, norms, torch.ones_like(norms))
    y = (x / safe.unsqueeze(-1)) @ rotation.T
    if vq_codebook is not None:
        codes = vq_nearest(y, vq_codebook)
        y_hat = vq_codebook[codes.long()].reshape(y.shape)
        if vq_codebook.shape[1] == 2:
            pairs = torch.stack([codes & 7, codes >> 3], dim=-1).reshape(y.shape)
            packed = [pack_codes(pairs, 3)]
        else:
            packed = [codes if vq_codebook.shape[0] <= 256 else pack_codes(codes, 9)]
    else:
        packed, parts, a = [], [], 0
        for b, n, c, bounds in zip(bits, lengths, centroids, boundaries):
            packed.append(scalar_quantize(y[..., a:a + n], bounds, b))
            parts.append(c[unpack_codes(packed[-1], b).long()])  # the centroids of the codes just made
            a += n
        y_hat = torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]
    dot = (y_hat * y).sum(-1)
    fit = 1.0 / dot.clamp_min(1e-30) if unbiased else dot / (y_hat * y_hat).sum(-1).clamp_min(1e-30)
    return packed, (norms * fit).to(torch.float16)


VQ_POINTS = {2: 256, 2.25: 512}  # value bits -> points of the 4-D codebook


def _part_names(base: str, parts) -> list[str]:
    """State names of the code parts: base, then base + "_hi" for the coordinates with one bit more."""
    return [base] + [base + "_hi"] * (len(parts) - 1)


class _Rotated(SharedMatrices):
    """What keys and values share: the rotation, the codebooks, encode to (codes, scales), decode.

    `dim` is the number of coordinates coded: head_dim, less the outlier channels a key codec keeps apart.
    `bits` may be fractional (2.25: a quarter of the coordinates at 3 bits, the rest at 2; split_bits).
    `norm_bits` 8: each scale as a uint8 code and an fp16 step per `norm_group` tokens (norm_codes).
    """

    def __init__(self, rotation: Tensor, bits: float, dim: int, rotation_seed: int, norm_bits: int = 16,
                 norm_group: int = 32, unbiased: bool = False):
        if dim % 8 or dim < 8:
            raise ValueError(f"{dim} coded coordinates is not a multiple of 8")
        if tuple(rotation.shape) != (dim, dim):
            raise ValueError(f"rotation of shape {tuple(rotation.shape)} for {dim} coordinates")
        if not 1 <= bits <= 4:
            raise ValueError(f"turbo codes have 1 to 4 bits, not {bits}")
        self.rotation = rotation  # R: [dim, dim] float32, y = x @ R.T
        self.bits = bits
        self.parts = split_bits(bits, dim)
        self.dim = dim
        self.rotation_seed = rotation_seed
        self.vq = 0  # TurboValues: points of the 4-D codebook (256: a byte per 4 coordinates; 512: 9 bits)
        self.pair = False  # TurboKeys: 3-bit codes from the 2-D codebook (pair_codebook_on)
        self.norm_bits, self.norm_group = norm_bits, norm_group
        self.unbiased = unbiased  # scales ||x|| / <y, y_hat> rather than the least-squares fit (turbo_encode)

    def _centroids(self, device) -> list[Tensor]:
        if self.pair:
            return [pair_codebook_on(self.dim, str(torch.device(device)))]
        return [codebook_on(b, self.dim, str(torch.device(device)))[0] for b, _, _ in self.parts]

    def _encode(self, x: Tensor) -> tuple[list[Tensor], Tensor]:
        """x: [B, H, T, dim] float32 -> (packed codes of each part, fp16 scales)."""
        dev = str(x.device)
        parts = [(2, 0, self.dim)] if self.vq else self.parts  # (the scalar parts are unused with a codebook)
        books = [codebook_on(b, self.dim, dev) for b, _, _ in parts]
        return turbo_encode(x, self.rotation.to(x.device), [b for b, _, _ in parts],
                            [e - a for _, a, e in parts], [c for c, _ in books], [bd for _, bd in books],
                            vq4_on(self.dim, dev, self.vq) if self.vq else
                            pair_codebook_on(self.dim, dev) if self.pair else None, self.unbiased)

    def _norm_state(self, base: str, norms: Tensor) -> dict[str, Tensor]:
        """The fp16 scales as stored: as they are, or 8-bit codes + steps."""
        if self.norm_bits == 16:
            return {base: norms}
        codes, steps = norm_codes(norms, self.norm_group)
        return {base: codes, base + "_steps": steps}

    def _norm_spec(self, base: str, batch: int, heads: int, tokens: int) -> dict[str, tuple]:
        if self.norm_bits == 16:
            return {base: (torch.float16, (batch, heads, tokens))}
        return {base: (torch.uint8, (batch, heads, tokens)),
                base + "_steps": (torch.float16, (batch, heads, tokens // self.norm_group))}

    def _tables(self, device) -> list[Tensor]:
        """What each part's index decodes to (turbo_value_sum): [256, per] for whole bytes, [8, 1] for 3 bits,
        the [512, 4] codebook for 9-bit codes."""
        if self.vq:
            return [vq4_on(self.dim, str(torch.device(device)), self.vq)]
        return [c.unsqueeze(1) if b == 3 else byte_table(b, c)
                for c, (b, _, _) in zip(self._centroids(device), self.parts)]

    def _unit(self, packed: list[Tensor]) -> Tensor:
        """The centroids of every part's codes, concatenated: y_hat [..., dim] float32."""
        if self.pair:
            return self._centroids(packed[0].device)[0][pair_index(packed[0]).long()].flatten(-2)
        tables = self._tables(packed[0].device)
        ys = [t[value_index(p, b).long()].reshape(*p.shape[:-1], -1)
              for p, (b, _, _), t in zip(packed, self.parts, tables)]
        return torch.cat(ys, dim=-1) if len(ys) > 1 else ys[0]

    def _decode(self, packed: list[Tensor], norms: Tensor) -> Tensor:
        return (self._unit(packed) @ self.rotation.to(norms.device)) * norms.float().unsqueeze(-1)

    def _move(self, device) -> None:
        self.rotation = rotation_on(self.dim, self.rotation_seed, str(torch.device(device)))

    def _codes_spec(self, base: str, batch: int, heads: int, tokens: int) -> dict[str, tuple]:
        if self.vq:
            index_bits = 8 if self.vq == 256 else 9
            return {base: (torch.uint8, (batch, heads, tokens, packed_bytes(self.dim // 4, index_bits)))}
        return {name: (torch.uint8, (batch, heads, tokens, packed_bytes(b - a, bits)))
                for name, (bits, a, b) in zip(_part_names(base, self.parts), self.parts)}


def _complement(channels: Tensor, head_dim: int) -> Tensor:
    """channels [B, H, r] -> the other channels [B, H, head_dim - r], ascending."""
    B, H, r = channels.shape
    keep = torch.ones(B, H, head_dim, dtype=torch.bool, device=channels.device)
    keep.scatter_(2, channels, False)
    return torch.arange(head_dim, device=channels.device).expand(B, H, head_dim)[keep].view(B, H, head_dim - r)


class TurboKeys(_Rotated):
    """Keys of one layer (the KeyCodec of qjl/codecs.py): an fp16 scale (about ||k||) and b-bit Lloyd-Max codes
    of R k/||k||, optional QJL sketch of k - k_hat; optionally r outlier channels kept apart (OutlierChannels,
    chosen by q^2 k^2 at the first encode) with the rotation and codes covering the other head_dim - r."""

    SHARED_ATTRS = {"rotation": "rotation", "projection": "projection"}
    PARAM_ATTRS = {"key_head_outliers": "head_outliers"}
    CHANNEL_INDICES = {"key_head_outliers": True}

    def __init__(self, rotation: Tensor, bits: float, head_dim: int, rotation_seed: int = 0,
                 projection: Tensor | None = None, projection_seed: int = 0, outliers: int = 0,
                 group_size: int = 32, outlier_bits: int = 4, norm_bits: int = 16, codebook: str = "scalar",
                 unbiased: bool = False):
        super().__init__(rotation, bits, head_dim - outliers, rotation_seed, norm_bits, group_size, unbiased)
        self.pair = codebook == "vq2" and bits == 3
        self.head_dim = head_dim
        self.projection = projection  # S: [m, dim] float32 for the residual, or None
        self.seed = projection_seed
        self.scale = sign_estimator_scale(projection.shape[0], self.dim) if projection is not None else 0.0
        self.outliers = outliers
        self.channels = OutlierChannels(outliers, group_size, outlier_bits) if outliers else None
        self.head_outliers: Tensor | None = None  # [B, H, r], fixed at the first encode
        self.rest: Tensor | None = None  # [B, H, dim], the channels the codes cover

    @classmethod
    def for_layer(cls, config, layer_idx: int, head_dim: int) -> "TurboKeys":
        rseed, pseed = config.matrix_seed("key_rotation"), config.matrix_seed("key_residual")
        r = config.turbo_outliers(head_dim)
        m = config.turbo_residual_dim(head_dim - r)
        proj = jl_projection(m, head_dim - r, pseed) if m else None
        return cls(rotation(head_dim - r, rseed), config.turbo_bits("k", layer_idx), head_dim, rseed, proj, pseed,
                   r, config.group_size, config.outlier_bits, config.turbo_norm_bits, config.turbo_key_codebook,
                   config.turbo_unbiased_keys)

    def to(self, device) -> "TurboKeys":
        self._move(device)
        if self.projection is not None:
            m, d = self.projection.shape
            self.projection = jl_projection_on(m, d, self.seed, str(torch.device(device)))
        if self.head_outliers is not None:
            self.set_params({"key_head_outliers": self.head_outliers.to(device)})
        return self

    def shared_seeds(self) -> dict[str, int]:
        out = {"rotation": self.rotation_seed}
        if self.projection is not None:
            out["projection"] = self.seed
        return out

    def set_params(self, params: dict[str, Tensor]) -> None:
        self.head_outliers = params.get("key_head_outliers")
        self.rest = None if self.head_outliers is None else _complement(self.head_outliers.long(), self.head_dim)

    def encode(self, k: Tensor, query_energy: Tensor | None = None) -> dict[str, Tensor]:
        """k: [B, H, T, D] (T a multiple of group_size when outliers are kept apart) -> state.

        query_energy: [B, H, D] mean q_j^2 of the queries that attended these keys; with outliers, the first
        encode picks the channels by q_j^2 k_j^2."""
        k = k.float()
        B, H, T, D = k.shape
        state: dict[str, Tensor] = {}
        if self.outliers:
            if self.head_outliers is None:
                self.set_params({"key_head_outliers": self.channels.choose(k, query_energy)})
            state.update(self.channels.encode(k.gather(3, self.head_outliers.unsqueeze(2).expand(B, H, T, -1))))
            k = k.gather(3, self.rest.unsqueeze(2).expand(B, H, T, -1))
        packed, norms = self._encode(k)
        state.update(zip(_part_names("key_codes", self.parts), packed))
        state.update(self._norm_state("key_norms", norms))
        if self.projection is not None:
            res = k - self._decode(packed, scales(state["key_norms"], state.get("key_norms_steps")))
            state["key_residual_signs"] = sign_bits(res @ self.projection.to(k.device).T)
            state["key_residual_norms"] = res.norm(dim=-1).to(torch.float16)
        return state

    def op_args(self, state: dict[str, Tensor]) -> dict:
        names = _part_names("key_codes", self.parts)
        args = dict(key_codes=[state[n] for n in names], key_bits=[b for b, _, _ in self.parts],
                    key_centroids=self._centroids(state["key_norms"].device), key_norms=state["key_norms"],
                    key_norm_steps=state.get("key_norms_steps"), key_rotation=self.rotation,
                    channels=self.head_outliers, rest=self.rest,
                    residual_signs=state.get("key_residual_signs"), residual_norms=state.get("key_residual_norms"),
                    residual_projection=self.projection, residual_scale=self.scale)
        if self.channels is not None:
            return args | self.channels.op_args(state)
        return args | dict(outlier_values=None, outlier_scales=None, outlier_mins=None, outlier_bits=16,
                           group_size=1)

    def scores(self, q: Tensor, state: dict[str, Tensor]) -> Tensor:
        """q: [B, H, Q, D] -> logits <q, k_hat> (+ the residual's QJL estimate): [B, H, Q, T] float32."""
        return turbo_key_scores(q.float(), **self.op_args(state))

    def decode(self, state: dict[str, Tensor]) -> Tensor:
        """k_hat [B, H, T, D] float32 (without the residual, which is not invertible): the tests' reference."""
        rest = self._decode([state[n] for n in _part_names("key_codes", self.parts)],
                            scales(state["key_norms"], state.get("key_norms_steps")))
        if not self.outliers:
            return rest
        B, H, T, _ = rest.shape
        k = torch.zeros(B, H, T, self.head_dim, device=rest.device)
        k.scatter_(3, self.rest.unsqueeze(2).expand(B, H, T, -1), rest)
        k.scatter_(3, self.head_outliers.unsqueeze(2).expand(B, H, T, -1), self.channels.decode(state))
        return k

    def state_spec(self, batch: int, heads: int, tokens: int) -> dict[str, tuple]:
        spec = self.channels.state_spec(batch, heads, tokens) if self.channels else {}
        spec |= self._codes_spec("key_codes", batch, heads, tokens)
        spec |= self._norm_spec("key_norms", batch, heads, tokens)
        if self.projection is not None:
            spec["key_residual_signs"] = (torch.uint8, (batch, heads, tokens, self.projection.shape[0] // 8))
            spec["key_residual_norms"] = (torch.float16, (batch, heads, tokens))
        return spec

    def param_spec(self, batch: int, heads: int) -> dict[str, tuple]:
        return {"key_head_outliers": (torch.int64, (batch, heads, self.outliers))} if self.outliers else {}


class TurboValues(_Rotated):
    """Values of one layer (the ValueCodec of qjl/codecs.py): a scale (about ||v||) and b-bit codes of R v/||v||
    (with codebook "vq4", 2 bits: one byte per 4 coordinates from the 256-point 4-D codebook; 2.25 bits: 9 bits
    per 4 coordinates from the 512-point one)."""

    SHARED_ATTRS = {"value_rotation": "rotation"}

    def __init__(self, rotation: Tensor, bits: float, dim: int, rotation_seed: int, codebook: str = "scalar",
                 norm_bits: int = 16, norm_group: int = 32, unbiased: bool = False):
        super().__init__(rotation, bits, dim, rotation_seed, norm_bits, norm_group, unbiased)
        if codebook == "vq4" and bits in VQ_POINTS and dim % (4 if bits == 2 else 32) == 0:  # 9-bit: 8 codes a byte
            self.vq = VQ_POINTS[bits]
            self.parts = [(2 if self.vq == 256 else 9, 0, dim)]  # the index layout: bytes, or 9-bit codes

    @classmethod
    def for_layer(cls, config, layer_idx: int, head_dim: int) -> "TurboValues":
        vseed = config.matrix_seed("value_rotation")
        return cls(rotation(head_dim, vseed), config.turbo_bits("v", layer_idx), head_dim, vseed,
                   config.turbo_value_codebook, config.turbo_norm_bits, config.group_size,
                   config.turbo_unbiased_values)

    def to(self, device) -> "TurboValues":
        self._move(device)
        return self

    def shared_seeds(self) -> dict[str, int]:
        return {"value_rotation": self.rotation_seed}

    def set_params(self, params: dict[str, Tensor]) -> None:
        pass

    def encode(self, v: Tensor) -> dict[str, Tensor]:
        packed, norms = self._encode(v.float())
        return {**dict(zip(_part_names("value_codes", self.parts), packed)), **self._norm_state("value_norms", norms)}

    def decode(self, state: dict[str, Tensor]) -> Tensor:
        """Dequantised values [B, H, T, D] float32: the reference for tests, never used by attention."""
        return self._decode([state[n] for n in _part_names("value_codes", self.parts)],
                            scales(state["value_norms"], state.get("value_norms_steps")))

    def op_args(self, state: dict[str, Tensor]) -> dict:
        return dict(value_codes=[state[n] for n in _part_names("value_codes", self.parts)],
                    value_bits=[b for b, _, _ in self.parts], value_tables=self._tables(state["value_norms"].device),
                    value_norms=state["value_norms"], value_norm_steps=state.get("value_norms_steps"),
                    value_rotation=self.rotation)

    def weighted_sum(self, w: Tensor, state: dict[str, Tensor]) -> Tensor:
        """w: [B, H, Q, T] -> sum_t w_t v_t = (sum_t w_t s_t y_hat_t) R: [B, H, Q, D] float32."""
        return turbo_value_sum(w, **self.op_args(state))

    def state_spec(self, batch: int, heads: int, tokens: int) -> dict[str, tuple]:
        return self._codes_spec("value_codes", batch, heads, tokens) | self._norm_spec("value_norms", batch, heads,
                                                                                       tokens)

    def param_spec(self, batch: int, heads: int) -> dict[str, tuple]:
        return {}
