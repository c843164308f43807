"""Speed and memory of one cache at one context: prefill, first token of a question, decode, peak memory."""

from __future__ import annotations

import ctypes
import gc
import re
import time
from typing import Callable

import torch

from ..cache import make_cache
from ..config import QJLConfig


def _devices(devices) -> list[torch.device]:
    return [torch.device(d) for d in (devices if isinstance(devices, (list, tuple)) else [devices])]


def sync(devices) -> None:
    """Wait for every GPU among `devices` (one device or a list: a model split over several)."""
    for d in _devices(devices):
        if d.type == "cuda":
            torch.cuda.synchronize(d)


# --- memory ------------------------------------------------------------------------------------------------
def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            m = re.search(rf"^{field}:\s+(\d+)\s+kB", f.read(), re.M)
        return int(m.group(1)) if m else None
    except OSError:
        return None


def _release_cpu_memory() -> None:
    gc.collect(0)  # the caches go by reference counting; a full collection of a big heap can take a second
    try:  # hand freed heap pages back to the OS, so the next row's RSS growth starts from what is really held
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak memory of a block above its start: allocated bytes on CUDA (summed over the GPUs of a split model);
    where no GPU is used, the resident set (RSS) from /proc/self/status after resetting its high-water mark
    (VmHWM) through /proc/self/clear_refs."""

    def __init__(self, devices):
        self.gpus = [d for d in _devices(devices) if d.type == "cuda"]
        n = len(self.gpus)
        self.kind = ("peak RSS growth" if not n else "cuda peak allocated" if n == 1
                     else f"cuda peak allocated, summed over {n} GPUs")
        self.start = 0

    def __enter__(self):
        if self.gpus:
            sync(self.gpus)
            torch.cuda.empty_cache()
            for d in self.gpus:
                torch.cuda.reset_peak_memory_stats(d)
            self.start = sum(torch.cuda.memory_allocated(d) for d in self.gpus)
        else:
            _release_cpu_memory()
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
            except OSError:
                pass
            self.start = (_status_kib("VmRSS") or 0) * 1024
        return self

    def __exit__(self, *exc) -> None:
        pass

    def peak(self) -> int | None:
        if self.gpus:
            return sum(torch.cuda.max_memory_allocated(d) for d in self.gpus) - self.start
        hwm = _status_kib("VmHWM")
        return None if hwm is None else max(0, hwm * 1024 - self.start)


# --- one measurement ---------------------------------------------------------------------------------------
@torch.inference_mode()
def measure_once(model, make: Callable[[], object], ids: torch.Tensor, question: torch.Tensor, steps: int,
                 chunk: int | None = None, on_tokens: Callable[[int], None] | None = None, devices=None) -> dict:
    """Prefill ids [1, T] (`chunk` at a time) into make()'s cache, freeze it as the document, then time a
    question's prefill up to its first token and `steps` greedy decode steps after one untimed step.

    devices: what to synchronise and whose peak memory to sum (a split model's GPUs); default ids' device.
    The cache's own accounting gives bits per number and bytes. Returns plain numbers (seconds, bytes)."""
    device = devices or ids.device
    context = ids.shape[1]
    chunk = chunk or context
    with PeakMemory(device) as mem:
        cache = make()
        sync(device)
        t0 = time.perf_counter()
        for start in range(0, context, chunk):
            model(input_ids=ids[:, start:start + chunk], past_key_values=cache, use_cache=True, logits_to_keep=1)
            if on_tokens:
                on_tokens(min(chunk, context - start))
        sync(device)
        prefill_s = time.perf_counter() - t0
        cache.freeze_document()
        out = {"document_tokens": cache.document_tokens, "kv_bytes": cache.document_nbytes(),
               "fp16_bytes": cache.fp16_nbytes(), "bits_per_number": cache.bits_per_number()}
        t0 = time.perf_counter()
        logits = model(input_ids=question, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
        token = logits[:, -1:].argmax(-1)
        sync(device)
        first_token_s = time.perf_counter() - t0
        logits = model(input_ids=token, past_key_values=cache, use_cache=True, logits_to_keep=1).logits  # untimed
        token = logits[:, -1:].argmax(-1)
        sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            logits = model(input_ids=token, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
            token = logits[:, -1:].argmax(-1)
        sync(device)
        decode_s = time.perf_counter() - t0
        peak = mem.peak()
    del cache, logits
    out.update(prefill_s=prefill_s, prefill_tokens_per_s=context / prefill_s, first_token_s=first_token_s,
               decode_ms_per_token=1000 * decode_s / steps if steps else float("nan"), peak_memory_bytes=peak)
    return out


def decode_speed(model, context: int, config: QJLConfig, steps: int = 32, vocab_limit: int = 1000,
                 seed: int = 0, prefill_chunk: int | None = None) -> dict:
    """Prefill `context` random tokens (`prefill_chunk` at a time), then time `steps` greedy decode steps
    (measure_once with a one-token question)."""
    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    ids = torch.randint(100, vocab_limit, (1, context), generator=gen).to(device)
    res = measure_once(model, lambda: make_cache(model.config, config), ids, ids[:, -1:], steps, prefill_chunk)
    out = {"kv": config.kv, "context": context, "decode_ms_per_token": res["decode_ms_per_token"],
           "prefill_s": res["prefill_s"], "prefill_tokens_per_s": res["prefill_tokens_per_s"]}
    if device.type == "cuda":
        out["peak_gib"] = res["peak_memory_bytes"] / 2**30
    return out
