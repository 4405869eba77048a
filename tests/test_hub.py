"""Hub conventions: repo ids through the Hub cache, push_to_hub, generation_config.json,
and the call shapes users of transformers expect (pixel_values, model.generate(**batch))."""

import json
import shutil
import warnings
from pathlib import Path

import huggingface_hub
import huggingface_hub.constants
import huggingface_hub.file_download
import pytest
import torch
from conftest import make_checkpoint, shape_image

import vlm
from vlm.hub import CHECKPOINT_FILES
from vlm.tasks import CAPTION, SKETCH, VQA, check_generation_config

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def hub_cache(root: Path, repo_id: str, folder: Path, ref: str = "main") -> Path:
    """``folder``'s files laid out in a Hub cache under ``root`` as the repo at ``ref``."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    for file in folder.iterdir():
        shutil.copy(file, snapshot / file.name)
    (repo / "refs").mkdir()
    (repo / "refs" / ref).write_text(COMMIT)
    return repo


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def logits_of(model, processor):
    segments = VQA.prompt(processor, "What color is it?")
    batch = processor([segments], [[shape_image("red")]])
    with torch.no_grad():
        return model(**batch).logits


def test_repo_id_resolves_from_the_hub_cache_offline(tmp_path, offline):
    folder = make_checkpoint(tmp_path, gates=0.5)
    cache = tmp_path / "hub"
    hub_cache(cache, "someone/tiny-vlm", folder, ref="v1")
    model, processor = vlm.from_pretrained(folder, verbose=False)
    by_id, by_id_processor = vlm.from_pretrained("someone/tiny-vlm", verbose=False, revision="v1", cache_dir=cache)
    assert torch.equal(logits_of(model, processor), logits_of(by_id, by_id_processor))

    with pytest.raises(FileNotFoundError, match="not in the cache") as info:
        vlm.from_pretrained("someone/tiny-vlm", verbose=False, revision="v2", cache_dir=cache)
    assert "hf download someone/tiny-vlm" in str(info.value)
    with pytest.raises(FileNotFoundError, match="no such folder"):
        vlm.from_pretrained(str(tmp_path / "missing"), verbose=False)
    with pytest.raises(ValueError, match="revision"):
        vlm.from_pretrained(folder, verbose=False, revision="v1")


def test_local_files_only_never_downloads(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("the network was used")

    monkeypatch.setattr(huggingface_hub.file_download, "get_session", no_network, raising=False)
    with pytest.raises(FileNotFoundError, match="not in the cache"):
        vlm.from_pretrained("someone/absent", verbose=False, local_files_only=True, cache_dir=tmp_path)


def test_push_to_hub_uploads_the_checkpoint_folder(make_model, tmp_path, monkeypatch):
    model, processor = make_model()
    sent = {}

    def create_repo(self, repo_id, **kwargs):
        sent["created"] = (repo_id, kwargs.get("private"))

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        # The real files, read while the call would send them.
        sent["repo"], sent["revision"] = repo_id, kwargs.get("revision")
        sent["files"] = {p.name: p.read_bytes() for p in Path(folder_path).iterdir()}
        return "commit-info"

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    assert vlm.push_to_hub(model, "me/tiny-vlm", private=True, revision="dev") == "commit-info"
    assert sent["created"] == ("me/tiny-vlm", True) and sent["revision"] == "dev"
    assert sorted(sent["files"]) == sorted(CHECKPOINT_FILES)
    card = sent["files"]["README.md"].decode()
    assert card.startswith("---\n") and "library_name: vlm" in card
    assert 'vlm.from_pretrained("me/tiny-vlm")' in card
    assert f"{sum(p.numel() for p in model.trainable_state_dict().values()):,}" in card

    # The uploaded files are a checkpoint that loads to the same model.
    folder = tmp_path / "uploaded"
    folder.mkdir()
    for name, data in sent["files"].items():
        (folder / name).write_bytes(data)
    again, _ = vlm.from_pretrained(folder, verbose=False)
    assert torch.equal(logits_of(model, processor), logits_of(again, processor))

    # save_pretrained(push_to_hub=True) sends the folder it wrote, named after it by default.
    vlm.save_pretrained(model, tmp_path / "tiny-vlm-2", push_to_hub=True)
    assert sent["repo"] == "tiny-vlm-2"
    assert sent["files"] == {p.name: p.read_bytes() for p in (tmp_path / "tiny-vlm-2").iterdir()}


def test_a_model_card_already_in_the_folder_is_kept(make_model, tmp_path):
    model, _ = make_model()
    folder = vlm.save_pretrained(model, tmp_path / "ckpt")
    (folder / "README.md").write_text("# my notes\n")
    vlm.save_pretrained(model, folder)
    assert (folder / "README.md").read_text() == "# my notes\n"
    vlm.save_pretrained(model, folder, model_card="# new card\n")
    assert (folder / "README.md").read_text() == "# new card\n"


def test_a_checkpoint_from_before_generation_config_loads_unchanged(trained_model, tmp_path):
    model, processor = trained_model()
    folder = vlm.save_pretrained(model, tmp_path / "ckpt")
    (folder / "generation_config.json").unlink()  # as saved before checkpoints carried one
    (folder / "README.md").unlink()
    old, _ = vlm.from_pretrained(folder, verbose=False)
    assert old.generation_defaults is None
    assert torch.equal(logits_of(model, processor), logits_of(old, processor))
    for task in (CAPTION, VQA, SKETCH):
        assert task.generation_config(old) == task.generation_config()


def test_generation_config_json_sets_the_apps_defaults(make_model, tmp_path):
    model, processor = make_model()
    folder = vlm.save_pretrained(model, tmp_path / "ckpt")
    saved = json.loads((folder / "generation_config.json").read_text())
    assert saved["tasks"]["sketch"]["max_new_tokens"] == SKETCH.decoding.max_new_tokens

    saved["max_new_tokens"] = 7  # the top level: model.generate and every task without its own
    saved["tasks"]["sketch"] = {"max_new_tokens": 99}
    del saved["tasks"]["caption"]
    (folder / "generation_config.json").write_text(json.dumps(saved))
    loaded, _ = vlm.from_pretrained(folder, verbose=False)
    assert SKETCH.generation_config(loaded).max_new_tokens == 99
    assert SKETCH.generation_config(loaded, max_new_tokens=5).max_new_tokens == 5  # the user's setting wins
    assert CAPTION.generation_config(loaded).max_new_tokens == CAPTION.decoding.max_new_tokens  # its own defaults
    batch = processor([VQA.prompt(processor, "What color?")], [[shape_image("red")]])
    out = loaded.generate(**batch, stop_token_ids=())
    assert len(out.tokens[0]) == 7

    # Saved again, the same defaults go along.
    again = vlm.save_pretrained(loaded, tmp_path / "again")
    assert json.loads((again / "generation_config.json").read_text())["tasks"]["sketch"] == {"max_new_tokens": 99}


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"max_new_token": 5}, "unknown generation option max_new_token; supported: max_new_tokens"),
        ({"tasks": {"sketch": {"temperature": 0}}}, "tasks.sketch: temperature must be > 0"),
        ({"tasks": {"poetry": {}}}, "unknown task poetry"),
        ({"tasks": []}, "expected an object"),
    ],
)
def test_a_bad_generation_config_is_named(content, message):
    with pytest.raises(ValueError, match=message) as info:
        check_generation_config(content, "ckpt/generation_config.json")
    assert str(info.value).startswith("ckpt/generation_config.json: ")


def test_generate_takes_the_processors_batch(trained_model):
    model, processor = trained_model()
    prompts = [VQA.prompt(processor, "What color is it?"), VQA.prompt(processor, "Is it a red circle or not?")]
    images = [[shape_image("red")], [shape_image("blue", "square")]]
    left = processor(prompts, images, padding_side="left")
    right = processor(prompts, images)  # right-padded, with labels: generate re-pads it
    assert set(right) == {"input_ids", "attention_mask", "labels", "pixel_values"}
    expected = model.generate(left["pixel_values"], left["input_ids"], left["attention_mask"], max_new_tokens=5)
    assert model.generate(**right, max_new_tokens=5).tokens == expected.tokens
    assert model.generate(**left, max_new_tokens=5).tokens == expected.tokens

    with pytest.raises(TypeError, match=r"unknown generation option max_length; supported: max_new_tokens, "):
        model.generate(**left, max_length=5)
    with pytest.raises(TypeError, match="temprature, top_kk"):
        model.generate(**left, temprature=0.5, top_kk=3)


def test_images_is_the_old_name_of_pixel_values(trained_model):
    model, processor = trained_model()
    batch = processor([VQA.prompt(processor, "What color is it?")], [[shape_image("red")]])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        old = batch["images"]
    assert old is batch["pixel_values"]
    assert any(issubclass(w.category, DeprecationWarning) and "pixel_values" in str(w.message) for w in caught)
    with torch.no_grad():
        new = model(**batch).logits
        assert torch.equal(new, model(images=old, input_ids=batch["input_ids"]).logits)
        assert torch.equal(new, model(old, batch["input_ids"]).logits)  # positional, as before
    assert model.generate(images=old, input_ids=batch["input_ids"], max_new_tokens=3).tokens == (
        model.generate(**batch, max_new_tokens=3).tokens
    )
    with pytest.raises(TypeError, match="not both"):
        model(pixel_values=old, images=old, input_ids=batch["input_ids"])
    moved = batch.to("cpu")
    assert set(moved) == set(batch) and moved["pixel_values"].device.type == "cpu"


def test_a_second_adapter_shares_the_backbones(trained_model, tmp_path):
    first, processor = trained_model()
    torch.manual_seed(1)
    other, _ = trained_model(every=3)  # another adapter layout on the same backbones
    folder = vlm.save_pretrained(other, tmp_path / "other")
    before = logits_of(first, processor)

    second, second_processor = vlm.from_pretrained(folder, verbose=False, share=(first, processor))
    alone, alone_processor = vlm.from_pretrained(folder, verbose=False)
    assert torch.equal(logits_of(second, second_processor), logits_of(alone, alone_processor))
    assert torch.equal(logits_of(first, processor), before)  # the first model is unchanged
    assert second_processor.tokenizer is processor.tokenizer

    # One copy of the frozen tensors: every backbone tensor of the second model is the first's.
    def frozen(model):
        named = [*model.vision.named_parameters(), *model.lm.named_parameters(), *model.lm.named_buffers()]
        return {name: t for name, t in named if ".xattn." not in f".{name}"}

    assert frozen(second).keys() == frozen(first).keys()
    assert all(t is frozen(first)[name] for name, t in frozen(second).items())
    assert second.cross_attn_layers == other.cross_attn_layers != first.cross_attn_layers
    storages = {p.untyped_storage().data_ptr() for m in (first, second) for p in m.parameters()}
    assert len(storages) == len({p.untyped_storage().data_ptr() for p in first.parameters()}) + len(
        second.trainable_state_dict()
    )

    with pytest.raises(ValueError, match="same vision tower, LM"):
        vlm.create_model_and_transforms(
            {**second.config.to_dict(), "lm": {**second.config.to_dict()["lm"], "dtype": "bfloat16"}},
            verbose=False,
            share=(first, processor),
        )


def test_a_second_adapter_shares_an_lm_already_converted_for_inference(trained_model, tmp_path):
    # The apps convert the first model's LM (lm_weights "auto": fp16 weights, the head too)
    # before a task's adapter is loaded onto it; a tied head must stay tied in the second.
    from vlm import factory
    from vlm.quantize import apply_lm_weights

    default, processor = trained_model("gpt2")
    torch.manual_seed(1)
    sketch, _ = trained_model("gpt2", every=3)
    assert default.head.tied
    folder = vlm.save_pretrained(sketch, tmp_path / "sketch")
    apply_lm_weights(default, "float16")
    loaded, loaded_processor = factory.from_pretrained(folder, verbose=False, share=(default, processor))
    assert loaded.head.tied and loaded.lm.get_input_embeddings().weight is default.lm.get_input_embeddings().weight
    alone = apply_lm_weights(factory.from_pretrained(folder, verbose=False)[0], "float16")
    assert torch.equal(logits_of(apply_lm_weights(loaded, "float16"), loaded_processor), logits_of(alone, processor))


def test_a_tasks_bundled_adapter_is_its_default(trained_model, tmp_path, monkeypatch):
    from vlm import factory

    default, processor = trained_model()
    torch.manual_seed(1)
    sketch, _ = trained_model(every=3)
    monkeypatch.setattr(factory, "DEFAULT_CHECKPOINT", vlm.save_pretrained(default, tmp_path / "default"))
    monkeypatch.setattr(factory, "TASK_CHECKPOINTS", {"sketch": tmp_path / "sketch"})

    # No sketch adapter bundled: the default model.
    assert factory.load_model(verbose=False, task="sketch")[0].cross_attn_layers == default.cross_attn_layers
    vlm.save_pretrained(sketch, tmp_path / "sketch")
    loaded, loaded_processor = factory.load_model(verbose=False, task="sketch", share=(default, processor))
    assert loaded.cross_attn_layers == sketch.cross_attn_layers
    assert loaded.lm.get_input_embeddings().weight is default.lm.get_input_embeddings().weight
    assert torch.equal(logits_of(loaded, loaded_processor), logits_of(sketch, processor))
    # --model wins, and other tasks keep the default.
    assert factory.load_model(tmp_path / "default", verbose=False, task="sketch")[0].cross_attn_layers == (
        default.cross_attn_layers
    )
    assert factory.load_model(verbose=False, task="vqa")[0].cross_attn_layers == default.cross_attn_layers
