"""Reference equality with OpenFlamingo: its own factory builds a tiny random model, its
checkpoint goes through ``vlm convert openflamingo``, and the converted vlm model gives
the same logits (fp32, 1e-5) and the same greedy tokens as the reference code.

open-flamingo is a test dependency (``pip install --no-deps open-flamingo einops einops-exts``).
Everything it needs to run under our pinned torch/transformers is shimmed here, never in vlm/.
"""

import json
import os
import sys
import types

import pytest
import torch
from safetensors.torch import save_file

pytest.importorskip("einops", reason="open-flamingo needs einops (pip install einops einops-exts)")
pytest.importorskip("einops_exts", reason="open-flamingo needs einops-exts (pip install einops-exts)")
open_flamingo = pytest.importorskip(
    "open_flamingo", reason="open-flamingo is not installed (pip install --no-deps open-flamingo einops einops-exts)"
)

import open_clip  # noqa: E402
from conftest import assert_images_matter  # noqa: E402
from open_flamingo.src.flamingo_lm import FlamingoLMMixin  # noqa: E402

import vlm  # noqa: E402
from vlm.convert import convert_openflamingo, main, read_checkpoint  # noqa: E402
from vlm.fileio import UnsafeFileError  # noqa: E402
from vlm.generate import generate  # noqa: E402
from vlm.tiny import tiny_lm_config, tiny_tokenizer  # noqa: E402

TINY_VIT = "vlm-test-tiny-vit"
# A 2-layer ViT, 16 patch tokens at 32 px. final_ln_after_pool: open_clip < 2.23 (what
# OpenFlamingo's releases were trained with) handed out its tokens before ln_post; newer
# open_clip normalises them unless this is set. vlm reads the tokens before ln_post.
TINY_VIT_CONFIG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1},
}
TINY_VIT_CONFIG["vision_cfg"]["final_ln_after_pool"] = True

PROMPTS = [
    # text before the first image, two images, and text after each
    "the cat sits on the mat.<image>a red circle left of a blue square<|endofchunk|><image>a green triangle above",
    "<image>what colour is the shape? the shape is red.<|endofchunk|>",
]


@pytest.fixture(scope="module")
def tiny_vit(tmp_path_factory):
    folder = tmp_path_factory.mktemp("open_clip_configs")
    (folder / f"{TINY_VIT}.json").write_text(json.dumps(TINY_VIT_CONFIG))
    open_clip.add_model_config(folder)
    return TINY_VIT


@pytest.fixture
def of_shims(monkeypatch):
    """What OpenFlamingo 2.0.1 needs under transformers 5 and without its training extras."""
    # transformers 5's generate() drops an all-ones attention mask; FlamingoLMMixin.forward
    # takes it as a required positional argument.
    monkeypatch.setattr(FlamingoLMMixin.forward, "__defaults__", (None,))


def checkpoint_filter():
    """OpenFlamingo's own ``filter_state_dict_to_trainable``. Its module imports wandb (a
    training-only dependency) at the top: a stand-in is there while it loads, and only then."""
    with pytest.MonkeyPatch.context() as mp:
        if "wandb" not in sys.modules:
            mp.setitem(sys.modules, "wandb", types.ModuleType("wandb"))
        from open_flamingo.train.train_utils import filter_state_dict_to_trainable
    return filter_state_dict_to_trainable


def make_lm(folder, family, padding_rows=0):
    """A tiny random HF LM; ``padding_rows`` extra embedding rows beyond the tokenizer, as
    RedPajama-3B and MPT-7B have (50432 rows for 50277 tokens)."""
    from transformers import AutoModelForCausalLM

    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    if family == "mpt":
        from transformers import MptConfig

        config = MptConfig(d_model=32, n_heads=4, n_layers=4, vocab_size=len(tokenizer), max_seq_len=256)
    else:
        config = tiny_lm_config(family, len(tokenizer) + padding_rows)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def build_reference(vit, lm_dir, every, seed=0):
    """OpenFlamingo's own factory over the tiny ViT and LM, with a random adapter (gates open)."""
    torch.manual_seed(seed)
    model, image_processor, tokenizer = open_flamingo.create_model_and_transforms(
        vit, None, str(lm_dir), str(lm_dir), cross_attn_every_n_layers=every, use_local_files=True
    )
    with torch.no_grad():
        # A random tower's layer norms are ones and zeros; perturbed, ln_post is no identity
        # and the test sees which tokens (before or after it) reach the perceiver.
        for p in model.vision_encoder.parameters():
            p.add_(torch.randn_like(p) * 0.2)
        for name, p in [
            *model.perceiver.named_parameters(),
            *model.lang_encoder.gated_cross_attn_layers.named_parameters(),
        ]:
            if name.endswith("_gate"):
                p.uniform_(0.3, 1.0)  # non-zero, different in every layer
            else:
                p.add_(torch.randn_like(p) * 0.2)  # norms too, so a swapped norm would show
    return model.eval(), image_processor, tokenizer


def save_checkpoint(model, path, output_rows_as=None):
    """The checkpoint OpenFlamingo's trainer writes: its own filter_state_dict_to_trainable
    (the perceiver, the cross-attention and every embedding matrix). ``output_rows_as``: also
    store the untied LM head under that name (transformers 4 named GPT-NeoX's ``embed_out``,
    and the released 4B checkpoints hold it)."""
    state = checkpoint_filter()(model, model.state_dict())
    if output_rows_as:
        state[f"lang_encoder.{output_rows_as}"] = model.lang_encoder.get_output_embeddings().weight.detach().clone()
    if str(path).endswith(".safetensors"):
        save_file({k: v.contiguous() for k, v in state.items()}, path)
    else:
        torch.save(state, path)
    return state


def save_vision_weights(model, path):
    """The tower's weights as a local open_clip weights file (what a user without network passes)."""
    save_file({f"visual.{k}": v.contiguous() for k, v in model.vision_encoder.state_dict().items()}, path)
    return path


def reference_logits(model, images, ids, mask):
    with torch.no_grad():
        return model(images[:, :, None], ids, attention_mask=mask).logits  # (B, T, F=1, C, H, W)


CASES = {
    # family: (cross_attn_every, padding rows, output rows stored in the checkpoint as)
    "llama": (2, 0, None),  # untied head, no output rows in the checkpoint (OpenFlamingo's filter drops lm_head)
    "gpt_neox": (1, 13, "embed_out.weight"),  # RedPajama-3B's layout: padded vocab, embed_out in the checkpoint
}


@pytest.fixture(scope="module")
def converted(tiny_vit, tmp_path_factory):
    """family → (reference model, its tokenizer and image processor, our model, our processor)."""
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = _convert(family, tiny_vit, tmp_path_factory.mktemp(family))
        return cache[family]

    return get


def _convert(family, vit, root):
    every, padding, output_as = CASES[family]
    lm_dir = make_lm(root / "lm", family, padding)
    ref, image_processor, tokenizer = build_reference(vit, lm_dir, every)
    save_checkpoint(ref, root / "checkpoint.pt", output_as)
    if output_as is None:
        # Without output rows in the checkpoint, the reference's own added rows are
        # resize_token_embeddings' random draw; the converter uses the head's mean row.
        head = ref.lang_encoder.get_output_embeddings().weight
        added = tokenizer.convert_tokens_to_ids(["<|endofchunk|>", "<image>", "<PAD>"])
        with torch.no_grad():
            head[added] = head[: min(added)].mean(0)
    vision_file = save_vision_weights(ref, root / "vit.safetensors")
    args = ["openflamingo", str(root / "checkpoint.pt"), "--lm", str(lm_dir), "--vision", vit]
    assert main([*args, "--pretrained", str(vision_file), "--out", str(root / "vlm")]) == 0
    model, processor = vlm.from_pretrained(root / "vlm", verbose=False)
    return ref, tokenizer, image_processor, model.eval(), processor


@pytest.mark.parametrize("family", sorted(CASES))
def test_logits_equal_the_reference_on_interleaved_prompts(converted, family):
    ref, tokenizer, _, model, processor = converted(family)
    batch = tokenizer(PROMPTS, padding=True, return_tensors="pt")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    # Our processor reads the prompts into the same ids: same tokens, same added ids.
    for i, prompt in enumerate(PROMPTS):
        assert processor.encode(processor.interleaved_segments(prompt))[0] == ids[i][mask[i].bool()].tolist()
    torch.manual_seed(1)
    images = torch.randn(2, 2, 3, 32, 32)  # (B, T, C, H, W); sample 1 uses only its first
    expected = reference_logits(ref, images, ids, mask)
    with torch.no_grad():
        got = model(images, ids, attention_mask=mask).logits
    assert got.shape == expected.shape  # the same vocabulary: <|endofchunk|>, <image>, <PAD>, no padding rows
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=0)
    # The images matter: text after an image changes with it, text before the first does not.
    assert_images_matter(model, got, ids, mask, by=1e-3)


def test_config_records_their_architecture(converted):
    _, tokenizer, image_processor, model, processor = converted("gpt_neox")
    cfg = model.config
    assert (cfg.resampler.project, cfg.resampler.media_time, cfg.resampler.num_latents, cfg.resampler.depth) == (
        False,
        False,
        64,
        6,
    )
    assert cfg.cross_attn.layer_indices(4) == model.cross_attn_layers == [0, 1, 2, 3]
    assert cfg.added_tokens == ["<|endofchunk|>", "<image>", "<PAD>"] and cfg.pad_token == "<PAD>"
    assert cfg.lm.vocab_size == len(tokenizer)  # their resize drops the LM's 13 padding rows
    for token in cfg.added_tokens:
        assert processor.tokenizer.convert_tokens_to_ids(token) == tokenizer.convert_tokens_to_ids(token)
    assert processor.pad_token_id == tokenizer.pad_token_id
    # The same image transform (open_clip's for the tower).
    from PIL import Image

    image = Image.new("RGB", (40, 50), (200, 30, 10))
    assert torch.equal(processor.image_transform(image), image_processor(image))


@pytest.mark.parametrize("family", sorted(CASES))
def test_greedy_generation_gives_the_reference_tokens(converted, of_shims, family):
    ref, tokenizer, _, model, _ = converted(family)
    eoc = tokenizer.convert_tokens_to_ids("<|endofchunk|>")
    torch.manual_seed(2)
    images = torch.randn(1, 2, 3, 32, 32)
    for prompt in ["a cat<image>a red circle<|endofchunk|><image>", "<image>the"]:
        batch = tokenizer([prompt], return_tensors="pt")
        ids = batch["input_ids"]
        n = int((ids == model.image_token_id).sum())
        with torch.no_grad():
            theirs = ref.generate(
                images[:, :n, None], ids, batch["attention_mask"], max_new_tokens=12, do_sample=False, num_beams=1
            )[0, ids.shape[1] :].tolist()
        theirs = theirs[: theirs.index(eoc)] if eoc in theirs else theirs
        ours = generate(model, images[:, :n], ids, max_new_tokens=12, stop_token_ids=(eoc,)).tokens[0]
        assert ours == theirs
        assert len(ours) >= 3


def test_safetensors_checkpoint_converts_the_same(converted, tiny_vit, tmp_path, of_shims):
    ref, *_ = converted("llama")
    state = save_checkpoint(ref, tmp_path / "checkpoint.safetensors")
    torch.save(state, tmp_path / "checkpoint.pt")
    assert read_checkpoint(tmp_path / "checkpoint.safetensors").keys() == state.keys()
    lm_dir = ref.lang_encoder.config._name_or_path
    vision_file = save_vision_weights(ref, tmp_path / "vit.safetensors")
    outs = []
    for name in ("checkpoint.safetensors", "checkpoint.pt"):
        out = convert_openflamingo(
            tmp_path / name, lm=lm_dir, vision=tiny_vit, pretrained=str(vision_file), out_dir=tmp_path / f"out-{name}"
        )
        outs.append((out / "model.safetensors").read_bytes())
    assert outs[0] == outs[1]


class Payload:
    """Unpickling this runs os.makedirs: a checkpoint that carries it must be refused unread."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def test_a_pickled_payload_is_refused(tmp_path, caplog):
    marker = tmp_path / "payload-ran"
    state = {"perceiver.latents": torch.zeros(4, 8), "extra": Payload(str(marker))}
    torch.save(state, tmp_path / "checkpoint.pt")
    with pytest.raises(UnsafeFileError, match="not unpickled"):
        read_checkpoint(tmp_path / "checkpoint.pt")
    args = ["openflamingo", str(tmp_path / "checkpoint.pt"), "--lm", str(tmp_path), "--out", str(tmp_path / "o")]
    assert main(args) == 1
    assert "not unpickled" in caplog.text
    assert not marker.exists()
    assert not (tmp_path / "o").exists()


def test_mpt_is_refused_with_a_reason(tiny_vit, tmp_path, of_shims):
    """transformers' MPT builds without remote code, and OpenFlamingo runs on it, but its
    decoder calls its blocks with a fixed argument list: vlm's per-call media state (a
    keyword argument) cannot reach the cross-attention, so conversion stops and says why."""
    lm_dir = make_lm(tmp_path / "lm", "mpt")
    ref, _, tokenizer = build_reference(tiny_vit, lm_dir, every=2)
    ids = tokenizer(PROMPTS[:1], return_tensors="pt")["input_ids"]
    assert reference_logits(ref, torch.randn(1, 2, 3, 32, 32), ids, None).shape[-1] == len(tokenizer)
    save_checkpoint(ref, tmp_path / "checkpoint.pt")
    vision_file = save_vision_weights(ref, tmp_path / "vit.safetensors")
    with pytest.raises(ValueError, match="cannot run with vlm's cross-attention.*keyword arguments"):
        convert_openflamingo(
            tmp_path / "checkpoint.pt",
            lm=str(lm_dir),
            vision=tiny_vit,
            pretrained=str(vision_file),
            out_dir=tmp_path / "out",
        )
    assert not (tmp_path / "out").exists()


def test_wrong_lm_is_named(converted, tiny_vit, tmp_path, of_shims):
    """A checkpoint converted against another LM than its own fails on its embedding rows."""
    ref, *_ = converted("llama")
    save_checkpoint(ref, tmp_path / "checkpoint.pt")
    from transformers import AutoModelForCausalLM

    other = make_lm(tmp_path / "other", "llama")
    lm = AutoModelForCausalLM.from_pretrained(other)
    with torch.no_grad():  # same shapes, other weights
        lm.get_input_embeddings().weight.add_(1.0)
    lm.save_pretrained(other)
    vision_file = save_vision_weights(ref, tmp_path / "vit.safetensors")
    with pytest.raises(ValueError, match="is this the LM it was trained with"):
        convert_openflamingo(
            tmp_path / "checkpoint.pt",
            lm=str(other),
            vision=tiny_vit,
            pretrained=str(vision_file),
            out_dir=tmp_path / "o",
        )


def test_parser_imports_without_torch():
    import subprocess

    code = "import sys, vlm.convert as c; c.build_parser().parse_args(['openflamingo', 'x.pt', '--out', 'o']); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_openai_towers_get_the_quick_gelu_they_were_trained_with():
    """open_clip >= 2.29 builds ViT-L-14 with GELU even for the openai tag (it only warns);
    the releases' tower, built by open_clip 2.x from that tag, used QuickGELU."""
    from vlm.convert import openflamingo_vision

    assert openflamingo_vision("ViT-L-14", "openai").model_kwargs == {"force_quick_gelu": True}
    assert openflamingo_vision("ViT-L-14-quickgelu", "openai").model_kwargs == {}
    assert openflamingo_vision("ViT-L-14", "laion2b_s32b_b82k").model_kwargs == {}
    openflamingo_vision("ViT-L-14", "openai").validate()  # an allowed config key
