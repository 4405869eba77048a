"""Optional int8 dynamic quantisation of the frozen LM for CPU inference.

PyTorch's dynamic quantisation stores weights as int8 (one scale per output channel)
and quantises each layer's input on the fly with one scale per tensor. Inputs with
strong outliers (in SmolLM2, the MLP's ``down_proj`` after the gated activation)
lose too much that way, so each LM linear layer is first tried on calibration text
and kept in float when its int8 output differs by more than ``max_error`` (relative
L2). The trainable adapter always stays in float. ``benchmarks/generate.py --int8``
measures the effect on speed, greedy outputs and perplexity.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from .model import VLM

CALIBRATION_TEXT = (
    "A small boat drifted past the old harbour while gulls circled above the fish market. "
    "Inside the library, students compared notes on algebra, chemistry and the history of trade routes. "
    "Question: What colour is the sky on a clear day? Answer: Blue. "
    "def add(a, b):\n    return a + b\n"
    "The recipe asks for two eggs, a cup of flour and a pinch of salt, mixed until smooth."
)


def _int8_errors(model: VLM, names: list[str], input_ids: torch.Tensor) -> dict[str, float]:
    from torch.ao.nn.quantized.dynamic import Linear as Int8Linear
    from torch.ao.quantization import per_channel_dynamic_qconfig

    modules = dict(model.named_modules())
    inputs: dict[str, torch.Tensor] = {}

    def keep_input(name):
        def hook(module, args, output):
            inputs.setdefault(name, args[0].detach())

        return hook

    hooks = [modules[n].register_forward_hook(keep_input(n)) for n in names]
    try:
        with torch.no_grad():
            model(None, input_ids)
    finally:
        for h in hooks:
            h.remove()
    errors = {}
    for name in names:
        linear = modules[name]
        linear.qconfig = per_channel_dynamic_qconfig
        try:
            int8 = Int8Linear.from_float(linear)
        finally:
            del linear.qconfig
        x = inputs[name].float()
        with torch.no_grad():
            ref = linear(x)
            errors[name] = float((int8(x) - ref).norm() / ref.norm().clamp(min=1e-12))
    return errors


def quantize_lm_int8(model: VLM, tokenizer=None, max_error: float = 0.07) -> VLM:
    """A copy of ``model`` whose frozen LM linears run in int8 where that is accurate
    enough (CPU only). Without a tokenizer every LM linear is quantised, untested.
    The original model is left as it is."""
    names = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.startswith("lm.") and ".xattn." not in name
    ]
    if not names:
        raise ValueError("no LM linear layers found to quantise")
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    with warnings.catch_warnings():
        # torch.ao.quantization is deprecated in favour of torchao, which we don't depend on.
        warnings.simplefilter("ignore")
        if tokenizer is not None:
            ids = tokenizer(CALIBRATION_TEXT, add_special_tokens=False, return_tensors="pt")["input_ids"]
            errors = _int8_errors(model, names, ids)
            names = [n for n in names if errors[n] <= max_error]
        quantized = quantize_dynamic(
            model, {name: per_channel_dynamic_qconfig for name in names}, dtype=torch.qint8, inplace=False
        )
    quantized.int8_layers = names
    return quantized
