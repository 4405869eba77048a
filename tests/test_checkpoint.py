"""save_pretrained / from_pretrained: round trips and strict loading."""

import json

import pytest
import torch
from conftest import set_gates, shape_image
from safetensors.torch import load_file, save_file

import vlm
from vlm.factory import CONFIG_FILE, WEIGHTS_FILE


def _perturb(model):
    set_gates(model, 0.7)
    with torch.no_grad():
        for p in model.trainable_state_dict().values():
            p.add_(torch.randn_like(p) * 0.05)


def _batch(processor):
    return processor([processor.caption_segments("a red circle")], [[shape_image("red")]])


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_round_trip_gives_identical_logits(make_model, tmp_path, family):
    model, processor = make_model(family)
    _perturb(model)
    batch = _batch(processor)
    expected = model(**batch).logits
    vlm.save_pretrained(model, tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == sorted(
        [CONFIG_FILE, WEIGHTS_FILE, "generation_config.json", "README.md"]
    )
    loaded, processor2 = vlm.from_pretrained(tmp_path / "ckpt", verbose=False)
    assert torch.equal(loaded(**_batch(processor2)).logits, expected)
    # Only trainable weights are stored.
    saved = load_file(tmp_path / "ckpt" / WEIGHTS_FILE)
    assert set(saved) == set(model.trainable_state_dict())
    meta = json.loads((tmp_path / "ckpt" / CONFIG_FILE).read_text())
    assert meta["config"]["lm"]["name"] == model.config.lm.name
    assert meta["config"]["vision"]["name"] == "ViT-B-32"
    assert meta["trainable_parameters"] == sum(v.numel() for v in saved.values())


def test_overwrite_is_atomic_and_leaves_no_temporaries(make_model, tmp_path):
    model, _ = make_model("llama")
    vlm.save_pretrained(model, tmp_path / "ckpt")
    _perturb(model)
    vlm.save_pretrained(model, tmp_path / "ckpt")
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    saved = load_file(tmp_path / "ckpt" / WEIGHTS_FILE)
    for name, p in model.trainable_state_dict().items():
        assert torch.equal(saved[name], p.detach())


def test_missing_key_is_named(make_model, tmp_path):
    model, _ = make_model("llama")
    vlm.save_pretrained(model, tmp_path / "ckpt")
    state = load_file(tmp_path / "ckpt" / WEIGHTS_FILE)
    victim = sorted(k for k in state if ".xattn." in k)[0]
    del state[victim]
    save_file(state, tmp_path / "ckpt" / WEIGHTS_FILE)
    with pytest.raises(ValueError, match=f"missing keys: {victim}"):
        vlm.from_pretrained(tmp_path / "ckpt", verbose=False)


def test_unexpected_key_is_named(make_model, tmp_path):
    model, _ = make_model("llama")
    vlm.save_pretrained(model, tmp_path / "ckpt")
    state = load_file(tmp_path / "ckpt" / WEIGHTS_FILE)
    state["resampler.bogus"] = torch.zeros(3)
    save_file(state, tmp_path / "ckpt" / WEIGHTS_FILE)
    with pytest.raises(ValueError, match="unexpected keys: resampler.bogus"):
        vlm.from_pretrained(tmp_path / "ckpt", verbose=False)


def test_wrong_shape_is_named(make_model, tmp_path):
    model, _ = make_model("llama")
    vlm.save_pretrained(model, tmp_path / "ckpt")
    state = load_file(tmp_path / "ckpt" / WEIGHTS_FILE)
    state["resampler.latents"] = torch.zeros(1, 1)
    save_file(state, tmp_path / "ckpt" / WEIGHTS_FILE)
    with pytest.raises(ValueError, match=r"resampler.latents has shape \(1, 1\)"):
        vlm.from_pretrained(tmp_path / "ckpt", verbose=False)


def test_not_a_checkpoint_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        vlm.from_pretrained(tmp_path, verbose=False)
