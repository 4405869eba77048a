"""Faster frozen-LM paths (vlm.quantize.fast_lm): fp16 weights, float32 weights in oneDNN's
layout, bf16 weights and weight-only int8.

The arithmetic differs from fp32 (weights rounded; for bf16 and int8 activations in bf16
too), so exact equality is asserted where it holds (fp32 mode, fp16 weights against fp32
arithmetic on the same rounded weights, the int8 kernel against its own dequantised
weights, the adapter untouched) and a stated agreement where it cannot (logits within a few percent,
the first greedy tokens). The quality gates on the real bundled model are printed by
``benchmarks/generate.py --gates``, not asserted here.
"""

import pytest
import torch
import torch.nn.functional as F
from conftest import shape_image
from torch import nn

from vlm.generate import GenerationConfig, generate
from vlm.quantize import (
    CONVERTED_LINEARS,
    CastingLinear,
    Fp16WeightLinear,
    Int8WeightLinear,
    PackedLinear,
    PackedPatchEmbed,
    PackedSelfAttention,
    apply_lm_weights,
    fast_encoder,
    fast_lm,
    fp16_weights_supported,
    packed_fp32_supported,
)

NO_STOP = GenerationConfig(max_new_tokens=12, stop_token_ids=())
PROMPT = "the cat <image>sits on <image>the"


def _batch(processor):
    return processor([PROMPT], [[shape_image("blue"), shape_image("green", "square")]])


def _tokens(model, batch, **kwargs):
    return generate(model, batch["pixel_values"], batch["input_ids"], config=NO_STOP, **kwargs).tokens[0]


def _logits(model, batch):
    with torch.inference_mode():
        return model(**batch).logits.float()


def test_int8_linear_is_its_dequantised_weights():
    torch.manual_seed(0)
    linear = nn.Linear(64, 48, bias=True)
    q = Int8WeightLinear(linear)
    assert q.weight_int8.dtype == torch.int8 and q.scale.shape == (48,)
    dequantised = q.weight_int8.float() * q.scale.float()[:, None]
    # Rounding to the int8 grid moves a weight by at most half a step.
    assert ((dequantised - linear.weight).abs() <= q.scale.float()[:, None] * 0.51).all()
    x = torch.randn(3, 5, 64).bfloat16().float()  # (B, S, in), exactly representable in bf16
    expected = F.linear(x, dequantised, q.bias.float())
    got = q(x)
    assert got.shape == (3, 5, 48) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-2)  # bf16 output rounding only


needs_fbgemm = pytest.mark.skipif(not fp16_weights_supported(), reason="no fbgemm in this PyTorch build")
needs_onednn = pytest.mark.skipif(not packed_fp32_supported(), reason="no oneDNN in this PyTorch build")


@needs_fbgemm
def test_fp16_weight_linear_is_fp32_arithmetic_on_rounded_weights():
    torch.manual_seed(0)
    linear = nn.Linear(64, 48, bias=True)
    q = Fp16WeightLinear(linear)
    rounded = linear.weight.detach().half().float()
    assert torch.equal(q.weight, rounded)
    x = torch.randn(3, 5, 64)  # (B, S, in)
    got = q(x)
    assert got.shape == (3, 5, 48) and got.dtype == torch.float32
    torch.testing.assert_close(got, F.linear(x, rounded, linear.bias.detach()), rtol=1e-5, atol=1e-5)
    assert q(x.bfloat16()).dtype == torch.bfloat16  # the output goes back to the input's dtype
    # The forward calls the kernel through its dispatcher handle; it must be the public op's result.
    public = torch.ops.quantized.linear_dynamic_fp16(x, q.packed)
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            assert torch.equal(q(x), public)
            assert torch.equal(q(x.transpose(0, 1)), public.transpose(0, 1))  # a strided input


@needs_fbgemm
@pytest.mark.parametrize("adapter", [False, True])
def test_fp16_weights_are_the_fp32_model_with_its_lm_weights_rounded(trained_model, adapter):
    model, processor = trained_model("llama")
    batch = _batch(processor)
    fast = fast_lm(model, "float16", adapter=adapter)
    layer = fast.decoder_layers()[0].decoder_layer
    assert isinstance(layer.mlp.down_proj, Fp16WeightLinear) and isinstance(fast.head.base, Fp16WeightLinear)
    blocks = [layer.xattn for layer in fast.decoder_layers() if layer.xattn is not None]
    assert blocks and all(isinstance(b.to_q, Fp16WeightLinear) == adapter for b in blocks)
    # Run once per image: float32 weights kept, in oneDNN's layout with the adapter converted.
    kv = PackedLinear if adapter and packed_fp32_supported() else nn.Linear
    assert all(type(b.to_kv) is kv for b in blocks)
    # The oracle: the same model in plain fp32 with the same weights rounded to fp16.
    rounded = fast_lm(model, "float32")
    with torch.no_grad():
        lm_modules = [m for layer in rounded.decoder_layers() for m in layer.decoder_layer.modules()]
        if adapter:
            blocks = [layer.xattn for layer in rounded.decoder_layers() if layer.xattn is not None]
            lm_modules += [m for b in blocks for n, m in b.named_modules() if n != "to_kv"]
        for module in [*lm_modules, rounded.head.base]:
            if isinstance(module, nn.Linear):
                module.weight.copy_(module.weight.half().float())
    torch.testing.assert_close(_logits(fast, batch), _logits(rounded, batch), rtol=1e-4, atol=1e-4)
    assert _tokens(fast, batch) == _tokens(rounded, batch)


def test_fp32_mode_is_an_exact_copy(trained_model):
    model, processor = trained_model("llama")
    batch = _batch(processor)
    same = fast_lm(model, "float32")
    assert same is not model
    assert _tokens(same, batch) == _tokens(model, batch)


@pytest.mark.parametrize("weights", ["bfloat16", "int8"])
def test_fast_paths_keep_the_adapter_and_agree_with_fp32(trained_model, weights):
    model, processor = trained_model("llama")
    batch = _batch(processor)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fast = fast_lm(model, weights)
    # The original is untouched; the adapter and the vision tower keep float32.
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    for name, p in fast.named_parameters():
        if p.requires_grad or name.startswith(("vision.", "resampler.")):
            assert p.dtype == torch.float32, name
    layer = fast.decoder_layers()[0].decoder_layer
    if weights == "int8":
        assert isinstance(layer.self_attn.q_proj, Int8WeightLinear)
        assert isinstance(fast.head.base, Int8WeightLinear) and fast.lm.get_output_embeddings() is fast.head.base
    else:
        assert layer.self_attn.q_proj.weight.dtype == torch.bfloat16
        assert isinstance(fast.head.base, CastingLinear) and fast.head.base.weight.dtype == torch.float32
    # A stated agreement, not equality: activations run in bf16.
    ref, got = _logits(model, batch), _logits(fast, batch)
    assert got.dtype == torch.float32
    assert float((got - ref).norm() / ref.norm()) < {"bfloat16": 0.05, "int8": 0.1}[weights]
    assert _tokens(fast, batch)[:6] == _tokens(model, batch)[:6]


def test_bf16_encoder_changes_only_the_image_side(trained_model):
    model, processor = trained_model("llama")
    batch = _batch(processor)
    fast = fast_encoder(model)
    assert next(model.vision.parameters()).dtype == torch.float32  # a copy by default
    for name, p in fast.named_parameters():
        bf16 = name.startswith(("vision.", "resampler."))
        assert (p.dtype == torch.bfloat16) == bf16, name
    with torch.inference_mode():
        ref, got = model.encode_images(batch["pixel_values"]), fast.encode_images(batch["pixel_values"])
    assert got.dtype == torch.bfloat16 and got.shape == ref.shape
    # Text before the first image does not see it: those logits are the fp32 model's exactly.
    before = int((batch["input_ids"][0] == model.image_token_id).nonzero()[0, 0])
    ref_logits, logits = _logits(model, batch), _logits(fast, batch)
    assert torch.equal(logits[:, :before], ref_logits[:, :before])
    # After it, a stated agreement: the latents carry bf16's rounding.
    assert float((logits - ref_logits).norm() / ref_logits.norm()) < 0.05
    assert _tokens(fast, batch)[:6] == _tokens(model, batch)[:6]
    assert fast_encoder(fast, copy=False) is fast


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_convolutional_tower_runs_channels_last(tiny_lm_dirs, dtype):
    import dataclasses

    import vlm
    from vlm.config import VisionConfig
    from vlm.tiny import tiny_config

    if dtype == torch.float32 and not packed_fp32_supported():
        pytest.skip("no oneDNN in this PyTorch build")
    effnet = VisionConfig(kind="timm", name="tf_efficientnet_lite0", pretrained=None, image_size=64)
    cfg = dataclasses.replace(tiny_config(tiny_lm_dirs["llama"]), vision=effnet)
    torch.manual_seed(0)
    model, processor = vlm.create_model_and_transforms(cfg, verbose=False)
    model.eval()
    fast = fast_encoder(model, dtype)
    convs = [m for m in fast.vision.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) > 1 and all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    assert not any(  # the copy's, not the original's
        m.weight.is_contiguous(memory_format=torch.channels_last) and not m.weight.is_contiguous()
        for m in model.vision.modules() if isinstance(m, nn.Conv2d)
    )  # fmt: skip
    px = torch.stack(processor.transform_images([shape_image("red"), shape_image("teal", "square")]))[:, None]
    with torch.inference_mode():
        ref, got = model.encode_images(px), fast.encode_images(px)
    # float32: the same arithmetic in another order; bf16: a stated agreement.
    tol = {torch.float32: 1e-4, torch.bfloat16: 0.05}[dtype]
    assert float((got.float() - ref).norm() / ref.norm()) < tol


def test_in_place_on_a_tied_lm_keeps_the_head_in_float32(make_model):
    model, processor = make_model("llama")
    lm = model.lm
    lm.lm_head.weight = lm.get_input_embeddings().weight  # tie, as SmolLM2 does
    model.head.base = lm.lm_head
    head = lm.lm_head.weight.detach().clone()
    fast = fast_lm(model, "bfloat16", copy=False)
    assert fast is model
    assert model.embed.base.weight.dtype == torch.bfloat16
    assert model.head.base.weight.dtype == torch.float32
    assert torch.equal(model.head.base.weight, head)  # taken before the shared table was cast
    batch = _batch(processor)
    assert len(_tokens(model, batch)) == NO_STOP.max_new_tokens


def test_bad_names_are_errors(make_model):
    model, _ = make_model("llama")
    with pytest.raises(ValueError, match="weights must be one of.*'fp8'"):
        fast_lm(model, "fp8")
    with pytest.raises(ValueError, match="head must be one of.*'int4'"):
        fast_lm(model, "bfloat16", head="int4")


@needs_fbgemm
def test_fp16_weight_linear_passes_gradients_to_its_input():
    torch.manual_seed(0)
    linear = nn.Linear(16, 8)
    q = Fp16WeightLinear(linear)
    x = torch.randn(4, 16, requires_grad=True)
    q(x).square().sum().backward()
    ref = x.detach().clone().requires_grad_(True)
    F.linear(ref, linear.weight.detach().half().float(), linear.bias.detach()).square().sum().backward()
    torch.testing.assert_close(x.grad, ref.grad)


@needs_fbgemm
def test_apply_lm_weights_auto_converts_a_float32_cpu_model_once(make_model):
    model, processor = make_model("llama")
    assert apply_lm_weights(model, "float32") is model and apply_lm_weights(model, None) is model
    assert not any(isinstance(m, Fp16WeightLinear) for m in model.modules())
    assert apply_lm_weights(model, "auto") is model  # in place
    head = model.head.base
    assert isinstance(head, Fp16WeightLinear)
    assert isinstance(model.decoder_layers()[0].decoder_layer.self_attn.q_proj, Fp16WeightLinear)
    assert all(isinstance(x.xattn.ff[1], Fp16WeightLinear) for x in model.decoder_layers() if x.xattn is not None)
    # The image side stays float32, in oneDNN's layout where PyTorch has it.
    packed = [m for m in model.resampler.modules() if isinstance(m, PackedLinear)]
    assert bool(packed) == packed_fp32_supported()
    assert apply_lm_weights(model, "auto").head.base is head  # a second call changes nothing
    assert len(_tokens(model, _batch(processor))) == NO_STOP.max_new_tokens
    # Not in float32: left as it is.
    other, _ = make_model("llama")
    other.to(torch.bfloat16)
    assert not any(isinstance(m, Fp16WeightLinear) for m in apply_lm_weights(other, "auto").modules())


@needs_onednn
def test_packed_linear_is_float32_linear_up_to_rounding():
    torch.manual_seed(0)
    linear = nn.Linear(64, 48, bias=True)
    q = PackedLinear(linear)
    assert torch.equal(q.weight, linear.weight.detach())  # the layout changes, not the values
    x = torch.randn(3, 5, 64)  # (B, S, in)
    expected = F.linear(x, linear.weight.detach(), linear.bias.detach())
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            got = q(x)
            assert got.shape == (3, 5, 48) and got.dtype == torch.float32
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)  # only the order of the sums differs
            torch.testing.assert_close(q(x.transpose(0, 1)), expected.transpose(0, 1), rtol=1e-5, atol=1e-5)
    assert q(x.bfloat16()).dtype == torch.bfloat16  # the output goes back to the input's dtype
    # Gradients reach the input through the plain layout (oneDNN's op has no backward).
    x.requires_grad_(True)
    q(x).square().sum().backward()
    ref = x.detach().clone().requires_grad_(True)
    F.linear(ref, linear.weight.detach(), linear.bias.detach()).square().sum().backward()
    torch.testing.assert_close(x.grad, ref.grad)


@needs_onednn
def test_packed_self_attention_is_multihead_attention_up_to_rounding():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(32, 4, batch_first=True).eval()
    packed = PackedSelfAttention(mha)
    x, other = torch.randn(2, 7, 32), torch.randn(2, 5, 32)
    causal = torch.triu(torch.ones(7, 7, dtype=torch.bool), 1)  # nn.MultiheadAttention: True masks out
    additive = torch.randn(2 * 4, 7, 7)  # one float mask per sample and head
    with torch.inference_mode():
        for mask in (None, causal, additive):
            expected = mha(x, x, x, need_weights=False, attn_mask=mask)[0]
            got, weights = packed(x, x, x, need_weights=False, attn_mask=mask)
            assert weights is None
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        # Calls it was not built for run nn.MultiheadAttention on the same weights.
        out, weights = packed(x, other, other)
        expected, expected_weights = mha(x, other, other)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(weights, expected_weights, rtol=1e-5, atol=1e-5)
    # Gradients reach the input through the plain layout.
    x.requires_grad_(True)
    packed(x, x, x, need_weights=False)[0].square().sum().backward()
    ref = x.detach().clone().requires_grad_(True)
    mha(ref, ref, ref, need_weights=False)[0].square().sum().backward()
    torch.testing.assert_close(x.grad, ref.grad, rtol=1e-5, atol=1e-5)
    assert not PackedSelfAttention.fits(nn.MultiheadAttention(32, 4))  # sequence first: left alone


@needs_onednn
def test_packed_patch_embed_is_the_strided_convolution_up_to_rounding():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 16, kernel_size=(4, 8), stride=(4, 8), bias=True)
    packed = PackedPatchEmbed(conv)
    with torch.inference_mode():
        for size in ((32, 32), (35, 43)):  # the second leaves rows and columns that no patch covers
            x = torch.randn(2, 3, *size)
            torch.testing.assert_close(packed(x), conv(x), rtol=1e-5, atol=1e-5)
    assert not PackedPatchEmbed.fits(nn.Conv2d(3, 16, 3, stride=2))
    assert not PackedPatchEmbed.fits(nn.Conv2d(3, 16, 1))  # pointwise convolutions stay convolutions
    assert not PackedPatchEmbed.fits(nn.Conv2d(3, 16, 4, stride=4, padding=1))


@needs_onednn
def test_packed_float32_path_is_the_float32_model(trained_model):
    model, processor = trained_model("llama")
    batch = _batch(processor)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fast = fast_encoder(fast_lm(model, "float32-packed", adapter=True), torch.float32, copy=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the original is untouched
    layer = fast.decoder_layers()[0].decoder_layer
    assert isinstance(layer.mlp.down_proj, PackedLinear) and isinstance(fast.head.base, PackedLinear)
    blocks = [x.xattn for x in fast.decoder_layers() if x.xattn is not None]
    assert blocks and all(isinstance(b.to_q, PackedLinear) and isinstance(b.to_kv, PackedLinear) for b in blocks)
    assert any(isinstance(m, PackedLinear) for m in fast.resampler.modules())
    assert any(isinstance(m, PackedLinear) for m in fast.vision.modules())  # the tower's MLPs
    assert not any(isinstance(m, (nn.MultiheadAttention, nn.Conv2d)) for m in fast.vision.modules())
    assert any(isinstance(m, PackedSelfAttention) for m in fast.vision.modules())
    assert any(isinstance(m, PackedPatchEmbed) for m in fast.vision.modules())
    assert all(p.dtype == torch.float32 for p in fast.parameters())
    torch.testing.assert_close(_logits(fast, batch), _logits(model, batch), rtol=1e-4, atol=1e-4)
    assert _tokens(fast, batch) == _tokens(model, batch)
    import copy

    again = copy.deepcopy(fast)  # an opaque oneDNN tensor cannot be deep-copied as it is
    assert again.head.base.packed is not fast.head.base.packed
    torch.testing.assert_close(_logits(again, batch), _logits(fast, batch), rtol=0, atol=0)


@needs_onednn
def test_apply_lm_weights_packed_converts_lm_adapter_and_image_side(make_model):
    model, processor = make_model("llama")
    assert apply_lm_weights(model, "float32-packed") is model  # in place
    assert isinstance(model.head.base, PackedLinear)
    assert any(isinstance(m, PackedLinear) for m in model.resampler.modules())
    head = model.head.base
    assert apply_lm_weights(model, "float32-packed").head.base is head  # a second call changes nothing
    assert len(_tokens(model, _batch(processor))) == NO_STOP.max_new_tokens


@needs_fbgemm
def test_a_second_adapter_on_converted_backbones_shares_them(trained_model, tmp_path):
    """The demo loads the sketch adapter on the converted default model's backbones: one copy
    of the converted LM, and the second adapter's own blocks converted as the first's."""
    import vlm

    first, processor = trained_model()
    torch.manual_seed(1)
    other, _ = trained_model(every=3)  # another adapter layout on the same backbones
    folder = vlm.save_pretrained(other, tmp_path / "other")
    apply_lm_weights(first, "auto")
    second, _ = vlm.from_pretrained(folder, verbose=False, share=(first, processor))
    apply_lm_weights(second, "auto")

    def converted(model):  # the frozen LM's and tower's converted layers, not the adapter's
        named = [*model.lm.named_modules(), *model.vision.named_modules()]
        return {id(m) for n, m in named if isinstance(m, CONVERTED_LINEARS) and ".xattn." not in f".{n}."}

    assert converted(second) and converted(second) == converted(first)
    blocks = [x.xattn for x in second.decoder_layers() if x.xattn is not None]
    assert blocks and all(isinstance(b.to_q, Fp16WeightLinear) for b in blocks)
    assert any(isinstance(m, PackedLinear) for m in second.resampler.modules()) == packed_fp32_supported()
    # The same outputs as the adapter loaded and converted on its own backbones.
    alone = apply_lm_weights(vlm.from_pretrained(folder, verbose=False)[0], "auto")
    batch = _batch(processor)
    torch.testing.assert_close(_logits(second, batch), _logits(alone, batch), rtol=0, atol=0)
