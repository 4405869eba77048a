"""Optional int8 dynamic quantisation of the frozen LM for CPU inference.

Uses PyTorch's dynamic quantisation (int8 weights, activations quantised on the fly)
on the LM's original linear layers only; the trainable adapter stays in float. The
effect on output quality is measured by ``benchmarks/generate.py --int8``.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from .model import VLM


def quantize_lm_int8(model: VLM) -> VLM:
    """A copy of ``model`` whose frozen LM linears run in int8 (CPU only). The
    original model is left as it is."""
    names = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.startswith("lm.") and ".xattn." not in name
    ]
    if not names:
        raise ValueError("no LM linear layers found to quantise")
    from torch.ao.quantization import default_dynamic_qconfig, quantize_dynamic

    with warnings.catch_warnings():
        # torch.ao.quantization is deprecated in favour of torchao, which we don't depend on.
        warnings.simplefilter("ignore")
        quantized = quantize_dynamic(
            model, {name: default_dynamic_qconfig for name in names}, dtype=torch.qint8, inplace=False
        )
    return quantized
