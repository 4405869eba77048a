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

import functools
import warnings

import torch
import torch.nn.functional as F
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


# ---------------------------------------------------------------------- faster frozen LM weights
# Paths that keep the activations in float and change only how the frozen LM's weights are
# stored: fp16 weights with fp32 arithmetic, bf16 weights, or int8 weights with one scale per
# output channel (weight-only int8). Unlike the dynamic quantisation above, no activation is
# ever rounded to int8.

LM_WEIGHTS = ("float32", "float32-packed", "float16", "bfloat16", "int8")


def fp16_weights_supported() -> bool:
    """Whether this PyTorch has fbgemm's fp16-weight GEMM (x86 CPUs with AVX2)."""
    return "fbgemm" in torch.backends.quantized.supported_engines


@functools.cache
def _fp16_linear():
    """fbgemm's fp16-weight linear, called as cheaply as PyTorch allows.

    ``torch.ops.quantized.linear_dynamic_fp16(x, packed)`` costs ~30 µs a call from Python
    on top of the kernel, most likely because torch.ops' entry looks for
    ``__torch_function__`` on every argument and the packed weights (a TorchScript object)
    answer a missing attribute by raising a C++ exception (~15 µs a lookup). Calling the
    op's CPU kernel through its dispatcher handle skips that (``benchmarks/kernels.py
    --formats fp16w fp16w-op`` times both); no autograd key is crossed, which is why
    ``Fp16WeightLinear`` only takes this route when no gradient is wanted."""
    op = torch.ops.quantized.linear_dynamic_fp16.default
    handle = getattr(op, "_handle", None)
    if handle is None or not hasattr(handle, "redispatch_boxed"):  # another PyTorch: the public call
        return op
    cpu = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)
    return lambda x, packed: handle.redispatch_boxed(cpu, x, packed)


class Fp16WeightLinear(nn.Module):
    """A frozen linear layer whose weights are stored in float16 and multiplied in float32
    by fbgemm's kernel (``torch.ops.quantized.linear_dynamic_fp16``, x86 CPUs).

    The activations, the accumulation and the output stay float32; only the weights are
    rounded to fp16 (11 significant bits, against bf16's 8). A decode step reads half the
    bytes of float32, and on CPUs without fast bf16 or a good small-batch fp32 GEMM
    (AVX2 without AVX-512) the kernel is also faster at a few rows, the LM head most of
    all: ``benchmarks/generate.py --paths`` measures it."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        if not fp16_weights_supported():
            raise RuntimeError("fp16 weights need PyTorch's fbgemm engine (an x86 CPU build); use float32 here")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        bias = linear.bias.detach().float() if linear.bias is not None else None
        self.packed = torch.ops.quantized.linear_prepack_fp16(linear.weight.detach().float(), bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:  # fbgemm's kernel has no backward
            bias = self.bias
            return F.linear(x, self.weight.to(x.dtype), None if bias is None else bias.to(x.dtype))
        if x.dtype == torch.float32 and x.device.type == "cpu":
            return _fp16_linear()(x, self.packed)
        return torch.ops.quantized.linear_dynamic_fp16(x.float(), self.packed).to(x.dtype)

    @property
    def bias(self) -> torch.Tensor | None:
        return torch.ops.quantized.linear_unpack_fp16(self.packed)[1]

    @property
    def weight(self) -> torch.Tensor:
        """The weights as stored (rounded to fp16), in float32; a copy."""
        return torch.ops.quantized.linear_unpack_fp16(self.packed)[0]

    @property
    def nbytes(self) -> int:
        """Memory the packed fp16 weights take (a TorchScript object: no parameter or buffer)."""
        return 2 * self.in_features * self.out_features

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, weights=float16"


def packed_fp32_supported() -> bool:
    """Whether this PyTorch has oneDNN's float32 linear on prepacked weights (CPU builds with oneDNN)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class PackedLinear(nn.Module):
    """A frozen float32 linear layer whose weights sit in oneDNN's blocked layout
    (``torch.ops.mkldnn._reorder_linear_weight``, the layout PyTorch's compiler gives frozen
    weights) and are multiplied by oneDNN's inner product (``_linear_pointwise``).

    Weights, activations and arithmetic stay float32; only the order of the sums changes, so
    outputs differ from ``F.linear``'s by float32 rounding. On x86 CPUs the default float32
    GEMM reads the weights of a few-row product well below memory speed (an LM head of
    49,152 × 576 at 8 rows ran 3× slower than this), so decoding in float32 gains most;
    ``benchmarks/kernels.py --formats fp32 fp32-packed`` measures it per layer."""

    input_dtype = torch.float32
    """What the layer computes in (:class:`vlm.xattn.GatedCrossAttentionBlock` casts the latents to it)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        if not packed_fp32_supported():
            raise RuntimeError("packed float32 weights need PyTorch's oneDNN (mkldnn) CPU backend; use float32 here")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach().float().contiguous()
        # An opaque oneDNN tensor: a plain attribute, not a buffer (state_dict and .to() cannot hold it).
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight)
        self.bias = None if linear.bias is None else linear.bias.detach().float().clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:  # oneDNN's op has no backward
            return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        out = torch.ops.mkldnn._linear_pointwise(x.float(), self.packed, self.bias, "none", [None], "")
        return out.to(x.dtype)

    @property
    def weight(self) -> torch.Tensor:
        """The weights in float32, in the usual (out, in) layout; a copy."""
        return self.packed.to_dense()

    @property
    def nbytes(self) -> int:
        """Memory the weights and bias take (plain attributes: no parameter or buffer)."""
        return 4 * (self.in_features + (self.bias is not None)) * self.out_features

    def __deepcopy__(self, memo: dict) -> PackedLinear:
        plain = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        plain.weight = nn.Parameter(self.weight, requires_grad=False)
        if self.bias is not None:
            plain.bias = nn.Parameter(self.bias.clone(), requires_grad=False)
        return PackedLinear(plain)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, weights=float32 (oneDNN layout)"


class PackedSelfAttention(nn.Module):
    """A frozen ``nn.MultiheadAttention`` (batch first) called as self-attention, as the
    blocks of open_clip's vision towers call it: the input and output projections become
    :class:`PackedLinear` (one product for queries, keys and values) and the attention runs
    in ``F.scaled_dot_product_attention``. float32 throughout; only the order of the sums
    changes. Any other call (query, key and value not one tensor, a key padding mask,
    attention weights asked for, gradients) runs ``nn.MultiheadAttention`` on the weights
    unpacked, slower but the same."""

    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        if not self.fits(mha):
            raise ValueError(
                "PackedSelfAttention needs a batch-first nn.MultiheadAttention without extra key/value biases"
            )
        self.embed_dim, self.num_heads = mha.embed_dim, mha.num_heads
        qkv = nn.Linear(mha.embed_dim, 3 * mha.embed_dim, bias=mha.in_proj_bias is not None, device="meta")
        qkv.weight = nn.Parameter(mha.in_proj_weight.detach().float(), requires_grad=False)
        if mha.in_proj_bias is not None:
            qkv.bias = nn.Parameter(mha.in_proj_bias.detach().float(), requires_grad=False)
        self.qkv, self.out_proj = PackedLinear(qkv), PackedLinear(mha.out_proj)

    @staticmethod
    def fits(mha: nn.Module) -> bool:
        return (
            isinstance(mha, nn.MultiheadAttention)
            and mha.batch_first
            and mha._qkv_same_embed_dim
            and mha.bias_k is None
            and not mha.add_zero_attn
            and mha.dropout == 0.0
        )

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        plain = not (query is key and key is value) or key_padding_mask is not None or need_weights or is_causal
        if plain or query.dim() != 3 or (torch.is_grad_enabled() and query.requires_grad):
            return self.unpacked()(
                query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal
            )
        b, n, d = query.shape
        q, k, v = self.qkv(query).view(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        if attn_mask is not None:
            # nn.MultiheadAttention: True masks a key out, (N*heads, L, S) per head; SDPA: True lets it in.
            attn_mask = attn_mask.logical_not() if attn_mask.dtype == torch.bool else attn_mask.to(q.dtype)
            if attn_mask.dim() == 3:
                attn_mask = attn_mask.view(b, self.num_heads, n, n)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, H, N, hd)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, d)), None

    def unpacked(self) -> nn.MultiheadAttention:
        """The layer as ``nn.MultiheadAttention``, with its weights in the usual layout (a copy)."""
        bias = self.qkv.bias is not None
        mha = nn.MultiheadAttention(self.embed_dim, self.num_heads, bias=bias, batch_first=True, device="meta")
        mha.in_proj_weight = nn.Parameter(self.qkv.weight, requires_grad=False)
        mha.out_proj.weight = nn.Parameter(self.out_proj.weight, requires_grad=False)
        if bias:
            mha.in_proj_bias = nn.Parameter(self.qkv.bias.clone(), requires_grad=False)
            mha.out_proj.bias = nn.Parameter(self.out_proj.bias.clone(), requires_grad=False)
        return mha.eval()


class PackedPatchEmbed(nn.Module):
    """A frozen ``nn.Conv2d`` whose stride equals its kernel (a ViT's patch embedding) as
    one :class:`PackedLinear` product over the flattened patches, instead of a convolution:
    float32, the same sums in another order. Returns (B, C_out, H / p, W / p) like the
    convolution (a strided view)."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        if not self.fits(conv):
            raise ValueError("PackedPatchEmbed needs an nn.Conv2d with stride equal to its kernel and no padding")
        self.kernel, self.out_channels = tuple(conv.kernel_size), conv.out_channels
        linear = nn.Linear(conv.weight[0].numel(), conv.out_channels, bias=conv.bias is not None, device="meta")
        linear.weight = nn.Parameter(conv.weight.detach().float().reshape(conv.out_channels, -1), requires_grad=False)
        if conv.bias is not None:
            linear.bias = nn.Parameter(conv.bias.detach().float(), requires_grad=False)
        self.linear = PackedLinear(linear)

    @staticmethod
    def fits(conv: nn.Module) -> bool:
        return (
            type(conv) is nn.Conv2d  # not subclasses such as timm's Conv2dSame, which pad in forward
            and conv.padding_mode == "zeros"
            and max(conv.kernel_size) > 1
            and tuple(conv.stride) == tuple(conv.kernel_size)
            and tuple(conv.padding) == (0, 0)
            and tuple(conv.dilation) == (1, 1)
            and conv.groups == 1
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (ph, pw), (b, c, h, w) = self.kernel, x.shape
        gh, gw = h // ph, w // pw  # as the convolution, rows and columns past the last whole patch are dropped
        patches = x[:, :, : gh * ph, : gw * pw].reshape(b, c, gh, ph, gw, pw).permute(0, 2, 4, 1, 3, 5)
        out = self.linear(patches.reshape(b * gh * gw, c * ph * pw))
        return out.view(b, gh, gw, self.out_channels).permute(0, 3, 1, 2)


class Int8WeightLinear(nn.Module):
    """A frozen linear layer with int8 weights and one float scale per output channel.

    ``weight ≈ int8 * scale[:, None]`` (symmetric, ``scale ≈ max|row| / 127``). The input is
    cast to ``compute_dtype`` and multiplied by the int8 weights directly where PyTorch has a
    kernel for it (``torch._weight_int8pack_mm`` on CPU), else by the weights dequantised on
    the fly; the output goes back to the input's dtype."""

    def __init__(self, linear: nn.Linear, compute_dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        weight = linear.weight.detach().float()  # (out, in)
        # Rounded to the compute dtype first (the kernel multiplies by it), then the grid is its.
        scale = (weight.abs().amax(dim=1).clamp(min=1e-12) / 127).to(compute_dtype)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        grid = (weight / scale.float()[:, None]).round().clamp(-127, 127)
        self.register_buffer("weight_int8", grid.to(torch.int8))
        self.register_buffer("scale", scale)
        bias = linear.bias.detach().to(compute_dtype) if linear.bias is not None else None
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(self.scale.dtype)  # (N, in)
        if flat.device.type == "cpu" and hasattr(torch.ops.aten, "_weight_int8pack_mm"):
            out = torch.ops.aten._weight_int8pack_mm(flat, self.weight_int8, self.scale)
        else:
            out = F.linear(flat, self.weight_int8.to(flat.dtype)) * self.scale
        if self.bias is not None:
            out = out + self.bias
        return out.view(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, compute={self.scale.dtype}"


CONVERTED_LINEARS = (Fp16WeightLinear, Int8WeightLinear, PackedLinear)
"""Layers that hold frozen weights converted for inference (outside parameters, for the first and last)."""


def apply_lm_weights(model: VLM, weights: str | None = "auto") -> VLM:
    """What the applications run (:func:`vlm.factory.load_model`'s ``lm_weights``): ``model``
    itself with its frozen LM weights as ``weights`` (see :func:`fast_lm`; the
    cross-attention blocks' layers too, ``adapter=True``). ``"auto"``: fp16 weights where the
    model runs on a CPU in float32 and PyTorch has the kernel for them, else as it is;
    ``None`` or ``"float32"``: as it is. Any other choice also gives a float32 image side on
    a CPU oneDNN's layout (:func:`fast_encoder` with ``torch.float32``: the same arithmetic,
    faster image encodes). An LM already converted is left as it is: a second call changes
    nothing, and a second adapter on backbones shared with a converted model
    (``vlm.factory``'s ``share``) converts only its own blocks, to the LM's format."""
    if weights == "auto":
        param = next(model.lm.parameters())
        plain = param.device.type == "cpu" and param.dtype == torch.float32
        weights = "float16" if plain and fp16_weights_supported() else None
    if weights in (None, "float32"):
        return model
    done = {type(m) for m in model.lm.modules() if isinstance(m, CONVERTED_LINEARS)}
    if not done:
        fast_lm(model, weights, copy=False, adapter=True)
    elif done & {Fp16WeightLinear, PackedLinear}:
        kind = Fp16WeightLinear if Fp16WeightLinear in done else PackedLinear
        _replace_modules(model, _adapter_swaps(model.decoder_layers(), kind))
    image_side = next(model.resampler.parameters(), None)
    if image_side is not None and image_side.device.type == "cpu" and image_side.dtype == torch.float32:
        if packed_fp32_supported():
            fast_encoder(model, torch.float32, copy=False)
    return model


def _adapter_swaps(layers, kind: type[nn.Module]) -> dict[int, nn.Module]:
    """The cross-attention blocks' linear layers of ``layers`` as ``kind``. Under fp16 the
    keys and values, computed once per image, keep float32 weights (in oneDNN's layout
    where PyTorch has it)."""
    swap: dict[int, nn.Module] = {}
    for block in (layer.xattn for layer in layers if layer.xattn is not None):
        for name, module in block.named_modules():
            if not isinstance(module, nn.Linear):
                continue
            if name != "to_kv" or kind is PackedLinear:
                swap[id(module)] = kind(module)
            elif packed_fp32_supported():
                swap[id(module)] = PackedLinear(module)
    return swap


def _frozen_lm_linears(model: VLM) -> dict[str, nn.Linear]:
    """The frozen LM's linear layers by name (decoder layers and LM head), not the adapter's."""
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.startswith(("lm.", "head.base")) and ".xattn." not in name
    }


def _replace_modules(root: nn.Module, swap: dict[int, nn.Module]) -> None:
    """Put ``swap[id(old)]`` wherever ``old`` sits in the tree (a module held in two places,
    such as the LM head that :class:`~vlm.lm.OutputHead` also holds, is replaced in both)."""
    for parent in root.modules():
        for child_name, child in list(parent.named_children()):
            if id(child) in swap:
                setattr(parent, child_name, swap[id(child)])


def fast_lm(
    model: VLM, weights: str = "bfloat16", head: str | None = None, *, copy: bool = True, adapter: bool = False
) -> VLM:
    """``model`` with its frozen LM weights stored as ``weights`` for CPU decoding.

    ``"float16"``: the decoder layers' linear layers as :class:`Fp16WeightLinear` (fp16
    weights, float32 arithmetic), everything else unchanged; ``"bfloat16"``: the decoder
    layers' weights in bf16 (their activations then run in bf16 too); ``"float32-packed"``:
    their linear layers as :class:`PackedLinear` (float32 in oneDNN's layout); ``"int8"``: their
    linear layers as :class:`Int8WeightLinear` (bf16 compute), the rest in bf16. ``head``
    (default: ``weights``, except ``"float32"`` for ``"bfloat16"``): the LM head's weights
    (one of ``LM_WEIGHTS``); kept in float32 under bf16 layers, next-token scores are not
    rounded to bf16's 8 bits, which would tie near neighbours. The adapter (resampler, cross-attention, new token rows) and the vision
    tower keep their dtype, except with ``adapter=True`` under ``"float16"``: then the
    cross-attention blocks' per-token linear layers (query, output and feed-forward; not the
    keys and values, computed once per image) get fp16 weights too, and under
    ``"float32-packed"`` all of their linear layers are packed; for inference only
    (their weights no longer train). ``copy=False`` changes ``model`` itself (no second copy
    of the weights) and returns it. ``"float32"``: ``model`` unchanged (or copied)."""
    import copy as _copy

    if weights not in LM_WEIGHTS:
        raise ValueError(f"weights must be one of {', '.join(LM_WEIGHTS)}, got {weights!r}")
    head = head or ("float32" if weights == "bfloat16" else weights)
    if head not in LM_WEIGHTS:
        raise ValueError(f"head must be one of {', '.join(LM_WEIGHTS)}, got {head!r}")
    if any(isinstance(m, torch.ao.nn.quantized.dynamic.Linear) for m in model.modules()):
        raise ValueError("this model's LM is already dynamically quantised (quantize_lm_int8)")
    out = _copy.deepcopy(model) if copy else model
    if weights == "float32" and head == "float32":
        return out
    layers = out.decoder_layers()
    old_head = out.head.base
    head_weight = old_head.weight.detach().float().clone()  # before a tied embedding is cast
    swap: dict[int, nn.Module] = {}
    if weights in ("float16", "float32-packed"):
        kind = Fp16WeightLinear if weights == "float16" else PackedLinear
        for layer in layers:
            for module in layer.decoder_layer.modules():
                if isinstance(module, nn.Linear):
                    swap[id(module)] = kind(module)
        if adapter:
            swap.update(_adapter_swaps(layers, kind))
    elif weights != "float32":
        for layer in layers:
            layer.decoder_layer.to(torch.bfloat16)
        for name, child in out.decoder.named_children():
            # The embedding table and the final norm; rotary tables stay in float32.
            if not isinstance(child, nn.ModuleList) and "rotary" not in name:
                child.to(torch.bfloat16)
        if weights == "int8":
            for layer in layers:
                for module in layer.decoder_layer.modules():
                    if isinstance(module, nn.Linear):
                        swap[id(module)] = Int8WeightLinear(module)
    plain = nn.Linear(old_head.in_features, old_head.out_features, bias=old_head.bias is not None)
    plain.weight = nn.Parameter(head_weight, requires_grad=False)
    if old_head.bias is not None:
        plain.bias = nn.Parameter(old_head.bias.detach().float().clone(), requires_grad=False)
    if head == "int8":
        swap[id(old_head)] = Int8WeightLinear(plain)
    elif head == "float16":
        swap[id(old_head)] = Fp16WeightLinear(plain)
    elif head == "float32-packed":
        swap[id(old_head)] = PackedLinear(plain)
    else:
        swap[id(old_head)] = CastingLinear.like(plain, getattr(torch, head))
    _replace_modules(out, swap)
    out.lm_weights = (weights, head, adapter and weights in ("float16", "float32-packed"))
    return out


class CastingLinear(nn.Linear):
    """A frozen linear layer that casts its input to its weights' dtype and returns that
    dtype: an LM head kept in float32 under bf16 decoder layers gives float32 scores."""

    @classmethod
    def like(cls, linear: nn.Linear, dtype: torch.dtype) -> CastingLinear:
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        new.weight = nn.Parameter(linear.weight.detach().to(dtype), requires_grad=False)
        if linear.bias is not None:
            new.bias = nn.Parameter(linear.bias.detach().to(dtype), requires_grad=False)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.weight.dtype), self.weight, self.bias)


def fast_encoder(model: VLM, dtype: torch.dtype = torch.bfloat16, *, copy: bool = True) -> VLM:
    """``model`` with its image side (the frozen vision tower and the resampler) in ``dtype``,
    for inference: encoding an image is matrix products over many rows, bound by arithmetic,
    which a CPU with bf16 kernels (:func:`vlm.factory.fast_matmul`) does faster than float32. The
    latents come out in ``dtype``; the cross-attention blocks cast them to their own dtype
    when they compute keys and values. The outputs change by bf16's rounding (quality gates:
    ``benchmarks/generate.py --gates``); the resampler's weights no longer train.
    ``torch.float32``: the image side stays float32 and its products take oneDNN's layout:
    linear layers become :class:`PackedLinear`, self-attention layers
    (``nn.MultiheadAttention``, as in open_clip's towers) :class:`PackedSelfAttention`, a
    patch embedding :class:`PackedPatchEmbed`. In either dtype a convolutional tower runs
    channels-last (:meth:`vlm.vision.VisionEncoder.channels_last`). ``copy=False`` changes
    ``model`` itself and returns it."""
    import copy as _copy

    out = _copy.deepcopy(model) if copy else model
    out.vision.channels_last()
    if dtype != torch.float32:
        out.vision.to(dtype)
        out.resampler.to(dtype)
        return out
    swap: dict[int, nn.Module] = {}
    for side in (out.vision, out.resampler):
        for m in side.modules():
            if PackedSelfAttention.fits(m):
                swap[id(m)] = PackedSelfAttention(m)
            elif PackedPatchEmbed.fits(m):
                swap[id(m)] = PackedPatchEmbed(m)
    # Layers inside an nn.MultiheadAttention: it reads their weights itself.
    inside_mha = {
        id(m) for side in (out.vision, out.resampler) for mha in side.modules()
        if isinstance(mha, nn.MultiheadAttention) for m in mha.modules()
    }  # fmt: skip
    for side in (out.vision, out.resampler):
        for m in side.modules():
            if isinstance(m, nn.Linear) and id(m) not in inside_mha:
                swap[id(m)] = PackedLinear(m)
    _replace_modules(out, swap)
    return out
