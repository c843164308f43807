"""QJL key codec: 1-bit JL sketch of each key, its norm, and a few exact outlier channels.

Pure torch; this is the specification the CUDA kernels are tested against.

A key codec turns keys into a *state* (a dict of tensors, each laid out
[B, H, N, ...] where N counts tokens or token groups, so states of
consecutive chunks concatenate along dim 2) and scores queries against it.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .values import QuantValues, unpack_codes_float
from .sketch import byte_sign_table, jl_projection, jl_projection_on, pack_bits, sign_estimator_scale



def sign_dots(table: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """<Sq, sign(Sk)> for every query and key from per-byte tables.

    table: [B, H, Q, m/8, 256] (byte_sign_table of the projected queries); signs: [B, H, T, m/8] uint8
    -> [B, H, Q, T]. Each key is a bag of m/8 rows of a [m/8*256, Q] table summed by embedding_bag,
    which reads the packed bytes directly (10x faster on a CPU than gather over an expanded index).
    """
    B, H, Q, nbytes, _ = table.shape
    T = signs.shape[2]
    offsets = _bag_offsets(B * H, nbytes, str(signs.device))  # [B*H, 1, m/8]: row of (head, byte) in the table
    bags = (signs.reshape(B * H, T, nbytes).to(torch.int32) + offsets).reshape(B * H * T, nbytes)
    weight = table.permute(0, 1, 3, 4, 2).reshape(B * H * nbytes * 256, Q)
    return F.embedding_bag(bags, weight, mode="sum").view(B, H, T, Q).transpose(2, 3)


@functools.lru_cache(maxsize=64)
def _bag_offsets(heads: int, nbytes: int, device: str) -> torch.Tensor:
    rows = torch.arange(heads).view(heads, 1) * (nbytes * 256) + torch.arange(nbytes) * 256
    return rows.to(torch.int32).unsqueeze(1).to(device)


class OutlierChannels:
    """r channels of each KV head kept apart from a key codec, chosen once per head; shared by QJLKeys and TurboKeys.

    Channel j is picked by mean k_j^2, times mean q_j^2 of the queries when they are known (the variance the
    channel would add to an estimate of <q, k>). bits 16 keeps the values in fp16; 4 or 8 quantise each
    channel over a group of tokens with an fp16 scale and minimum (channels are smooth along time: KIVI's key
    axis). State names start with "key_outlier_".
    """

    def __init__(self, r: int, group_size: int, bits: int):
        self.r, self.group_size, self.bits = r, group_size, bits
        self.codec = QuantValues(bits, group_size, group_size) if bits < 16 else None

    def choose(self, k: torch.Tensor, query_energy: torch.Tensor | None) -> torch.Tensor:
        """k: [B, H, T, D] float32, query_energy: [B, H, D] or None -> channels [B, H, r], sorted."""
        energy = k.pow(2).mean(dim=2)
        if query_energy is not None:
            energy = energy * query_energy.to(energy.device)
        return energy.topk(self.r, dim=-1).indices.sort(dim=-1).values

    def encode(self, out: torch.Tensor) -> dict[str, torch.Tensor]:
        """out: [B, H, T, r] float32, the chosen channels of T keys (T a multiple of group_size)."""
        if self.codec is None:
            return {"key_outlier_values": out.to(torch.float16)}
        B, H, T, r = out.shape
        G = self.group_size
        rows = out.view(B, H, T // G, G, r).transpose(3, 4).reshape(B, H, -1, G)  # group-major [B, H, NG*r, G]
        return {"key_outlier_" + n: t for n, t in self.codec.encode(rows).items()}

    def scores(self, q_sel: torch.Tensor, state: dict[str, torch.Tensor]) -> torch.Tensor:
        """q_sel: [B, H, Q, r], the query's values in the chosen channels -> [B, H, Q, T] float32."""
        if self.codec is None:
            return q_sel @ state["key_outlier_values"].float().transpose(2, 3)
        # Codes stay in their [group, channel, token] rows: sum_j q_j (s_gj c_gjt + z_gj).
        B, H, Q, r = q_sel.shape
        G = self.group_size
        codes = unpack_codes_float(state["key_outlier_value_codes"], self.bits)  # [B, H, NG*r, G]
        NG = codes.shape[2] // r
        scales = state["key_outlier_value_scales"].float().view(B, H, 1, NG, r)
        mins = state["key_outlier_value_mins"].float().view(B, H, 1, NG, r)
        qs = q_sel.unsqueeze(3)  # [B, H, Q, 1, r]
        dots = torch.einsum("bhqnr,bhnrg->bhqng", qs * scales, codes.view(B, H, NG, r, G))
        return (dots + (qs * mins).sum(-1, keepdim=True)).reshape(B, H, Q, NG * G)

    def decode(self, state: dict[str, torch.Tensor]) -> torch.Tensor:
        """The chosen channels' values [B, H, T, r] float32 (r of D channels, so small)."""
        if self.codec is None:
            return state["key_outlier_values"].float()
        sub = {n[len("key_outlier_"):]: t for n, t in state.items() if n.startswith("key_outlier_")}
        rows = self.codec.decode(sub)  # [B, H, NG*r, G]
        B, H, _, G = rows.shape
        return rows.view(B, H, -1, self.r, G).transpose(3, 4).reshape(B, H, -1, self.r)


class QJLKeys:
    """Keys of one layer: sign(S k_in) packed, ||k_in|| fp16, outlier channels of k exactly.

    k = mean + k_in + k_out, where mean is the head's mean key (optional, exact,
    fixed at the first encode), k_out holds the `outliers` channels of largest
    norm over each group of `group_size` tokens (fp16 values + uint8 indices),
    and k_in is the rest, sketched. Scores add the three parts:
    <q,k> = <q,mean> + <q,k_out> + c*||k_in||*<Sq, sign(S k_in)>.
    """

    def __init__(self, projection: torch.Tensor, head_dim: int, outliers: int, group_size: int,
                 center: bool, seed: int = 0, outlier_scope: str = "group", outlier_bits: int = 16):
        self.projection = projection  # S: [m, D] float32
        self.seed = seed
        self.outlier_scope = outlier_scope
        self.outlier_bits = outlier_bits
        self.channels = OutlierChannels(outliers, group_size, outlier_bits)  # scope "head"
        self.head_outliers: torch.Tensor | None = None  # [B, H, r] channels, scope "head": fixed at first encode
        self.head_dim = head_dim
        self.outliers = outliers
        self.group_size = group_size
        self.center = center
        self.sketch_dim = projection.shape[0]
        self.scale = sign_estimator_scale(self.sketch_dim, head_dim)
        self.mean: torch.Tensor | None = None  # [B, H, D] float32, set by the first encode

    @classmethod
    def for_layer(cls, config, layer_idx: int, head_dim: int) -> "QJLKeys":
        m = config.sketch_dim(layer_idx, head_dim)
        # One seed per layer class (early / late), as the paper: layers of a class share S.
        seed = config.seed * 1000 + (0 if layer_idx < config.early_layers else 1)
        return cls(jl_projection(m, head_dim, seed), head_dim, config.outliers(head_dim),
                   config.group_size, config.center_keys, seed, config.outlier_scope, config.outlier_bits)

    def to(self, device) -> "QJLKeys":
        """Move the per-layer parameters; layers of a class keep sharing one projection."""
        m, d = self.projection.shape
        self.projection = jl_projection_on(m, d, self.seed, str(torch.device(device)))
        if self.mean is not None:
            self.mean = self.mean.to(device)
        if self.head_outliers is not None:
            self.head_outliers = self.head_outliers.to(device)
        return self

    # --- encode -------------------------------------------------------------------------
    def encode(self, k: torch.Tensor, query_energy: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """k: [B, H, T, D] with T a multiple of group_size -> state.

        query_energy: [B, H, D] mean q_j^2 of the queries that attended these keys (folded over the query
        heads of each KV head); with per-head outliers, the first encode picks channels by q_j^2 k_j^2.
        """
        B, H, T, D = k.shape
        G = self.group_size
        if T % G:
            raise ValueError(f"encode takes whole groups of {G} tokens, got {T}")
        k = k.float()
        if self.center:
            if self.mean is None:
                self.mean = k.mean(dim=2)
            k = k - self.mean.unsqueeze(2)
        state: dict[str, torch.Tensor] = {}
        r = self.outliers
        if r and self.outlier_scope == "head":
            if self.head_outliers is None:
                self.head_outliers = self.channels.choose(k, query_energy)  # [B, H, r]
            hidx = self.head_outliers.unsqueeze(2).expand(B, H, T, r)
            state.update(self.channels.encode(k.gather(3, hidx)))
            k = k.scatter(3, hidx, 0.0)
        elif r:
            kg = k.view(B, H, T // G, G, D)
            idx = kg.norm(dim=3).topk(r, dim=-1).indices.sort(dim=-1).values  # [B, H, NG, r]
            gidx = idx.unsqueeze(3).expand(B, H, T // G, G, r)
            state["key_outlier_values"] = kg.gather(4, gidx).reshape(B, H, T, r).to(torch.float16)
            state["key_outlier_index"] = idx.to(torch.uint8 if D <= 256 else torch.int16)
            k = kg.scatter(4, gidx, 0.0).view(B, H, T, D)
        proj = k @ self.projection.T  # [B, H, T, m]
        state["key_signs"] = pack_bits(proj > 0)
        state["key_norms"] = k.norm(dim=-1).to(torch.float16)
        return state

    # --- score --------------------------------------------------------------------------
    def scores(self, q: torch.Tensor, state: dict[str, torch.Tensor]) -> torch.Tensor:
        """q: [B, H, Q, D] (query heads of a KV head folded into Q) -> logits <q,k>: [B, H, Q, T], float32."""
        q = q.float()
        B, H, Q, D = q.shape
        signs = state["key_signs"]  # [B, H, T, m/8]
        q_sketch = q
        if self.head_outliers is not None:  # the outlier channels are exact: keep them out of the estimator's noise
            q_sketch = q.scatter(3, self.head_outliers.unsqueeze(2).expand(B, H, Q, -1), 0.0)
        proj = q_sketch @ self.projection.T  # [B, H, Q, m]
        dots = sign_dots(byte_sign_table(proj), signs)  # <Sq, sign(S k_in)>
        logits = dots * (self.scale * state["key_norms"].float().unsqueeze(2))
        if self.outliers:
            logits = logits + self._outlier_scores(q, state)
        if self.mean is not None:
            logits = logits + q @ self.mean.unsqueeze(-1)  # [B, H, Q, 1]
        return logits

    def _outlier_scores(self, q: torch.Tensor, state: dict[str, torch.Tensor]) -> torch.Tensor:
        B, H, Q, D = q.shape
        if self.head_outliers is not None:
            q_sel = q.gather(3, self.head_outliers.unsqueeze(2).expand(B, H, Q, -1))  # [B, H, Q, r]
            return self.channels.scores(q_sel, state)
        idx = state["key_outlier_index"].long()  # [B, H, NG, r]
        NG, r = idx.shape[2], idx.shape[3]
        vals = state["key_outlier_values"].float().view(B, H, NG, -1, r)  # [B, H, NG, G, r]
        q_sel = q.gather(3, idx.view(B, H, 1, NG * r).expand(B, H, Q, NG * r)).view(B, H, Q, NG, r)
        return torch.einsum("bhqnr,bhngr->bhqng", q_sel, vals).reshape(B, H, Q, -1)

    # --- reference and accounting -------------------------------------------------------
    def decode_approx(self, state: dict[str, torch.Tensor]) -> torch.Tensor:
        """A dense stand-in for the keys, for tests only: mean + outliers; the sketched part is not invertible."""
        B, H, T, _ = state["key_signs"].shape
        k = torch.zeros(B, H, T, self.head_dim)
        if self.mean is not None:
            k = k + self.mean.unsqueeze(2).cpu()
        if self.head_outliers is not None:
            idx = self.head_outliers.cpu().unsqueeze(2).expand(B, H, T, -1)
            k.scatter_add_(3, idx, self.channels.decode(state).cpu())
        elif self.outliers:
            idx = state["key_outlier_index"].long().cpu()
            NG, r = idx.shape[2], idx.shape[3]
            vals = state["key_outlier_values"].float().cpu().view(B, H, NG, -1, r)
            kg = k.view(B, H, NG, -1, self.head_dim)
            kg.scatter_add_(4, idx.unsqueeze(3).expand_as(vals), vals)
        return k

    def shared_seeds(self) -> dict[str, int]:
        """{name: seed} of the matrices this codec shares with the other layers of its class."""
        return {"projection": self.seed}

    def set_shared(self, name: str, matrix: torch.Tensor) -> None:
        if name != "projection":
            raise KeyError(name)
        self.projection = matrix

    def set_params(self, params: dict[str, torch.Tensor]) -> None:
        """Restore what params() returned (from a cache file); shared matrices are set by the caller."""
        self.mean = params.get("key_mean")
        self.head_outliers = params.get("key_head_outliers")

    def params(self) -> dict[str, torch.Tensor]:
        """Per-layer tensors that are not per token: counted once and stored in cache files."""
        p = {"projection": self.projection}
        if self.mean is not None:
            p["key_mean"] = self.mean
        if self.head_outliers is not None:
            p["key_head_outliers"] = self.head_outliers
        return p
