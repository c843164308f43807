"""Rotation + Lloyd-Max codecs (`--kv turbo`, after TurboQuant, arXiv 2504.19874). Pure torch.

Each vector x of a head is stored as ||x|| (fp16) and b-bit codes of the coordinates of
y = R x / ||x||, where R is a random orthogonal matrix (one per layer class, from a seed) and each
coordinate is quantised with the Lloyd-Max codebook of a rotated unit vector's coordinate, whose
density is proportional to (1 - t^2)^((d-3)/2) on [-1, 1] (about N(0, 1/d)). No scales, no minimums.

Keys are scored from the codes: with y = x R^T (row vectors), <q, k> = <q R^T, k R^T>, so the query is
rotated once and a per-query table of 2^b values per coordinate, (q R^T)_j * centroid_c, is summed by
code (embedding_bag over packed bytes, like keys.sign_dots), times ||k||. An optional 1-bit QJL sketch
of the residual k - k_hat (sign bits + residual norm, qjl/sketch.py) makes the estimate unbiased.
Values: sum_t w_t v_t = (sum_t w_t ||v_t|| y_hat_t) R, the rotation applied once to the weighted sum.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .sketch import byte_sign_table, jl_projection, jl_projection_on, pack_bits, sign_estimator_scale
from .keys import OutlierChannels
from .values import unpack_codes

TURBO_BITS = (1, 2, 3, 4)
# Tokens decoded at once in TurboValues.weighted_sum: bounds the temporary to block * D floats per head.
_BLOCK = 4096


# --- rotation -----------------------------------------------------------------------------------
@functools.lru_cache(maxsize=16)
def rotation(d: int, seed: int) -> torch.Tensor:
    """R: [d, d] float32 orthogonal, Haar-distributed (QR of a Gaussian, sign-fixed). Memoised, never modified."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)
    return q.T.to(torch.float32).contiguous()


@functools.lru_cache(maxsize=32)
def rotation_on(d: int, seed: int, device: str) -> torch.Tensor:
    """rotation() on a device, one copy per device shared by the layers that use it."""
    return rotation(d, seed).to(device)


# --- Lloyd-Max codebooks ------------------------------------------------------------------------
@functools.lru_cache(maxsize=8)
def _density(d: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(grid x, cumulative mass F(x), cumulative first moment M(x)) of the coordinate density.

    d = 0 means N(0, 1); d >= 4 means a coordinate of a uniform unit vector in R^d.
    """
    if d == 0:
        x = np.linspace(-12.0, 12.0, 400001)
        p = np.exp(-0.5 * x * x)
    else:
        x = np.linspace(-1.0, 1.0, 400001)
        with np.errstate(divide="ignore"):
            p = np.exp((d - 3) / 2 * np.log1p(-x * x))
    dx = x[1] - x[0]
    cum = lambda f: np.concatenate([[0.0], np.cumsum((f[1:] + f[:-1]) * dx / 2)])  # noqa: E731 (trapezoid)
    return x, cum(p), cum(p * x)


def solve_lloyd_max(bits: int, d: int, iters: int = 20000, tol: float = 1e-12) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd-Max quantiser of the density for d (0: N(0,1)) -> (centroids [2^b], boundaries [2^b - 1]).

    Alternates boundaries = midpoints of centroids and centroids = conditional means of their cells,
    the cell integrals read off cumulative sums on a fine grid (interpolated, so they move smoothly).
    """
    x, F_, M_ = _density(d)
    n = 1 << bits
    c = np.interp((np.arange(n) + 0.5) / n, F_ / F_[-1], x)  # start at the quantiles
    for _ in range(iters):
        b = np.concatenate([[x[0]], (c[1:] + c[:-1]) / 2, [x[-1]]])
        Fb, Mb = np.interp(b, x, F_), np.interp(b, x, M_)
        new = np.diff(Mb) / np.diff(Fb)
        done = np.abs(new - c).max() < tol
        c = new
        if done:
            break
    return c, (c[1:] + c[:-1]) / 2


@functools.lru_cache(maxsize=32)
def codebook(bits: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(centroids [2^b], boundaries [2^b - 1]) float32 for a rotated unit vector's coordinate in R^d."""
    if bits not in TURBO_BITS:
        raise ValueError(f"turbo codes have 1 to 4 bits, not {bits}")
    c, b = solve_lloyd_max(bits, d)
    return torch.tensor(c, dtype=torch.float32), torch.tensor(b, dtype=torch.float32)


@functools.lru_cache(maxsize=32)
def _codebook_on(bits: int, d: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    c, b = codebook(bits, d)
    return c.to(device), b.to(device)


@functools.lru_cache(maxsize=1)
def vq4_codebook() -> torch.Tensor:
    """[256, 4] float32: k-means codebook of 4 independent N(0, 1) numbers (qjl/data/vq4_256.txt, made by
    scripts/make_vq_codebook.py): mean squared error 0.096 a number at 2 bits, against 0.1175 for the scalar
    Lloyd-Max code."""
    path = Path(__file__).parent / "data" / "vq4_256.txt"
    rows = [line.split() for line in path.read_text().splitlines() if line and not line.startswith("#")]
    return torch.tensor([[float(v) for v in row] for row in rows], dtype=torch.float32)


@functools.lru_cache(maxsize=16)
def _vq4_on(dim: int, device: str) -> torch.Tensor:
    """The 4-D codebook for coordinates of a rotated unit vector of `dim` (about N(0, 1/dim)), on a device."""
    return (vq4_codebook() / math.sqrt(dim)).to(device)


# --- packing ------------------------------------------------------------------------------------
def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [..., n] (values < 2^bits) -> uint8 [..., n*bits/8].

    1, 2, 4 bits: 8/bits codes a byte, code s at bits s*b of its byte (values.pack_codes);
    3 bits: 8 codes in 3 bytes (a 24-bit little-endian word, code s at bits 3s).
    """
    *lead, n = codes.shape
    if bits != 3:
        per = 8 // bits
        c = codes.reshape(*lead, n // per, per).to(torch.uint8)
        shifts = torch.arange(per, device=codes.device, dtype=torch.uint8) * bits
        return (c << shifts).sum(dim=-1, dtype=torch.uint8)
    c = codes.reshape(*lead, n // 8, 8).to(torch.int32)
    word = (c << (torch.arange(8, device=codes.device, dtype=torch.int32) * 3)).sum(dim=-1)
    out = torch.stack([(word >> s) & 255 for s in (0, 8, 16)], dim=-1).to(torch.uint8)
    return out.reshape(*lead, n // 8 * 3)


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """The inverse of pack -> uint8 codes [..., n]."""
    if bits != 3:
        return unpack_codes(packed, bits)
    *lead, nb = packed.shape
    b = packed.reshape(*lead, nb // 3, 3).to(torch.int32)
    word = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16)
    codes = (word.unsqueeze(-1) >> (torch.arange(8, device=packed.device, dtype=torch.int32) * 3)) & 7
    return codes.to(torch.uint8).reshape(*lead, nb // 3 * 8)


@functools.lru_cache(maxsize=16)
def _byte_codes(bits: int, device: str) -> torch.Tensor:
    """[256, 8/bits] long: the codes held by every byte value (bits 1, 2, 4)."""
    return unpack_codes(torch.arange(256, dtype=torch.uint8).unsqueeze(-1), bits).long().to(device)


@functools.lru_cache(maxsize=16)
def _byte_onehot(bits: int, device: str) -> torch.Tensor:
    """[per * 2^b, 256] float32: entry (s * 2^b + c, byte) is 1 if code s of the byte is c (bits 1, 2, 4)."""
    codes = _byte_codes(bits, "cpu")  # [256, per]
    per, K = codes.shape[1], 1 << bits
    rows = torch.arange(per).unsqueeze(0) * K + codes  # [256, per]
    m = torch.zeros(per * K, 256)
    m[rows, torch.arange(256).unsqueeze(1).expand(256, per)] = 1.0
    return m.to(device)


def _centroid_values(packed: torch.Tensor, bits: int, centroids: torch.Tensor) -> torch.Tensor:
    """The centroid of every packed code, float32 [..., n], by one table look-up per byte (bits 1, 2, 4)."""
    if bits == 3:
        return centroids[unpack(packed, 3).long()]
    table = centroids[_byte_codes(bits, str(packed.device))]  # [256, per]
    vals = F.embedding(packed.to(torch.int32), table)
    return vals.reshape(*packed.shape[:-1], -1)


def table_dots(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """sum_i table[b, h, q, i, index[b, h, t, i]] for every query and key.

    table: [B, H, Q, n, K] float; index: [B, H, T, n] integers < K -> [B, H, Q, T]. Each key is a bag of n
    rows of a [n*K, Q] table summed by embedding_bag (as keys.sign_dots, K any size).
    """
    B, H, Q, n, K = table.shape
    T = index.shape[2]
    offsets = (torch.arange(B * H, device=index.device).view(B * H, 1) * (n * K)
               + torch.arange(n, device=index.device) * K).to(torch.int32).unsqueeze(1)
    bags = (index.reshape(B * H, T, n).to(torch.int32) + offsets).reshape(B * H * T, n)
    weight = table.permute(0, 1, 3, 4, 2).reshape(B * H * n * K, Q)
    return F.embedding_bag(bags, weight, mode="sum").view(B, H, T, Q).transpose(2, 3)


# --- the codecs ---------------------------------------------------------------------------------
def split_bits(bits: float, dim: int) -> list[tuple[int, int, int]]:
    """Fractional bits as parts of the rotated coordinates: [(bits, start, end)], the first part floor(bits),
    the last (a multiple of 8 coordinates) one bit more, so that the mean is about `bits`. After a random
    rotation the coordinates are alike, so which ones get the extra bit does not matter."""
    lo = int(math.floor(bits + 1e-9))
    n_hi = 0 if lo >= 4 else int(round((bits - lo) * dim / 8)) * 8
    if lo not in TURBO_BITS:
        raise ValueError(f"turbo codes have 1 to 4 bits, not {bits}")
    if n_hi >= dim:
        return [(lo + 1, 0, dim)]
    return [(lo, 0, dim - n_hi)] + ([(lo + 1, dim - n_hi, dim)] if n_hi else [])


def _part_names(base: str, parts) -> list[str]:
    """State names of the code parts: base, then base + "_hi" for the coordinates with one bit more."""
    return [base] + [base + "_hi"] * (len(parts) - 1)


class _Rotated:
    """What keys and values share: the rotation, the codebooks, encode to (codes, scales), decode.

    `dim` is the number of coordinates coded: head_dim, less the outlier channels a key codec keeps apart.
    `bits` may be fractional (2.25: a quarter of the coordinates at 3 bits, the rest at 2; split_bits).
    """

    def __init__(self, rotation: torch.Tensor, bits: float, dim: int, rotation_seed: int):
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
        self.vq = False  # TurboValues: 2-bit codes as one byte per 4 coordinates, from a 4-D codebook

    def _codebook(self, bits: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        return _codebook_on(bits, self.dim, str(torch.device(device)))

    def _encode(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """x: [B, H, T, dim] float32 -> (packed codes of each part, fp16 scales, x_hat float32 as stored)."""
        R = self.rotation.to(x.device)
        norms = x.norm(dim=-1)
        safe = torch.where(norms > 0, norms, torch.ones_like(norms))
        y = (x / safe.unsqueeze(-1)) @ R.T
        packed, y_hat = [], []
        if self.vq:  # nearest of 256 points for each 4 coordinates: argmax <g, c> - |c|^2 / 2
            cb = _vq4_on(self.dim, str(x.device))
            g = y.reshape(*y.shape[:-1], self.dim // 4, 4)
            codes = (g @ cb.T - 0.5 * (cb * cb).sum(-1)).argmax(-1)
            y_hat.append(cb[codes].reshape(y.shape))
            packed.append(codes.to(torch.uint8))
        else:
            for bits, a, b in self.parts:
                centroids, bounds = self._codebook(bits, x.device)
                codes = torch.bucketize(y[..., a:b].contiguous(), bounds)
                y_hat.append(centroids[codes])
                packed.append(pack(codes.to(torch.uint8), bits))
        y_hat = torch.cat(y_hat, dim=-1) if len(y_hat) > 1 else y_hat[0]
        # Stored scale: ||x|| times the least-squares fit <y, y_hat> / ||y_hat||^2 of the codes to the unit vector,
        # rather than ||x||: the same 16 bits, a smaller error (K3/V2 on SmolLM2: ppl x1.043 -> x1.028).
        fit = (y_hat * y).sum(-1) / (y_hat * y_hat).sum(-1).clamp_min(1e-30)
        norms16 = (norms * fit).to(torch.float16)
        x_hat = (y_hat @ R) * norms16.float().unsqueeze(-1)
        return packed, norms16, x_hat

    def _unit(self, packed: list[torch.Tensor]) -> torch.Tensor:
        """The centroids of every part's codes, concatenated: y_hat [..., dim] float32."""
        if self.vq:
            vals = F.embedding(packed[0].to(torch.int32), _vq4_on(self.dim, str(packed[0].device)))
            return vals.reshape(*packed[0].shape[:-1], self.dim)
        ys = [_centroid_values(p, bits, self._codebook(bits, p.device)[0]) for p, (bits, _, _) in zip(packed, self.parts)]
        return torch.cat(ys, dim=-1) if len(ys) > 1 else ys[0]

    def _decode(self, packed: list[torch.Tensor], norms: torch.Tensor) -> torch.Tensor:
        return (self._unit(packed) @ self.rotation.to(norms.device)) * norms.float().unsqueeze(-1)

    def _move(self, device) -> None:
        self.rotation = rotation_on(self.dim, self.rotation_seed, str(torch.device(device)))


@functools.lru_cache(maxsize=8)
def _pair_onehot(device: str) -> torch.Tensor:
    """[2 * 8, 64] float32: entry (s * 8 + c, w) is 1 if 3-bit code s of the 6-bit index w is c."""
    w = torch.arange(64)
    codes = torch.stack([w & 7, w >> 3], dim=1)  # [64, 2]
    m = torch.zeros(16, 64)
    m[torch.arange(2) * 8 + codes, w.unsqueeze(1).expand(64, 2)] = 1.0
    return m.to(device)


def _pair_index(packed: torch.Tensor) -> torch.Tensor:
    """3-bit codes packed 8 to 3 bytes [..., n*3/8] -> int32 [..., n/2]: four 6-bit indices a 24-bit word, each
    holding 2 codes (code s at bits 3s), so scoring sums n/2 table entries a key instead of n, and the index is
    found with half the shifts of unpacking every code."""
    *lead, nb = packed.shape
    b = packed.reshape(*lead, nb // 3, 3).to(torch.int32)
    word = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16)
    return torch.stack([(word >> s) & 63 for s in (0, 6, 12, 18)], dim=-1).reshape(*lead, nb // 3 * 4)


def _part_dots(qr: torch.Tensor, packed: torch.Tensor, bits: int, centroids: torch.Tensor) -> torch.Tensor:
    """sum_j qr_j * centroid(code_j) for every query and key of one code part: [B, H, Q, T]."""
    B, H, Q, D = qr.shape
    qc = qr.unsqueeze(-1) * centroids  # [B, H, Q, D, 2^b]
    if bits == 3:
        # table[..., i, w] = qc[..., 2i, w & 7] + qc[..., 2i + 1, w >> 3]: one matmul with a 0/1 matrix
        table = qc.reshape(B, H, Q, D // 2, 16) @ _pair_onehot(str(qr.device))
        return table_dots(table, _pair_index(packed))
    per = 8 // bits
    # table[..., i, byte] = sum_s qc[..., i*per + s, code s of byte]: one matmul with a 0/1 matrix
    table = qc.reshape(B, H, Q, D // per, -1) @ _byte_onehot(bits, str(qr.device))
    return table_dots(table, packed)  # [B, H, Q, D/per, 256] summed by the packed bytes


def _seeds(config) -> tuple[int, int, int]:
    """(key rotation, key residual sketch, value rotation) seeds: one of each per model (one layer class)."""
    return config.seed * 1000 + 2, config.seed * 1000 + 3, config.seed * 1000 + 4


def _complement(channels: torch.Tensor, head_dim: int) -> torch.Tensor:
    """channels [B, H, r] -> the other channels [B, H, head_dim - r], ascending."""
    B, H, r = channels.shape
    keep = torch.ones(B, H, head_dim, dtype=torch.bool, device=channels.device)
    keep.scatter_(2, channels, False)
    return torch.arange(head_dim, device=channels.device).expand(B, H, head_dim)[keep].view(B, H, head_dim - r)


class TurboKeys(_Rotated):
    """Keys of one layer: an fp16 scale (about ||k||) and b-bit Lloyd-Max codes of R k/||k||, optional QJL
    sketch of k - k_hat; optionally r outlier channels kept apart (OutlierChannels, chosen by q^2 k^2 at the
    first encode) with the rotation and codes covering the other head_dim - r channels only."""

    def __init__(self, rotation: torch.Tensor, bits: int, head_dim: int, rotation_seed: int = 0,
                 projection: torch.Tensor | None = None, projection_seed: int = 0, outliers: int = 0,
                 group_size: int = 32, outlier_bits: int = 4):
        super().__init__(rotation, bits, head_dim - outliers, rotation_seed)
        self.head_dim = head_dim
        self.projection = projection  # S: [m, dim] float32 for the residual, or None
        self.seed = projection_seed
        self.scale = sign_estimator_scale(projection.shape[0], self.dim) if projection is not None else 0.0
        self.outliers = outliers
        self.channels = OutlierChannels(outliers, group_size, outlier_bits) if outliers else None
        self.head_outliers: torch.Tensor | None = None  # [B, H, r], fixed at the first encode
        self.rest: torch.Tensor | None = None  # [B, H, dim], the channels the codes cover

    @classmethod
    def for_layer(cls, config, layer_idx: int, head_dim: int) -> "TurboKeys":
        rseed, pseed, _ = _seeds(config)
        r = config.turbo_outliers(head_dim)
        m = config.turbo_residual_dim(head_dim - r)
        proj = jl_projection(m, head_dim - r, pseed) if m else None
        return cls(rotation(head_dim - r, rseed), config.turbo_key_bits, head_dim, rseed, proj, pseed,
                   r, config.group_size, config.outlier_bits)

    def to(self, device) -> "TurboKeys":
        self._move(device)
        if self.projection is not None:
            m, d = self.projection.shape
            self.projection = jl_projection_on(m, d, self.seed, str(torch.device(device)))
        if self.head_outliers is not None:
            self.set_params({"key_head_outliers": self.head_outliers.to(device)})
        return self

    def shared_seeds(self) -> dict[str, int]:
        """Per-model matrices (stored once per seed in cache files): name -> seed."""
        out = {"rotation": self.rotation_seed}
        if self.projection is not None:
            out["projection"] = self.seed
        return out

    def set_shared(self, name: str, matrix: torch.Tensor) -> None:
        setattr(self, name, matrix)

    def set_params(self, params: dict[str, torch.Tensor]) -> None:
        """Restore what params() returned, less the shared matrices (from a cache file)."""
        self.head_outliers = params.get("key_head_outliers")
        self.rest = None if self.head_outliers is None else _complement(self.head_outliers.long(), self.head_dim)

    def encode(self, k: torch.Tensor, query_energy: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """k: [B, H, T, D] (T a multiple of group_size when outliers are kept apart) -> state.

        query_energy: [B, H, D] mean q_j^2 of the queries that attended these keys; with outliers, the first
        encode picks the channels by q_j^2 k_j^2."""
        k = k.float()
        B, H, T, D = k.shape
        state: dict[str, torch.Tensor] = {}
        if self.outliers:
            if self.head_outliers is None:
                self.set_params({"key_head_outliers": self.channels.choose(k, query_energy)})
            state.update(self.channels.encode(k.gather(3, self.head_outliers.unsqueeze(2).expand(B, H, T, -1))))
            k = k.gather(3, self.rest.unsqueeze(2).expand(B, H, T, -1))
        packed, norms, k_hat = self._encode(k)
        state.update(zip(_part_names("key_codes", self.parts), packed))
        state["key_norms"] = norms
        if self.projection is not None:
            res = k - k_hat
            state["key_residual_signs"] = pack_bits((res @ self.projection.to(k.device).T) > 0)
            state["key_residual_norms"] = res.norm(dim=-1).to(torch.float16)
        return state

    def scores(self, q: torch.Tensor, state: dict[str, torch.Tensor]) -> torch.Tensor:
        """q: [B, H, Q, D] -> logits <q, k_hat> (+ the residual's QJL estimate): [B, H, Q, T] float32."""
        q = q.float()
        B, H, Q, _ = q.shape
        extra = None
        if self.outliers:
            extra = self.channels.scores(q.gather(3, self.head_outliers.unsqueeze(2).expand(B, H, Q, -1)), state)
            q = q.gather(3, self.rest.unsqueeze(2).expand(B, H, Q, -1))
        qr = q @ self.rotation.T  # the query, rotated once
        dots = None
        for name, (bits, a, b) in zip(_part_names("key_codes", self.parts), self.parts):
            part = _part_dots(qr[..., a:b], state[name], bits, self._codebook(bits, q.device)[0])
            dots = part if dots is None else dots + part
        logits = dots * state["key_norms"].float().unsqueeze(2)
        if self.projection is not None:
            res = table_dots(byte_sign_table(q @ self.projection.T), state["key_residual_signs"])
            logits = logits + res * (self.scale * state["key_residual_norms"].float().unsqueeze(2))
        return logits if extra is None else logits + extra

    def decode(self, state: dict[str, torch.Tensor]) -> torch.Tensor:
        """k_hat [B, H, T, D] float32 (without the residual, which is not invertible): the tests' reference."""
        rest = self._decode([state[n] for n in _part_names("key_codes", self.parts)], state["key_norms"])
        if not self.outliers:
            return rest
        B, H, T, _ = rest.shape
        k = torch.zeros(B, H, T, self.head_dim, device=rest.device)
        k.scatter_(3, self.rest.unsqueeze(2).expand(B, H, T, -1), rest)
        k.scatter_(3, self.head_outliers.unsqueeze(2).expand(B, H, T, -1), self.channels.decode(state))
        return k

    def params(self) -> dict[str, torch.Tensor]:
        p = {"rotation": self.rotation}
        if self.projection is not None:
            p["projection"] = self.projection
        if self.head_outliers is not None:
            p["key_head_outliers"] = self.head_outliers
        return p


class TurboValues(_Rotated):
    """Values of one layer: an fp16 scale (about ||v||) and b-bit Lloyd-Max codes of R v/||v||."""

    def __init__(self, rotation: torch.Tensor, bits: float, dim: int, rotation_seed: int, codebook: str = "scalar"):
        super().__init__(rotation, bits, dim, rotation_seed)
        self.vq = codebook == "vq4" and bits == 2 and dim % 4 == 0

    @classmethod
    def for_layer(cls, config, layer_idx: int, head_dim: int) -> "TurboValues":
        _, _, vseed = _seeds(config)
        return cls(rotation(head_dim, vseed), config.turbo_value_bits, head_dim, vseed, config.turbo_value_codebook)

    def to(self, device) -> "TurboValues":
        self._move(device)
        return self

    def shared_seeds(self) -> dict[str, int]:
        return {"value_rotation": self.rotation_seed}

    def set_shared(self, name: str, matrix: torch.Tensor) -> None:
        if name != "value_rotation":
            raise KeyError(name)
        self.rotation = matrix

    def encode(self, v: torch.Tensor) -> dict[str, torch.Tensor]:
        packed, norms, _ = self._encode(v.float())
        return {**dict(zip(_part_names("value_codes", self.parts), packed)), "value_norms": norms}

    def decode(self, state: dict[str, torch.Tensor]) -> torch.Tensor:
        """Dequantised values [B, H, T, D] float32: the reference for tests, never used by attention."""
        return self._decode([state[n] for n in _part_names("value_codes", self.parts)], state["value_norms"])

    def weighted_sum(self, w: torch.Tensor, state: dict[str, torch.Tensor]) -> torch.Tensor:
        """w: [B, H, Q, T] -> sum_t w_t v_t = (sum_t w_t ||v_t|| y_hat_t) R: [B, H, Q, D] float32."""
        w = w.float()
        B, H, Q, T = w.shape
        wn = w * state["value_norms"].float().unsqueeze(2)  # [B, H, Q, T]
        names = _part_names("value_codes", self.parts)
        out = torch.zeros(B, H, Q, self.dim, device=w.device)
        for start in range(0, T, _BLOCK):
            end = min(T, start + _BLOCK)
            y = self._unit([state[n][:, :, start:end] for n in names])  # [B, H, t, D]
            out += wn[..., start:end] @ y
        return out @ self.rotation

    def params(self) -> dict[str, torch.Tensor]:
        return {"value_rotation": self.rotation}
