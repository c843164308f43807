"""Where `qjl bench` measures: one device (--device), or a model whose layers accelerate places over GPUs and
the CPU (--device-map, --max-memory; qjl.placement parses them as for `qjl ask`).

Under a device map the token ids go to the embedding's device, each cache layer lives on its decoder layer's
device, every GPU is synchronised before a clock is read, and peak memory is the sum over the GPUs of each one's
peak allocated bytes (the CPU's RSS growth when no GPU computes)."""

from __future__ import annotations

import torch

from ..placement import Placement, uses_gpu
from .spec import available_bytes


def placement_of(settings) -> Placement:
    """The settings' --device / --device-map / --max-memory as a Placement (already checked by make_placement)."""
    return Placement(settings.device, settings.device_map, settings.max_memory)


def resolve_device_dtype(settings) -> tuple[torch.device, torch.dtype]:
    """(the device the token ids start on, the model's dtype): float32 where only the CPU computes, bfloat16
    where a GPU does, unless --dtype says. Under a device map the device is the first GPU named (or cpu); the
    loaded model's embedding device replaces it (Target.device)."""
    placement = placement_of(settings)
    if placement.split:
        gpu = uses_gpu(placement)
        gpus = sorted(k for k in placement.max_memory or {} if isinstance(k, int))
        device = torch.device("cuda", gpus[0] if gpus else 0) if gpu else torch.device("cpu")
    else:
        device = torch.device(settings.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        gpu = device.type == "cuda"
    dtype = getattr(torch, settings.dtype) if settings.dtype else (torch.bfloat16 if gpu else torch.float32)
    return device, dtype


def memory_named(settings) -> tuple[int | None, str]:
    """(bytes a run may use, what they are) for the check before loading: what --max-memory names; under a
    device map without it, every GPU's free memory plus the CPU's available; else the one device's free."""
    placement = placement_of(settings)
    if placement.max_memory:
        return sum(placement.max_memory.values()), f"--max-memory ({placement.describe_memory()})"
    device, _ = resolve_device_dtype(settings)
    if placement.split:
        gpus = range(torch.cuda.device_count()) if torch.cuda.is_available() else range(0)
        free = sum(torch.cuda.mem_get_info(i)[0] for i in gpus) + (available_bytes() or 0)
        return free, f"{len(gpus)} GPU(s) and the CPU"
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0], torch.cuda.get_device_name(device)
    return available_bytes(), "this machine"


def gpus_used(devices) -> list[torch.device]:
    """The distinct CUDA devices among `devices`, in order."""
    out: list[torch.device] = []
    for d in devices:
        d = torch.device(d)
        if d.type == "cuda":
            d = torch.device("cuda", d.index if d.index is not None else torch.cuda.current_device())
            if d not in out:
                out.append(d)
    return out


def describe_layers(counts: dict[str, int]) -> str:
    """'cuda:0 16, cpu 16': decoder layers per device, for the machine line."""
    return ", ".join(f"{d} {n}" for d, n in counts.items())

