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
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype)  # built in its dtype: an 8B model never exists in float32
        with torch.device(device):
            model = LlamaForCausalLM(cfg).eval()  # initialised on the device: seconds, not minutes
    finally:
        torch.set_default_dtype(default)
        hf_logging.set_verbosity(verbosity)
    model.set_attn_implementation(attention.ATTN_IMPLEMENTATION)
    return model, f"{name} (random weights)"
