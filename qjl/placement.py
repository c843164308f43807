"""Where a model's layers go: `--device`, `--device-map`, `--max-memory` (QJL_DEVICE_MAP, QJL_MAX_MEMORY).

accelerate places the layers (transformers' `from_pretrained(device_map=..., max_memory=...)` for a model read
from files, accelerate's `infer_auto_device_map` / `get_balanced_memory` / `dispatch_model` for one built in
memory: `dispatch`); this module only parses and checks the options, reads back where each decoder layer went
(`layer_devices`: the device its weights live on, a CPU-offloaded layer's is the CPU) and estimates whether a
model and a document's compressed cache can fit the memory named (`check_fit`), before any weight is read.

Parsing is torch-free (options are checked before anything slow); the rest imports torch when called.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .errors import ConfigError, ModelError

if TYPE_CHECKING:
    import torch

DEVICE_MAPS = ("auto", "balanced", "sequential")
ENV_DEVICE_MAP, ENV_MAX_MEMORY = "QJL_DEVICE_MAP", "QJL_MAX_MEMORY"
_UNITS = {"": 1, "B": 1, "K": 2**10, "KIB": 2**10, "KB": 10**3, "M": 2**20, "MIB": 2**20, "MB": 10**6,
          "G": 2**30, "GIB": 2**30, "GB": 10**9, "T": 2**40, "TIB": 2**40, "TB": 10**12}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")
_DEVICE = re.compile(r"^(cpu|cuda|cuda:\d+)$")
# Bits a number a compressed cache holds (measured 2.98-3.1 with everything counted, README "Quality and bits").
COMPRESSED_BITS = 3.1


@dataclass(frozen=True)
class Placement:
    """How to place a model. device: one device ("cpu", "cuda", "cuda:N"); device_map: accelerate's strategy
    (auto|balanced|sequential) over max_memory ({GPU index or "cpu": bytes}; None: what accelerate finds)."""

    device: str | None = None
    device_map: str | None = None
    max_memory: dict = field(default=None, hash=False)

    @property
    def split(self) -> bool:
        return self.device_map is not None

    def describe_memory(self) -> str:
        return ", ".join(f"{k}={human(v)}" for k, v in (self.max_memory or {}).items())


def human(n: float) -> str:
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def parse_size(text: str, what: str = "--max-memory") -> int:
    """'20GiB', '512MB', '1.5G', '1000' (bytes) -> bytes; powers of 1024 for K/M/G/T and KiB.., of 1000 for KB.."""
    m = _SIZE.match(text)
    unit = m.group(2).upper() if m else ""
    if not m or unit not in _UNITS:
        raise ConfigError(f"{what}: {text.strip()!r} is not a size; give e.g. 20GiB, 512MiB or 64GB")
    return int(float(m.group(1)) * _UNITS[unit])


def parse_max_memory(text: str) -> dict:
    """'0=20GiB,1=20GiB,cpu=64GiB' -> {0: bytes, 1: bytes, "cpu": bytes}: accelerate's max_memory."""
    out: dict = {}
    for item in (p.strip() for p in text.split(",")):
        key, sep, size = item.partition("=")
        key = key.strip().lower()
        if not sep or not key:
            raise ConfigError(f"--max-memory: {item!r} is not DEVICE=SIZE; give e.g. 0=20GiB,1=20GiB,cpu=64GiB "
                              f"(GPU numbers and cpu)")
        if key.isdigit():
            key = int(key)
        elif key.startswith("cuda:") and key[5:].isdigit():
            key = int(key[5:])
        elif key != "cpu":
            raise ConfigError(f"--max-memory: unknown device {key!r} in {item!r}; name GPUs by number (0, 1, ...) "
                              f"and the CPU as cpu (offloading to disk is not supported)")
        if key in out:
            raise ConfigError(f"--max-memory names device {key} twice")
        out[key] = parse_size(size, f"--max-memory {key}")
        if out[key] <= 0:
            raise ConfigError(f"--max-memory: device {key} gets no memory; give it a size above 0 or leave it out")
    return out


def make_placement(device: str | None = None, device_map: str | None = None,
                   max_memory: str | None = None) -> Placement:
    """The options (else QJL_DEVICE_MAP, QJL_MAX_MEMORY) as a checked Placement; a ConfigError names what is wrong."""
    device_map = device_map or os.environ.get(ENV_DEVICE_MAP) or None
    max_memory = max_memory or os.environ.get(ENV_MAX_MEMORY) or None
    if device_map is not None:
        device_map = device_map.strip().lower()
        if device_map not in DEVICE_MAPS:
            raise ConfigError(f"--device-map (or {ENV_DEVICE_MAP}) must be one of {', '.join(DEVICE_MAPS)}, "
                              f"not {device_map!r}")
    memory = parse_max_memory(max_memory) if max_memory is not None else None
    if memory is not None and device_map is None:
        device_map = "auto"  # a memory budget only means something to accelerate's placement
    if device is not None:
        device = device.strip().lower()
        if not _DEVICE.match(device):
            raise ConfigError(f"--device must be cpu, cuda or cuda:N, not {device!r}")
        if device_map is not None:
            raise ConfigError("give either --device (one device) or --device-map/--max-memory (layers placed by "
                              "accelerate), not both")
    placement = Placement(device, device_map, memory)
    if (device or "").startswith("cuda") or any(isinstance(k, int) for k in memory or {}):
        check_devices(placement)  # imports torch: only when a GPU is named
    return placement


# --- with torch: the devices, and where the layers went ----------------------------------------------------------
def check_devices(placement: Placement) -> None:
    """Every GPU named exists (a ConfigError names the one that does not and those there are)."""
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    wanted = []
    if placement.device and placement.device.startswith("cuda"):
        wanted.append(("--device", placement.device, int(placement.device[5:] or 0)))
    wanted += [("--max-memory", f"GPU {k}", k) for k in (placement.max_memory or {}) if isinstance(k, int)]
    for option, name, index in wanted:
        if index >= count:
            have = f"GPUs 0-{count - 1}" if count > 1 else ("GPU 0" if count else "no CUDA GPU")
            raise ConfigError(f"{option}: {name} does not exist (this machine has {have}); name one that does, or "
                              f"use cpu")


def uses_gpu(placement: Placement) -> bool:
    """Whether the layers (some of them) go to a GPU: the model's dtype is then bfloat16, else float32."""
    import torch

    if placement.device is not None:
        return placement.device.startswith("cuda")
    if not torch.cuda.is_available():
        return False
    return placement.max_memory is None or any(isinstance(k, int) for k in placement.max_memory)


def from_pretrained_kwargs(placement: Placement) -> dict:
    """transformers' device_map / max_memory for from_pretrained (empty for one device: the model is moved)."""
    if not placement.split:
        return {}
    kwargs: dict = {"device_map": placement.device_map}
    if placement.max_memory is not None:
        kwargs["max_memory"] = dict(placement.max_memory)
    return kwargs


def _as_device(where) -> "torch.device":
    import torch

    if isinstance(where, int):
        return torch.device("cuda", where)
    if str(where) == "disk":  # weights on disk: their layer computes elsewhere, its cache stays on the CPU
        return torch.device("cpu")
    return torch.device(where)


def layer_devices(model) -> list["torch.device"]:
    """The device each decoder layer's weights live on, from accelerate's `hf_device_map` (a CPU-offloaded layer:
    the CPU, though accelerate may run it on a GPU); without one, the device of the model's parameters."""
    inner = getattr(model, "model", model)
    layers = list(getattr(inner, "layers", []))
    device_map = getattr(model, "hf_device_map", None)
    if not device_map:
        return [_module_device(layer) for layer in layers]
    names = {id(layer): name for name, layer in model.named_modules() if any(layer is m for m in layers)}
    return [_as_device(_lookup(device_map, names[id(layer)])) for layer in layers]


def _lookup(device_map: dict, name: str):
    """The device_map entry of module `name`: its own, else its nearest ancestor's (accelerate's rule)."""
    parts = name.split(".")
    for n in range(len(parts), -1, -1):
        key = ".".join(parts[:n])
        if key in device_map:
            return device_map[key]
    raise ModelError(f"accelerate's device map places no device for {name}")


def _module_device(module) -> "torch.device":
    import torch

    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def input_device(model) -> "torch.device":
    """Where the token ids go: the embedding's device (accelerate's hooks move them on from there)."""
    embed = model.get_input_embeddings()
    device_map = getattr(model, "hf_device_map", None)
    if device_map:
        name = next(n for n, m in model.named_modules() if m is embed)
        return _as_device(_lookup(device_map, name))
    return _module_device(embed)


def layer_counts(devices) -> dict[str, int]:
    """{device: decoder layers on it}, in the order of the layers: what /info and --json report."""
    out: dict[str, int] = {}
    for d in devices:
        out[str(d)] = out.get(str(d), 0) + 1
    return out


def dispatch(model, placement: Placement):
    """Place a model built in memory (random weights) with accelerate's own planner: balanced memory (unless
    sequential), infer_auto_device_map over the model's no-split blocks, dispatch_model. Returns the model."""
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    if not placement.split:
        return model.to(placement.device or "cpu")
    no_split = sorted(getattr(model, "_no_split_modules", None) or [])
    memory = placement.max_memory
    if placement.device_map != "sequential":
        memory = get_balanced_memory(model, max_memory=memory, no_split_module_classes=no_split)
    device_map = infer_auto_device_map(model, max_memory=memory, no_split_module_classes=no_split)
    if "disk" in device_map.values():
        raise ModelError(f"the model does not fit the memory named ({placement.describe_memory()}) even with CPU "
                         f"offload; name more memory")
    return dispatch_model(model, device_map=device_map)  # sets model.hf_device_map


# --- will it fit? ------------------------------------------------------------------------------------------------
def estimate_bytes(config, dtype: "torch.dtype", tokens: int, kv: str) -> tuple[int, int]:
    """(weights, cache) in bytes: the weights' size by accelerate's compute_module_sizes on an empty (meta) model
    of `config`; the cache of `tokens` document tokens at COMPRESSED_BITS a number (the model's dtype for exact)."""
    from accelerate import init_empty_weights
    from accelerate.utils import compute_module_sizes
    from transformers import AutoModelForCausalLM

    from .exact import kv_geometry

    with init_empty_weights():
        empty = AutoModelForCausalLM.from_config(config)
    weights = int(compute_module_sizes(empty, dtype=dtype)[""])
    layers, kv_heads, head_dim = kv_geometry(config)
    numbers = 2 * tokens * layers * kv_heads * head_dim
    bits = dtype.itemsize * 8 if kv == "exact" else COMPRESSED_BITS
    return weights, int(numbers * bits / 8)


def check_fit(config, dtype: "torch.dtype", tokens: int, kv: str, placement: Placement, name: str) -> None:
    """Before any weight is read: the weights and the document's cache fit the memory --max-memory names, else a
    ModelError with the estimate. Without --max-memory there is nothing named to check against."""
    if not placement.max_memory:
        return
    weights, cache = estimate_bytes(config, dtype, tokens, kv)
    total = sum(placement.max_memory.values())
    if weights + cache > total:
        raise ModelError(f"{name} does not fit even with offload: it needs about {human(weights + cache)} (weights "
                         f"{human(weights)} in {str(dtype).removeprefix('torch.')} + the {kv} cache of {tokens:,} "
                         f"tokens {human(cache)}) but --max-memory names {human(total)} "
                         f"({placement.describe_memory()}); name more memory or use a smaller model")
