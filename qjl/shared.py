"""Per-model matrices (JL projections, rotations): drawn from a seed, shared by the layers of a class, stored
once per seed in cache files. A codec names its own with shared_seeds(); a cache file gives them back here."""

from __future__ import annotations

from torch import Tensor


class SharedMatrices:
    """Codec mixin: params() and set_shared() for tensors held as attributes. SHARED_ATTRS maps a shared
    matrix's name (its cache-file name without the seed) to its attribute; PARAM_ATTRS does the same for the
    per-layer parameters (fixed by the first encode; None until then)."""

    SHARED_ATTRS: dict[str, str] = {}
    PARAM_ATTRS: dict[str, str] = {}
    # Tensors of channel numbers (0..head_dim-1), by name; True: each row strictly ascending. A cache file's
    # are checked before use, since a forged one could aim a gather outside a head.
    CHANNEL_INDICES: dict[str, bool] = {}

    def params(self) -> dict[str, Tensor]:
        """Per-layer tensors that are not per token, shared matrices included (by their shared name)."""
        out = {name: getattr(self, self.SHARED_ATTRS[name]) for name in self.shared_seeds()}
        own = {name: getattr(self, attr) for name, attr in self.PARAM_ATTRS.items()}
        return out | {name: t for name, t in own.items() if t is not None}

    def shared_seeds(self) -> dict[str, int]:
        return {}

    def set_shared(self, name: str, matrix: Tensor) -> None:
        """Use this matrix (from a cache file) instead of the one drawn from the seed."""
        if name not in self.shared_seeds():
            raise KeyError(name)
        setattr(self, self.SHARED_ATTRS[name], matrix)
