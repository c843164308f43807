"""What both attention wrappers hand to C: tensors as data pointers kept alive for the call, and the threads."""

from __future__ import annotations

import torch


class Pointers:
    """p(t, dtype) -> t's data pointer (contiguous, converted to dtype when given; None for None). Every tensor
    handed out stays referenced by this object, so keep it alive until the C call returns."""

    def __init__(self) -> None:
        self.keep: list[torch.Tensor] = []

    def __call__(self, t: torch.Tensor | None, dtype: torch.dtype | None = None) -> int | None:
        if t is None:
            return None
        t = t.contiguous() if dtype is None else t.to(dtype).contiguous()
        self.keep.append(t)
        return t.data_ptr()


def threads() -> int:
    return max(1, torch.get_num_threads())
