"""Integration tests on the real bundled backbones (offline)."""

import pytest
import timm
import torch
from PIL import Image

import vlm
from vlm.registry import cache_dir, efficientnet_lite0_state_dict

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def default_model():
    return vlm.create_model_and_transforms()


def _photo(name):
    skimage_data = pytest.importorskip("skimage.data")
    return Image.fromarray(getattr(skimage_data, name)())


def test_efficientnet_lite0_classifies_sample_photos(default_model):
    model, processor = default_model
    classifier = timm.create_model("tf_efficientnet_lite0")
    classifier.load_state_dict(efficientnet_lite0_state_dict(classifier))
    classifier.eval()
    with torch.no_grad():
        for name, label in [("chelsea", 285), ("coffee", 967)]:
            x = processor.image_transform(_photo(name))[None]
            assert classifier(x).argmax(-1).item() == label, name
            # The VLM's encoder holds the same weights: its tokens are the classifier's feature
            # map (1,280 head channels), then its last stage's 320 channels (vision.with_last_stage).
            tokens = model.vision(x[:, None])  # (1, 1, 10 * 10, 1600) at the preset's 320 px
            assert tokens.shape == (1, 1, 100, 1600)
            torch.testing.assert_close(tokens[0, 0, :, :1280], classifier.forward_features(x)[0].flatten(1).T)
            stage = classifier.forward_intermediates(x, indices=1, intermediates_only=True)[0]
            torch.testing.assert_close(tokens[0, 0, :, 1280:], stage[0].flatten(1).T)


def test_smollm2_loads_offline_and_knows_paris(default_model, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, processor = default_model
    assert (cache_dir() / "lm").is_dir()
    assert any(cache_dir().glob("lm/smollm2-135m-instruct-*/model.safetensors"))
    prompt = processor([processor.chat_segments([("What is the capital of France?", None)], num_images=0)])
    new = model.greedy_generate(None, prompt["input_ids"], 20, (processor.tokenizer.eos_token_id,))
    answer = processor.tokenizer.decode(new[0], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_default_vlm_forward_and_backward_on_a_batch_of_two(default_model):
    model, processor = default_model
    segs = [
        processor.chat_segments([("What animal is this?", "A cat.")]),
        processor.chat_segments([("What is in the cup?", "Coffee.")]),
    ]
    batch = processor(segs, [[_photo("chelsea")], [_photo("coffee")]])
    assert batch["pixel_values"].shape == (2, 1, 3, 320, 320)
    model.train()
    out = model(**batch)
    out.loss.backward()
    assert torch.isfinite(out.loss) and out.logits.shape[:2] == batch["input_ids"].shape
    grads = [p.grad for p in model.trainable_state_dict().values()]
    assert all(g is not None for g in grads)
    assert all(p.grad is None for p in model.vision.parameters())
    model.zero_grad(set_to_none=True)
    model.eval()


def test_default_cached_generation_equals_full_recomputation(default_model):
    model, processor = default_model
    segments = processor.chat_segments([("What is in this picture?", None)])
    batch = processor([segments], [[_photo("chelsea")]])
    reference = model.greedy_generate(batch["pixel_values"], batch["input_ids"], 16)[0].tolist()
    cached = model.generate(batch["pixel_values"], batch["input_ids"], max_new_tokens=16, stop_token_ids=())
    assert cached.tokens[0] == reference
