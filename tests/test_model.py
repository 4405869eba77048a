"""Core model behaviour on tiny random backbones of every supported LM family."""

import pytest
import torch
from conftest import set_gates, shape_image
from transformers import AutoModelForCausalLM

import vlm
from vlm.tiny import FAMILIES

TEXT = "hello there <image>a red circle<|endofchunk|> and <image>a blue square<|endofchunk|> done"


def two_image_batch(processor, text=TEXT):
    images = [[shape_image("red"), shape_image("blue", "square")]]
    return processor([text], images)


@pytest.mark.parametrize("family", FAMILIES)
def test_identity_at_init_equals_frozen_lm(make_model, tiny_lm_dirs, family):
    model, processor = make_model(family)
    batch = two_image_batch(processor)
    out = model(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
    # The same frozen LM, loaded fresh and unwrapped, fed our embeddings (incl. <image> rows).
    reference = AutoModelForCausalLM.from_pretrained(tiny_lm_dirs[family]).eval()
    with torch.no_grad():
        ref = reference(inputs_embeds=model.embed(batch["input_ids"]), attention_mask=batch["attention_mask"]).logits
    vocab = ref.shape[-1]
    torch.testing.assert_close(out.logits[..., :vocab], ref, atol=1e-5, rtol=0)
    # Plain text, no images: exactly the LM.
    plain = processor(["the cat sits on the mat"])
    with torch.no_grad():
        ref_plain = reference(input_ids=plain["input_ids"]).logits
    got = model(None, plain["input_ids"], plain["attention_mask"]).logits[..., :vocab]
    torch.testing.assert_close(got, ref_plain, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_backward_reaches_every_trainable_parameter(make_model, family):
    model, processor = make_model(family)
    set_gates(model, 0.5)
    batch = two_image_batch(processor)
    out = model(**batch)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    no_grad = [n for n, p in model.trainable_state_dict().items() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []


def _positions(processor, input_ids):
    ids = input_ids[0].tolist()
    image_pos = [i for i, t in enumerate(ids) if t == processor.image_token_id]
    assert len(image_pos) == 2
    return image_pos


@pytest.mark.parametrize("only_latest", [True, False])
def test_masking_follows_the_latest_image_rule(make_model, only_latest):
    model, processor = make_model("llama", only_latest_image=only_latest)
    set_gates(model, 1.0)
    batch = two_image_batch(processor)
    first, second = _positions(processor, batch["input_ids"])
    base = model(batch["pixel_values"], batch["input_ids"]).logits

    changed_img1 = batch["pixel_values"].clone()
    changed_img1[:, 0] = torch.randn_like(changed_img1[:, 0])
    out1 = model(changed_img1, batch["input_ids"]).logits
    diff1 = (out1 - base).abs().amax(-1)[0]  # (S,)

    changed_img2 = batch["pixel_values"].clone()
    changed_img2[:, 1] = torch.randn_like(changed_img2[:, 1])
    out2 = model(changed_img2, batch["input_ids"]).logits
    diff2 = (out2 - base).abs().amax(-1)[0]

    # Text before the first image is unaffected by any image, exactly.
    assert torch.all(diff1[:first] == 0) and torch.all(diff2[:first] == 0)
    # Image 1 reaches its own span (the <image> token included).
    assert torch.all(diff1[first:second] > 0)
    # Image 2 reaches only positions from its own <image> on.
    assert torch.all(diff2[:second] == 0) and torch.all(diff2[second:] > 0)
    # At the cross-attention block itself (no self-attention mixing positions), image 1
    # reaches the tokens after image 2 only when all previous images are visible.
    xattn = model.decoder_layers()[0].xattn
    media = model.media_state(model.encode_images(changed_img1), batch["input_ids"])
    media_base = model.media_state(model.encode_images(batch["pixel_values"]), batch["input_ids"])
    h = torch.randn(1, batch["input_ids"].shape[1], xattn.norm.normalized_shape[0])
    d = (xattn(h, media, 0) - xattn(h, media_base, 0)).abs().amax(-1)[0]
    assert torch.all(d[:first] == 0) and torch.all(d[first:second] > 0)
    if only_latest:
        assert torch.all(d[second:] == 0)
    else:
        assert torch.all(d[second:] > 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_text_before_any_image_gets_exact_zero_and_no_nan(make_model, dtype):
    model, processor = make_model("qwen2")
    set_gates(model, 1.0)
    model.to(dtype)
    batch = two_image_batch(processor)
    first, _ = _positions(processor, batch["input_ids"])
    xattn = model.decoder_layers()[0].xattn
    media = model.media_state(model.encode_images(batch["pixel_values"].to(dtype)), batch["input_ids"])
    h = torch.randn(1, batch["input_ids"].shape[1], xattn.norm.normalized_shape[0], dtype=dtype)
    set_gates(model, 1.0)
    with torch.no_grad():
        xattn.ff_gate.zero_()  # isolate the cross-attention part
        out = xattn(h, media, 0)
    assert torch.isfinite(out).all()
    assert torch.equal(out[:, :first], h[:, :first])
    assert not torch.equal(out[:, first:], h[:, first:])
    logits = model(batch["pixel_values"].to(dtype), batch["input_ids"]).logits
    assert torch.isfinite(logits[..., : logits.shape[-1] - 2]).all()


def test_only_trainable_parameters_change_after_a_step(make_model):
    model, processor = make_model("gpt2")  # tied embeddings: new rows are input and output rows
    set_gates(model, 0.5)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = model.trainable_state_dict()
    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-2, weight_decay=0.1)
    batch = two_image_batch(processor)
    model.train()
    model(**batch).loss.backward()
    optimizer.step()
    for name, p in model.named_parameters():
        if name in trainable:
            assert not torch.equal(p, before[name]), f"{name} did not train"
        else:
            assert torch.equal(p, before[name]), f"frozen {name} changed"
    # The original embedding rows, in particular, are bit-identical.
    emb = model.lm.get_input_embeddings().weight
    assert torch.equal(emb, before[[n for n, p in model.named_parameters() if p is emb][0]])


def test_trainable_set_is_exactly_the_adapter(make_model):
    model, _ = make_model("llama")  # untied: the new tokens get separate output rows
    names = set(model.trainable_state_dict())
    assert "embed.new_rows" in names and "head.new_rows" in names
    assert any(n.startswith("resampler.") for n in names)
    xattn_names = {n for n in names if ".xattn." in n}
    assert {n.split(".xattn.")[0] for n in xattn_names} == {f"lm.model.layers.{i}" for i in model.cross_attn_layers}
    assert names == xattn_names | {n for n in names if n.startswith(("resampler.", "embed.", "head."))}
    assert not any(p.requires_grad for p in model.vision.parameters())


def test_labels_only_logits_give_the_same_loss(make_model):
    model, processor = make_model("opt")
    set_gates(model, 0.5)
    batch = two_image_batch(processor)
    full = model(**batch).loss
    cheap = model(**batch, return_logits=False)
    assert cheap.logits is None
    torch.testing.assert_close(cheap.loss, full)


def test_too_few_images_is_a_clear_error(make_model):
    model, processor = make_model("llama")
    batch = two_image_batch(processor)
    with pytest.raises(ValueError, match="2 <image> tokens but only 1 images"):
        model(batch["pixel_values"][:, :1], batch["input_ids"])


def test_overfits_eight_image_caption_pairs(make_model):
    model, processor = make_model("llama")
    colors = ["red", "blue", "green", "yellow", "purple", "orange", "black", "cyan"]
    shapes = ["circle", "square", "triangle", "circle", "square", "triangle", "square", "circle"]
    captions = [f"a {c} {s}" for c, s in zip(colors, shapes)]
    images = [[shape_image(c, s)] for c, s in zip(colors, shapes)]
    batch = processor([processor.caption_segments(c) for c in captions], images)
    params = model.trainable_state_dict()
    gates = [p for n, p in params.items() if n.endswith("_gate")]
    others = [p for n, p in params.items() if not n.endswith("_gate")]
    optimizer = torch.optim.AdamW([{"params": others, "lr": 3e-3}, {"params": gates, "lr": 3e-2}], weight_decay=0)
    model.train()
    first = None
    for _ in range(300):
        loss = model(**batch, return_logits=False).loss
        first = first if first is not None else loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    final = model(**batch).loss.item()
    assert final < first / 10, (first, final)


def test_spatial_positions_make_the_resampler_see_where_tokens_are():
    from vlm.resampler import PerceiverResampler, sincos_2d

    codes = sincos_2d(49, 64)
    assert codes.shape == (49, 64)
    # Every grid cell gets its own code, and neighbours are closer than far cells.
    assert torch.cdist(codes, codes).add(torch.eye(49) * 1e3).min() > 1e-3
    assert (codes[0] - codes[1]).norm() < (codes[0] - codes[48]).norm()
    with pytest.raises(ValueError, match="square grid"):
        sincos_2d(50, 64)

    torch.manual_seed(0)
    x = torch.randn(2, 1, 49, 40)
    perm = torch.randperm(49)
    for spatial_pos in (False, True):
        rs = PerceiverResampler(
            40, 32, 64, num_latents=4, depth=1, heads=2, head_dim=8, ff_mult=2, max_images=2, spatial_pos=spatial_pos
        )
        same = torch.allclose(rs(x), rs(x[:, :, perm]), atol=1e-5)
        # Without positions the perceiver cannot tell a shuffled image from the original.
        assert same is (not spatial_pos)


def test_pass_tokens_hands_the_image_tokens_to_the_decoder_and_loads_older_weights(make_model):
    import dataclasses

    from vlm.factory import load_trainable

    model, processor = make_model()
    cfg = model.config
    with_tokens = dataclasses.replace(cfg, resampler=dataclasses.replace(cfg.resampler, pass_tokens=True))
    torch.manual_seed(1)
    wide, _ = vlm.create_model_and_transforms(with_tokens, verbose=False)
    # No new weights: a checkpoint trained without pass_tokens loads as it is.
    assert wide.trainable_state_dict().keys() == model.trainable_state_dict().keys()
    load_trainable(wide, model.trainable_state_dict())
    batch = two_image_batch(processor)
    with torch.no_grad():
        latents, both = model.encode_images(batch["pixel_values"]), wide.encode_images(batch["pixel_values"])
        n_tokens = model.vision(batch["pixel_values"]).shape[2]
    lat = cfg.resampler.num_latents
    assert both.shape[:3] == (1, 2, lat + n_tokens)
    assert torch.allclose(both[:, :, :lat], latents, atol=1e-6)  # the latents come first, unchanged
    # The decoder attends to the tokens too: with open gates the loss is finite (the
    # latest-image mask covers the extra entries) and dropping the tokens changes it.
    set_gates(wide, 1.0)
    out = wide(batch["pixel_values"], batch["input_ids"], batch["attention_mask"], batch["labels"])
    assert torch.isfinite(out.loss)
    wide.resampler.pass_tokens = False
    assert not torch.allclose(
        wide(batch["pixel_values"], batch["input_ids"], batch["attention_mask"], batch["labels"]).loss, out.loss
    )


def test_last_stage_channels_follow_the_head_and_a_widened_checkpoint_starts_unchanged(tiny_lm_dirs):
    import dataclasses

    from vlm.config import VisionConfig
    from vlm.factory import load_trainable
    from vlm.tiny import tiny_config
    from vlm_train.train import add_channel_inputs

    effnet = VisionConfig(kind="timm", name="tf_efficientnet_lite0", pretrained=None, image_size=64)
    cfg = dataclasses.replace(tiny_config(tiny_lm_dirs["llama"]), vision=effnet)
    wide_cfg = dataclasses.replace(cfg, vision=dataclasses.replace(effnet, with_last_stage=True))
    torch.manual_seed(0)
    narrow, proc = vlm.create_model_and_transforms(cfg, verbose=False)
    torch.manual_seed(1)
    wide, _ = vlm.create_model_and_transforms(wide_cfg, verbose=False)
    assert (narrow.vision.width, wide.vision.width) == (1280, 1280 + 320)

    px = torch.stack(proc.transform_images([shape_image("red"), shape_image("teal", "square")]))[:, None]
    with torch.no_grad():
        head, both = narrow.vision(px), wide.vision(px)
        stage = wide.vision.tower.forward_intermediates(px[:, 0], indices=1, intermediates_only=True)[0]
    assert both.shape == (2, 1, 4, 1600)  # 64 px → a 2×2 grid
    assert torch.equal(both[..., :1280], head)
    assert torch.equal(both[..., 1280:], stage.flatten(2).transpose(1, 2)[:, None])

    with pytest.raises(ValueError, match="does not match|shape"):
        load_trainable(wide, narrow.trainable_state_dict())
    load_trainable(wide, add_channel_inputs(narrow.trainable_state_dict(), wide.vision.width))
    with torch.no_grad():  # zero weights for the new channels: the same latents, to float rounding
        # (a matrix product over more input channels may sum in another order)
        torch.testing.assert_close(wide.encode_images(px), narrow.encode_images(px), rtol=1e-5, atol=1e-6)

    with pytest.raises(ValueError, match="with_last_stage needs a timm"):
        dataclasses.replace(tiny_config(tiny_lm_dirs["llama"]).vision, with_last_stage=True).validate()


def test_a_folded_finer_stage_follows_on_the_heads_grid_and_a_widened_checkpoint_starts_unchanged(tiny_lm_dirs):
    import dataclasses

    from vlm.config import VisionConfig
    from vlm.factory import load_trainable
    from vlm.tiny import tiny_config
    from vlm_train.train import add_channel_inputs, adds_channels_after

    last = VisionConfig(kind="timm", name="tf_efficientnet_lite0", pretrained=None, image_size=64, with_last_stage=True)
    folded = dataclasses.replace(last, fold_stride=16)
    cfg = dataclasses.replace(tiny_config(tiny_lm_dirs["llama"]), vision=last)
    torch.manual_seed(0)
    narrow, proc = vlm.create_model_and_transforms(cfg, verbose=False)
    torch.manual_seed(1)
    wide, _ = vlm.create_model_and_transforms(dataclasses.replace(cfg, vision=folded), verbose=False)
    assert wide.vision.width == 1600 + 4 * 112  # each head cell takes the 2×2 stride-16 cells under it

    px = torch.stack(proc.transform_images([shape_image("red"), shape_image("teal", "square")]))[:, None]
    with torch.no_grad():
        before, after = narrow.vision(px), wide.vision(px)
        (stage,) = wide.vision.tower.forward_intermediates(px[:, 0], indices=[3], intermediates_only=True)
    assert stage.shape[-2:] == (4, 4) and after.shape == (2, 1, 4, 2048)  # 64 px: a 2×2 head grid
    assert torch.equal(after[..., :1600], before)
    # Token (row 0, column 1) holds the stage's channels at rows 0-1, columns 2-3, channel-major.
    cell = stage[:, :, 0:2, 2:4].flatten(1)
    assert torch.equal(after[:, 0, 1, 1600:], cell)

    assert adds_channels_after(last, folded) and adds_channels_after(
        dataclasses.replace(last, with_last_stage=False), folded
    )
    assert not adds_channels_after(folded, last) and not adds_channels_after(folded, folded)
    load_trainable(wide, add_channel_inputs(narrow.trainable_state_dict(), wide.vision.width))
    with torch.no_grad():  # zero weights for the new channels: the same latents, to float rounding
        # (a matrix product over more input channels may sum in another order)
        torch.testing.assert_close(wide.encode_images(px), narrow.encode_images(px), rtol=1e-5, atol=1e-6)

    for bad, match in (
        (dataclasses.replace(folded, fold_stride=32), "finer than it"),
        (dataclasses.replace(folded, fold_stride=12), r"strides \[2, 4, 8, 16, 32\]"),
        (dataclasses.replace(folded, with_last_stage=False, feature_stride=16), "feature_stride null"),
    ):
        with pytest.raises(ValueError, match=match):
            vlm.create_model_and_transforms(dataclasses.replace(cfg, vision=bad), verbose=False)


def test_a_text_only_row_batched_with_images_is_as_alone(trained_model):
    """Rows without any image skip the cross-attention blocks, as a batch without images
    does: a text-only sample gets the same logits alone and next to an image sample."""
    model, processor = trained_model()
    text = processor.chat_segments([("What is the capital of France?", None)], num_images=0)
    with_image = processor.chat_segments([("What color is it?", None)])
    alone = processor([text], [[]])
    mixed = processor([with_image, text], [[shape_image("red")], []])
    n = int(alone["attention_mask"].sum())
    with torch.no_grad():
        expected = model(**alone).logits[0, :n]
        got = model(**mixed).logits
        image_alone = model(**processor([with_image], [[shape_image("red")]])).logits[0]
    torch.testing.assert_close(got[1, :n], expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[0, : image_alone.shape[0]], image_alone, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(
        got[0, : image_alone.shape[0]], model(None, mixed["input_ids"][:1]).logits[0, : image_alone.shape[0]]
    )


@pytest.mark.parametrize(
    "new_ids, lm_vocab, head_rows", [([10, 11], 10, 10), ([11, 10], 10, 10), ([12, 14], 10, 10), ([8, 9], 8, 12)]
)
def test_output_head_scores_equal_the_padded_formula(new_ids, lm_vocab, head_rows):
    # [10, 11] follow the LM's 10 ids and take the single-copy path; the others need the
    # padded index_copy (out of order, or a gap before and between the added ids), or drop
    # the scores of an LM head's padding rows (12 rows for a vocabulary of 10).
    from vlm.lm import OutputHead, TokenEmbedding

    torch.manual_seed(0)
    vocab = max(new_ids) + 1
    embedding = TokenEmbedding(torch.nn.Embedding(lm_vocab, 6), new_ids)
    head = OutputHead(torch.nn.Linear(6, head_rows, bias=False), embedding, tied=False, vocab_size=vocab)
    with torch.no_grad():
        head.new_rows.normal_()
        hidden = torch.randn(3, 4, 6)
        got = head(hidden)
        expected = torch.full((3, 4, max(vocab, head_rows)), torch.finfo(torch.float32).min)
        expected[..., :head_rows] = head.base(hidden)
        expected = expected[..., :vocab].clone()
        expected[..., new_ids] = hidden @ head.new_rows.t()
    assert head._follow(head_rows) is (new_ids == [10, 11])
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


def test_feature_stride_gives_a_finer_stage_on_its_own_grid(tiny_lm_dirs):
    import dataclasses

    from vlm.config import VisionConfig
    from vlm.tiny import tiny_config

    fine = VisionConfig(kind="timm", name="tf_efficientnet_lite0", pretrained=None, image_size=64, feature_stride=16)
    cfg = dataclasses.replace(tiny_config(tiny_lm_dirs["llama"]), vision=fine)
    model, proc = vlm.create_model_and_transforms(cfg, verbose=False)
    assert model.vision.width == 112  # EfficientNet-Lite0's stride-16 stage
    px = torch.stack(proc.transform_images([shape_image("red"), shape_image("teal", "square")]))[:, None]
    with torch.no_grad():
        tokens = model.vision(px)
        (stage,) = model.vision.tower.forward_intermediates(px[:, 0], indices=[3], intermediates_only=True)
    assert tokens.shape == (2, 1, 16, 112)  # 64 px / 16 → a 4×4 grid
    assert torch.equal(tokens, stage.flatten(2).transpose(1, 2)[:, None])
    assert model.encode_images(px).shape[:2] == (2, 1)

    # A head-reading model and a stride-16 adapter share one tower: the second reads its
    # stage from the first's modules, as a model of its own would.
    head, head_proc = vlm.create_model_and_transforms(
        dataclasses.replace(cfg, vision=dataclasses.replace(fine, feature_stride=None, with_last_stage=True)),
        verbose=False,
    )
    assert head.config.vision.same_tower(fine) and head.vision.width == 1280 + 320
    shared, _ = vlm.create_model_and_transforms(cfg, verbose=False, share=(head, head_proc))
    assert shared.vision.tower.conv_stem.weight is head.vision.tower.conv_stem.weight
    with torch.no_grad():
        assert shared.vision.width == 112 and torch.equal(shared.vision(px), tokens)
        assert head.vision(px).shape == (2, 1, 4, 1600)  # the first model still reads the head
    other_size = dataclasses.replace(fine, image_size=96)
    with pytest.raises(ValueError, match="same vision tower"):
        vlm.create_model_and_transforms(
            dataclasses.replace(cfg, vision=other_size), verbose=False, share=(head, head_proc)
        )

    for bad, match in (
        (dataclasses.replace(fine, feature_stride=8 * 3), r"strides \[2, 4, 8, 16, 32\]"),
        (dataclasses.replace(fine, with_last_stage=True), "with_last_stage false"),
        (dataclasses.replace(fine, kind="open_clip", name="ViT-B-32"), "needs a timm conv net"),
        (dataclasses.replace(fine, feature_stride=0), "positive integer"),
    ):
        with pytest.raises(ValueError, match=match):
            vlm.create_model_and_transforms(dataclasses.replace(cfg, vision=bad), verbose=False)
