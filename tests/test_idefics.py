"""Reference equality with IDEFICS: transformers' own ``IdeficsForVisionText2Text`` over a
tiny random ``IdeficsConfig`` built here is saved with ``save_pretrained``, converted with
``vlm convert idefics``, and the converted vlm model gives the same logits (fp32, 1e-5) and
the same greedy tokens. transformers is the oracle only: nothing of it is copied into vlm/.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import assert_images_matter
from safetensors.torch import save_file
from tokenizers import AddedToken
from transformers import IdeficsConfig, IdeficsForVisionText2Text
from transformers.models.idefics.processing_idefics import (
    image_attention_mask_for_packed_input_ids,
    incremental_to_binary_attention_mask,
)

import vlm
from vlm.convert import main
from vlm.generate import generate
from vlm.tiny import make_tiny_lm, tiny_tokenizer

FAKE = "<fake_token_around_image>"
IMAGE = f"{FAKE}<image>{FAKE}"  # how IDEFICS's processor writes each image
PROMPTS = [
    # text before the first image, two images, and text after each
    f"the cat sits on the mat.{IMAGE}a red circle left of a blue square{IMAGE}a green triangle above",
    f"{IMAGE}what colour is the shape? the shape is red.",
]

CASES = {
    # qk norms in the perceiver and the cross-attention, per-channel gates, a block before every 2nd layer
    "vector_gates": dict(alpha_type="vector", qk_layer_norms=True, qk=True, interval=2, act="gelu", tied=False),
    # one gate per block, no qk norms, a block before every layer, QuickGELU ViT, tied embeddings
    "float_gates": dict(alpha_type="float", qk_layer_norms=False, qk=False, interval=1, act="quick_gelu", tied=True),
}


def make_tokenizer():
    """The tiny tokenizer with IDEFICS's two additional tokens at ids vocab_size, vocab_size + 1."""
    tok = tiny_tokenizer()
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in (FAKE, "<image>")], special_tokens=True)
    tok.pad_token = tok.eos_token
    return tok


def idefics_config(tok, case) -> IdeficsConfig:
    # intermediate_size 48 is no multiple of hidden 32: the MLP widths come from the config, not a ratio.
    return IdeficsConfig(
        vocab_size=len(tok) - 2,
        additional_vocab_size=2,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=4,
        num_attention_heads=4,
        cross_layer_interval=case["interval"],
        qk_layer_norms=case["qk_layer_norms"],
        alpha_type=case["alpha_type"],
        use_resampler=True,
        tie_word_embeddings=case["tied"],
        initializer_range=0.1,
        bos_token_id=None,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        vision_config=dict(
            embed_dim=32,
            image_size=32,
            patch_size=8,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            hidden_act=case["act"],
        ),
        perceiver_config=dict(
            use_resampler=True,
            resampler_n_latents=4,
            resampler_depth=2,
            resampler_n_heads=2,
            resampler_head_dim=8,
            qk_layer_norms_perceiver=case["qk"],
        ),
    )


def build_reference(cfg, seed=0):
    """transformers' model with every weight perturbed (norms too, so a swapped or dropped
    norm shows) and the gates open, different in every layer."""
    torch.manual_seed(seed)
    model = IdeficsForVisionText2Text(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "alpha" in name:
                p.uniform_(0.3, 1.0)
            else:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def image_attention_mask(ids, tok, num_images):
    """Which image each token attends to, as IDEFICS's processor computes it."""
    incremental, _ = image_attention_mask_for_packed_input_ids(ids, tok, "pt")
    return incremental_to_binary_attention_mask(incremental, "pt", num_classes=num_images)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """case → (reference model, its tokenizer, our model, our processor, folder)."""
    cache = {}

    def get(case):
        if case not in cache:
            root = tmp_path_factory.mktemp(case)
            tok = make_tokenizer()
            ref = build_reference(idefics_config(tok, CASES[case]))
            ref.save_pretrained(root / "idefics")
            tok.save_pretrained(root / "idefics")
            assert main(["idefics", str(root / "idefics"), "--out", str(root / "vlm")]) == 0
            model, processor = vlm.from_pretrained(root / "vlm", verbose=False)
            cache[case] = ref, tok, model.eval(), processor, root
        return cache[case]

    return get


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_equal_the_reference_on_interleaved_prompts(converted, case):
    ref, tok, model, processor, _ = converted(case)
    tok.padding_side = "right"
    batch = tok(PROMPTS, padding=True, return_tensors="pt")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    for i, prompt in enumerate(PROMPTS):  # our processor reads the prompts into the same ids
        assert processor.encode(processor.interleaved_segments(prompt))[0] == ids[i][mask[i].bool()].tolist()
    torch.manual_seed(1)
    images = torch.randn(2, 2, 3, 32, 32)  # (B, T, C, H, W); sample 1 uses only its first
    with torch.no_grad():
        expected = ref(
            input_ids=ids,
            attention_mask=mask,
            pixel_values=images,
            image_attention_mask=image_attention_mask(ids, tok, 2),
        ).logits
        got = model(images, ids, attention_mask=mask).logits
    assert got.shape == expected.shape  # the base vocabulary and IDEFICS's two additional tokens
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=0)
    # The images matter: text after an image changes with it, text before the first does not.
    assert_images_matter(model, got, ids, mask, by=0.1)


@pytest.mark.parametrize("case", sorted(CASES))
def test_greedy_generation_gives_the_reference_tokens(converted, case):
    """Batch 1 and a left-padded batch of 2 (positions count real tokens in both)."""
    ref, tok, model, _, _ = converted(case)
    eos = tok.eos_token_id
    tok.padding_side = "left"
    for prompts, seed in [([f"a cat{IMAGE}a red circle{IMAGE}"], 2), ([PROMPTS[0], f"{IMAGE}what colour is"], 3)]:
        batch = tok(prompts, padding=True, return_tensors="pt")
        ids, mask = batch["input_ids"], batch["attention_mask"]
        torch.manual_seed(seed)
        images = torch.randn(len(prompts), 2, 3, 32, 32)
        with torch.no_grad():
            theirs = ref.generate(
                input_ids=ids,
                attention_mask=mask,
                pixel_values=images,
                image_attention_mask=image_attention_mask(ids, tok, 2),
                max_new_tokens=12,
                do_sample=False,
                num_beams=1,
            )[:, ids.shape[1] :].tolist()
        ours = generate(model, images, ids, mask, max_new_tokens=12, stop_token_ids=(eos,)).tokens
        for mine, reference in zip(ours, theirs, strict=True):
            assert mine == (reference[: reference.index(eos)] if eos in reference else reference)
            assert len(mine) >= 3 and model.image_token_id not in mine


def test_config_and_folder_record_their_architecture(converted):
    ref, tok, model, processor, root = converted("vector_gates")
    cfg = model.config
    rs, xa = cfg.resampler, cfg.cross_attn
    assert (rs.project, rs.media_time, rs.ff_act, rs.qk_norm, rs.num_latents, rs.depth) == (
        False,
        False,
        "relu",
        True,
        4,
        2,
    )
    assert (xa.norm, xa.ff, xa.ff_dim, xa.qk_norm, xa.vector_gates) == ("rmsnorm", "swiglu", 48, True, True)
    assert model.cross_attn_layers == [0, 2]  # before layer i when i % cross_layer_interval == 0
    assert cfg.vision.class_token and model.vision.width == 32
    assert cfg.added_tokens == [FAKE, "<image>"] and cfg.lm.vocab_size == len(tok)
    assert processor.tokenizer.convert_tokens_to_ids(cfg.added_tokens) == tok.convert_tokens_to_ids(cfg.added_tokens)
    # The decoder and the ViT sit in the folder, named by absolute path.
    saved = json.loads((root / "vlm" / "config.json").read_text())["config"]
    assert saved["lm"]["name"] == str((root / "vlm" / "lm").resolve())
    assert saved["vision"]["pretrained"] == str((root / "vlm" / "vision.safetensors").resolve())
    assert json.loads((root / "vlm" / "lm" / "config.json").read_text())["model_type"] == "llama"
    # What trains is what IDEFICS trains: the perceiver, the cross-attention, the additional rows.
    n_ref = sum(p.numel() for n, p in ref.named_parameters() if "perceiver" in n or "gated_cross" in n)
    n_ref += ref.model.embed_tokens.additional_embedding.weight.numel() + ref.lm_head.additional_fc.weight.numel()
    assert sum(v.numel() for v in model.trainable_state_dict().values()) == n_ref


def test_a_weights_file_converts_to_the_same_folder(converted, tmp_path):
    ref, _, _, _, root = converted("vector_gates")
    state = {k: v.contiguous() for k, v in ref.state_dict().items()}
    save_file(state, tmp_path / "weights.safetensors")
    torch.save(state, tmp_path / "weights.pt")
    source = root / "idefics"
    folder = (root / "vlm" / "model.safetensors").read_bytes()
    for name in ("weights.safetensors", "weights.pt"):
        args = ["idefics", str(tmp_path / name), "--config", str(source / "config.json"), "--tokenizer", str(source)]
        assert main([*args, "--out", str(tmp_path / f"out-{name}")]) == 0
        assert (tmp_path / f"out-{name}" / "model.safetensors").read_bytes() == folder


def _refused(tmp_path, args, caplog, reason):
    out = tmp_path / "refused"
    assert main(["idefics", *args, "--out", str(out)]) == 1
    assert reason in caplog.text, caplog.text
    assert not out.exists()
    caplog.clear()


def test_mismatched_inputs_are_refused_with_a_reason(converted, tmp_path, caplog):
    _, tok, _, _, root = converted("vector_gates")
    source = root / "idefics"

    def variant(name, edit=None, tokenizer=None):
        """A copy of the source folder with its config.json edited, or another tokenizer."""
        folder = tmp_path / name
        folder.mkdir()
        for file in source.iterdir():
            (folder / file.name).symlink_to(file)
        if edit:
            data = json.loads((source / "config.json").read_text())
            edit(data)
            (folder / "config.json").unlink()
            (folder / "config.json").write_text(json.dumps(data))
        if tokenizer is not None:
            for file in folder.glob("tokenizer*"):
                file.unlink()
            tokenizer.save_pretrained(folder)
        return str(folder)

    lm = make_tiny_lm(tmp_path / "llama")
    _refused(tmp_path, [str(lm)], caplog, "is not an IDEFICS config (model_type 'llama'")
    no_resampler = variant("no_resampler", lambda d: d.update(use_resampler=False))
    _refused(tmp_path, [no_resampler], caplog, "use_resampler=False")
    fewer_layers = variant("fewer_layers", lambda d: d.update(num_hidden_layers=2))
    _refused(tmp_path, [fewer_layers], caplog, "weights do not fit its config: 18 unexpected")
    wider = variant("wider_perceiver", lambda d: d["perceiver_config"].update(resampler_head_dim=4))
    _refused(tmp_path, [wider], caplog, "has shape")
    plain = tiny_tokenizer()
    _refused(tmp_path, [variant("tokenizer", tokenizer=plain)], caplog, "is this the tokenizer of this checkpoint?")
    _refused(tmp_path, [str(source / "model.safetensors")], caplog, "needs --config")


class Payload:
    """Unpickling this runs os.makedirs: a weights file that carries it must be refused unread."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def test_a_pickled_payload_is_refused(converted, tmp_path, caplog):
    _, _, _, _, root = converted("vector_gates")
    marker = tmp_path / "payload-ran"
    torch.save({"model.embed_tokens.weight": torch.zeros(2, 2), "x": Payload(str(marker))}, tmp_path / "w.bin")
    source = root / "idefics"
    args = [str(tmp_path / "w.bin"), "--config", str(source / "config.json"), "--tokenizer", str(source)]
    _refused(tmp_path, args, caplog, "not unpickled")
    assert not marker.exists()


def test_parser_imports_without_torch():
    code = (
        "import sys, vlm.convert as c; c.build_parser().parse_args(['idefics', 'x', '--out', 'o']); "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
