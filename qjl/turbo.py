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

import numpy as np
import torch
import torch.nn.functional as F

from .sketch import byte_sign_table, jl_projection, jl_projection_on, pack_bits, sign_estimator_scale
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
class _Rotated:
    """What keys and values share: the rotation, the codebook, encode to (codes, norms), decode."""

    def __init__(self, rotation: torch.Tensor, bits: int, head_dim: int, rotation_seed: int):
        if bits not in TURBO_BITS:
            raise ValueError(f"turbo codes have 1 to 4 bits, not {bits}")
        if head_dim % 8 or head_dim < 8:
            raise ValueError(f"head_dim {head_dim} is not a multiple of 8")
        self.rotation = rotation  # R: [D, D] float32, y = x @ R.T
        self.bits = bits
        self.head_dim = head_dim
        self.rotation_seed = rotation_seed

    def _codebook(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        return _codebook_on(self.bits, self.head_dim, str(torch.device(device)))

    def _encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: [B, H, T, D] float32 -> (packed codes, fp16 norms, x_hat float32 as stored)."""
        R = self.rotation.to(x.device)
        norms = x.norm(dim=-1)
        safe = torch.where(norms > 0, norms, torch.ones_like(norms))
        y = (x / safe.unsqueeze(-1)) @ R.T
        centroids, bounds = self._codebook(x.device)
        codes = torch.bucketize(y, bounds)
        norms16 = norms.to(torch.float16)
        x_hat = (centroids[codes] @ R) * norms16.float().unsqueeze(-1)
        return pack(codes.to(torch.uint8), self.bits), norms16, x_hat

    def _decode(self, packed: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
        centroids, _ = self._codebook(packed.device)
        y = _centroid_values(packed, self.bits, centroids)
        return (y @ self.rotation.to(packed.device)) * norms.float().unsqueeze(-1)

    def _move(self, device) -> None:
        self.rotation = rotation_on(self.head_dim, self.rotation_seed, str(torch.device(device)))


def _seeds(config) -> tuple[int, int]:
    """(rotation seed, residual sketch seed): one of each per model (turbo has a single layer class)."""
    return config.seed * 1000 + 2, config.seed * 1000 + 3


class TurboKeys(_Rotated):
    """Keys of one layer: ||k|| fp16, b-bit Lloyd-Max codes of R k/||k||, optional QJL sketch of k - k_hat."""

    def __init__(self, rotation: torch.Tensor, bits: int, head_dim: int, rotation_seed: int = 0,
                 projection: torch.Tensor | None = None, projection_seed: int = 0):
        super().__init__(rotation, bits, head_dim, rotation_seed)
        self.projection = projection  # S: [m, D] float32 for the residual, or None
        self.seed = projection_seed
        self.scale = sign_estimator_scale(projection.shape[0], head_dim) if projection is not None else 0.0

    @classmethod
    def for_layer(cls, config, layer_idx: int, head_dim: int) -> "TurboKeys":
        rseed, pseed = _seeds(config)
        m = config.turbo_residual_dim(head_dim)
        proj = jl_projection(m, head_dim, pseed) if m else None
        return cls(rotation(head_dim, rseed), config.turbo_key_bits, head_dim, rseed, proj, pseed)

    def to(self, device) -> "TurboKeys":
        self._move(device)
        if self.projection is not None:
            m, d = self.projection.shape
            self.projection = jl_projection_on(m, d, self.seed, str(torch.device(device)))
        return self

    def shared_seeds(self) -> dict[str, int]:
        """Per-model matrices (stored once per seed in cache files): name -> seed."""
        out = {"rotation": self.rotation_seed}
        if self.projection is not None:
            out["projection"] = self.seed
        return out

    def encode(self, k: torch.Tensor, query_energy: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """k: [B, H, T, D] -> state (query_energy is accepted for the codec interface and unused)."""
        k = k.float()
        packed, norms, k_hat = self._encode(k)
        state = {"key_codes": packed, "key_norms": norms}
        if self.projection is not None:
            res = k - k_hat
            state["key_residual_signs"] = pack_bits((res @ self.projection.to(k.device).T) > 0)
            state["key_residual_norms"] = res.norm(dim=-1).to(torch.float16)
        return state

    def scores(self, q: torch.Tensor, state: dict[str, torch.Tensor]) -> torch.Tensor:
        """q: [B, H, Q, D] -> logits <q, k_hat> (+ the residual's QJL estimate): [B, H, Q, T] float32."""
        q = q.float()
        B, H, Q, D = q.shape
        qr = q @ self.rotation.T  # the query, rotated once
        centroids, _ = self._codebook(q.device)
        qc = qr.unsqueeze(-1) * centroids  # [B, H, Q, D, 2^b]
        packed = state["key_codes"]
        if self.bits == 3:
            dots = table_dots(qc, unpack(packed, 3))
        else:
            per = 8 // self.bits
            # table[..., i, byte] = sum_s qc[..., i*per + s, code s of byte]: one matmul with a 0/1 matrix
            table = qc.reshape(B, H, Q, D // per, -1) @ _byte_onehot(self.bits, str(q.device))
            dots = table_dots(table, packed)  # [B, H, Q, D/per, 256] summed by the packed bytes
        logits = dots * state["key_norms"].float().unsqueeze(2)
        if self.projection is not None:
            res = table_dots(byte_sign_table(q @ self.projection.T), state["key_residual_signs"])
            logits = logits + res * (self.scale * state["key_residual_norms"].float().unsqueeze(2))
        return logits

    def decode(self, state: dict[str, torch.Tensor]) -> torch.Tensor:
        """k_hat [B, H, T, D] float32 (without the residual, which is not invertible): the tests' reference."""
        return self._decode(state["key_codes"], state["key_norms"])

    def params(self) -> dict[str, torch.Tensor]:
        p = {"rotation": self.rotation}
        if self.projection is not None:
            p["projection"] = self.projection
        return p


class TurboValues(_Rotated):
    """Values of one layer: ||v|| fp16 and b-bit Lloyd-Max codes of R v/||v|| (R shared with the keys)."""

    @classmethod
    def for_layer(cls, config, layer_idx: int, head_dim: int) -> "TurboValues":
        rseed, _ = _seeds(config)
        return cls(rotation(head_dim, rseed), config.turbo_value_bits, head_dim, rseed)

    def to(self, device) -> "TurboValues":
        self._move(device)
        return self

    def encode(self, v: torch.Tensor) -> dict[str, torch.Tensor]:
        packed, norms, _ = self._encode(v.float())
        return {"value_codes": packed, "value_norms": norms}

    def decode(self, state: dict[str, torch.Tensor]) -> torch.Tensor:
        """Dequantised values [B, H, T, D] float32: the reference for tests, never used by attention."""
        return self._decode(state["value_codes"], state["value_norms"])

    def weighted_sum(self, w: torch.Tensor, state: dict[str, torch.Tensor]) -> torch.Tensor:
        """w: [B, H, Q, T] -> sum_t w_t v_t = (sum_t w_t ||v_t|| y_hat_t) R: [B, H, Q, D] float32."""
        w = w.float()
        B, H, Q, T = w.shape
        centroids, _ = self._codebook(w.device)
        wn = w * state["value_norms"].float().unsqueeze(2)  # [B, H, Q, T]
        out = torch.zeros(B, H, Q, self.head_dim, device=w.device)
        for start in range(0, T, _BLOCK):
            end = min(T, start + _BLOCK)
            y = _centroid_values(state["value_codes"][:, :, start:end], self.bits, centroids)  # [B, H, t, D]
            out += wn[..., start:end] @ y
        return out @ self.rotation

    def params(self) -> dict[str, torch.Tensor]:
        return {}  # the rotation is the keys' (same seed), stored with them
