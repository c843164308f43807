"""Random-weight Llamas of real geometries (spec.SHAPES): speed and memory at big shapes without a download."""

from __future__ import annotations

import torch

from .spec import check_shape


def synthetic_model(name: str, device: str | torch.device, dtype: torch.dtype, seed: int = 0):
    """(model, display name): a LlamaForCausalLM of the shape, initialised on the device, attention "qjl"."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    from .. import attention

    shape = check_shape(name)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        cfg = LlamaConfig(**shape.config_kwargs())
        torch.manual_seed(seed)
        with torch.device(device):
            model = LlamaForCausalLM(cfg).to(dtype).eval()  # initialised on the device: seconds, not minutes
    finally:
        hf_logging.set_verbosity(verbosity)
    model.set_attn_implementation(attention.ATTN_IMPLEMENTATION)
    return model, f"{name} (random weights)"
