import logging

import pytest
import torch
from PIL import Image, ImageDraw

import vlm
from vlm.tiny import FAMILIES, make_tiny_lm, tiny_config

logging.getLogger("root").setLevel(logging.ERROR)  # open_clip's "random weights" notice


@pytest.fixture(scope="session")
def tiny_lm_dirs(tmp_path_factory):
    """One saved tiny random LM per family (llama with a ChatML template)."""
    root = tmp_path_factory.mktemp("tiny_lms")
    return {f: make_tiny_lm(root / f, f, seed=0, chat=(f == "llama")) for f in FAMILIES}


@pytest.fixture
def make_model(tiny_lm_dirs):
    def build(family="llama", **kwargs):
        torch.manual_seed(0)
        return vlm.create_model_and_transforms(tiny_config(tiny_lm_dirs[family], **kwargs), verbose=False)

    return build


@pytest.fixture
def trained_model(make_model):
    """A tiny model whose adapter does something (non-zero gates, perturbed weights)."""

    def build(family="llama", **kwargs):
        model, processor = make_model(family, **kwargs)
        set_gates(model, 0.8)
        with torch.no_grad():
            for p in model.trainable_state_dict().values():
                p.add_(torch.randn_like(p) * 0.1)
        return model, processor

    return build


def shape_image(color, shape="circle", size=48, seed=None):
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    box = (8, 8, size - 8, size - 8)
    if shape == "circle":
        draw.ellipse(box, fill=color)
    elif shape == "square":
        draw.rectangle(box, fill=color)
    else:
        draw.polygon([(size // 2, 6), (6, size - 6), (size - 6, size - 6)], fill=color)
    return image


def make_checkpoint(root, gates: float | None = None):
    """A saved tiny Llama VLM (ChatML template) under ``root/ckpt``; ``gates`` opens the
    cross-attention so outputs depend on the image."""
    make_tiny_lm(root / "lm", "llama", chat=True)
    torch.manual_seed(0)
    model, _ = vlm.create_model_and_transforms(tiny_config(root / "lm"), verbose=False)
    if gates is not None:
        set_gates(model, gates)
    return vlm.save_pretrained(model, root / "ckpt")


def set_gates(model, value):
    with torch.no_grad():
        for layer in model.decoder_layers():
            if layer.xattn is not None:
                layer.xattn.attn_gate.fill_(value)
                layer.xattn.ff_gate.fill_(value)


def assert_images_matter(model, got, ids, mask, by: float) -> None:
    """Logits ``got`` of ``model`` on ``ids`` change with other images after the first
    ``<image>`` (by more than ``by`` somewhere), and not at all before it."""
    with torch.no_grad():
        other = model(torch.randn(2, 2, 3, 32, 32), ids, attention_mask=mask).logits
    first = int((ids[0] == model.image_token_id).nonzero()[0])
    assert torch.equal(other[0, :first], got[0, :first])
    assert (other[0, first:] - got[0, first:]).abs().max() > by
