"""Checkpoint hardening: a config or run folder from someone else cannot run code; weights
and trainer state load as plain data; checkpoints are durable, leftovers of a killed
write are cleaned up, a corrupt newest checkpoint falls back to the previous one, and
non-finite weights are refused."""

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import make_checkpoint, shape_image
from safetensors.torch import load_file, save_file

import vlm
from vlm.config import VisionConfig
from vlm.factory import CONFIG_FILE, WEIGHTS_FILE
from vlm.tiny import make_tiny_lm, tiny_config, tiny_vision_config
from vlm.vision import create_vision_encoder
from vlm_train import checkpoint as ckpt
from vlm_train.data.shards import ShardWriter, caption_sample, image_bytes
from vlm_train.train import main as train_main


class Payload:
    """Unpickling this creates ``marker``: proof that a loader ran code from a file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _poisoned_checkpoint(tmp_path, **vision) -> tuple:
    """A checkpoint folder whose config.json points the vision tower at a pickle payload
    (``"EVIL"`` in ``vision`` or its model_kwargs stands for the payload's path)."""
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"visual.conv1.weight": Payload(marker)}, evil)
    folder = make_checkpoint(tmp_path)
    meta = json.loads((folder / CONFIG_FILE).read_text())
    text = json.dumps({**meta["config"]["vision"], **vision}).replace('"EVIL"', json.dumps(str(evil)))
    meta["config"]["vision"] = json.loads(text)
    (folder / CONFIG_FILE).write_text(json.dumps(meta))
    return folder, marker


TINY_CLIP_KWARGS = tiny_vision_config().model_kwargs


@pytest.mark.parametrize(
    "vision, error",
    [
        # open_clip forwards weights_only to torch.load: false unpickles `pretrained`.
        (
            {"pretrained": "EVIL", "model_kwargs": {**TINY_CLIP_KWARGS, "weights_only": False}},
            r"model_kwargs: 'weights_only' is not allowed.*allowed: .*force_quick_gelu",
        ),
        # timm's create_model loads checkpoint_path itself.
        (
            {
                "kind": "timm",
                "name": "tf_efficientnet_lite0",
                "pretrained": None,
                "model_kwargs": {"checkpoint_path": "EVIL"},
            },
            r"model_kwargs: 'checkpoint_path' is not allowed.*allowed: .*drop_rate",
        ),
        # Nested open_clip tower configs: an HF text tower would load a model of its choosing.
        (
            {"model_kwargs": {**TINY_CLIP_KWARGS, "text_cfg": {"hf_model_name": "EVIL"}}},
            r"model_kwargs.text_cfg: 'hf_model_name' is not allowed",
        ),
        # A local weights file is read as plain tensors, never unpickled.
        ({"pretrained": "EVIL"}, r"evil.pt. is not unpickled"),
        ({"kind": "timm", "name": "tf_efficientnet_lite0", "pretrained": "EVIL", "model_kwargs": {}}, r"not unpickled"),
    ],
    ids=[
        "open_clip-weights_only",
        "timm-checkpoint_path",
        "open_clip-hf-text",
        "open_clip-pretrained",
        "timm-pretrained",
    ],
)
def test_config_json_cannot_make_the_vision_loader_run_code(tmp_path, vision, error):
    folder, marker = _poisoned_checkpoint(tmp_path, **vision)
    for load in (vlm.from_pretrained, vlm.load_model):
        with pytest.raises(ValueError, match=error):
            load(folder, verbose=False)
        assert not marker.exists(), f"{load.__name__} ran the payload"


def test_vision_weights_from_a_local_file_load_as_plain_tensors(tmp_path):
    import open_clip

    # A full open_clip checkpoint (as open_clip's training writes it: nested, "module."-prefixed).
    torch.manual_seed(1)
    cfg = tiny_vision_config()
    clip = open_clip.create_model(cfg.name, pretrained=None, force_image_size=cfg.image_size, **cfg.model_kwargs)
    state = {f"module.{k}": v for k, v in clip.state_dict().items()}
    torch.save({"epoch": 3, "state_dict": state}, tmp_path / "clip.pt")
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, tmp_path / "clip.safetensors")
    for file in ("clip.pt", "clip.safetensors"):
        encoder, _ = create_vision_encoder(VisionConfig(**{**vars(cfg), "pretrained": str(tmp_path / file)}))
        for name, p in encoder.tower.state_dict().items():
            assert torch.equal(p, clip.visual.state_dict()[name]), (file, name)
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        create_vision_encoder(VisionConfig(**{**vars(cfg), "pretrained": str(tmp_path / "nowhere.pt")}))


def test_vision_kwargs_allow_list_keeps_architecture_options():
    VisionConfig(kind="timm", model_kwargs={"drop_rate": 0.1, "img_size": 64}).validate()
    VisionConfig(
        kind="open_clip", name="ViT-B-32", model_kwargs={"force_quick_gelu": True, **TINY_CLIP_KWARGS}
    ).validate()
    with pytest.raises(ValueError, match="model_kwargs: 'drop_rate' must be"):
        VisionConfig(kind="timm", model_kwargs={"drop_rate": {"x": 1}}).validate()


# ---------------------------------------------------------------- training checkpoints


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny model folder and one shard of eight captions."""
    root = tmp_path_factory.mktemp("hardening")
    make_tiny_lm(root / "lm", "llama")
    torch.manual_seed(0)
    model, _ = vlm.create_model_and_transforms(tiny_config(root / "lm"), verbose=False)
    vlm.save_pretrained(model, root / "init")
    with ShardWriter(root / "shards", "caps", max_samples=8) as writer:
        for i, color in enumerate(["red", "blue", "green", "cyan", "yellow", "orange", "white", "purple"]):
            writer.write(caption_sample(f"s{i}", image_bytes(shape_image(color)), f"a {color} circle"))
    return root


def _args(workspace, run, *extra: str) -> list[str]:
    return [
        "--model.preset", str(workspace / "init"),
        "--data.sources", json.dumps([{"shards": str(workspace / "shards"), "kind": "caption"}]),
        "--data.shuffle_buffer", "0",
        "--data.num_workers", "0",
        "--data.batch_size", "4",
        "--tensorboard", "false",
        "--checkpoint.dir", str(run),
        *extra,
    ]  # fmt: skip


def _plant_step(workspace, run, trainer_obj) -> None:
    """A run folder with a complete-looking step-000010 whose trainer.pt holds ``trainer_obj``."""
    step = run / "step-000010"
    shutil.copytree(workspace / "init", step / "model")
    torch.save(trainer_obj, step / "trainer.pt")


def test_resume_auto_never_unpickles_trainer_state(workspace, tmp_path):
    marker = tmp_path / "pwned"
    run = tmp_path / "run"
    _plant_step(workspace, run, {"step": 10, "optimizer": Payload(marker)})
    with pytest.raises(ValueError, match=r"trainer.pt.*not unpickled"):
        train_main(_args(workspace, run, "--steps", "12"))
    assert not marker.exists()
    # A run folder of an older vlm (numpy RNG state pickled) is refused the same way.
    old = tmp_path / "old"
    _plant_step(workspace, old, {"step": 10, "rng": [{"numpy": np.random.get_state()}]})
    with pytest.raises(ValueError, match=r"not unpickled.*older vlm version"):
        train_main(_args(workspace, old, "--steps", "12"))


def test_trainer_state_is_plain_data(workspace, tmp_path):
    run = tmp_path / "run"
    assert train_main(_args(workspace, run, "--steps", "1", "--checkpoint.every", "1")) == 0
    state = torch.load(run / "step-000001" / "trainer.pt", weights_only=True)
    assert state["step"] == 1 and state["optimizer"]["state"]
    # The RNG states survive the plain round trip exactly.
    ckpt.set_rng_state(state["rng"][0])
    before = (np.random.rand(), torch.rand(3))
    torch.save(ckpt.rng_state(), tmp_path / "rng.pt")
    after = (np.random.rand(), torch.rand(3))
    ckpt.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    again = (np.random.rand(), torch.rand(3))
    assert after[0] == again[0] and torch.equal(after[1], again[1]) and before[0] != after[0]


def _save_step(model, root, step: int, keep: int = 5):
    state = {"step": step, "optimizer": {"state": {}, "param_groups": []}, "rng": [ckpt.rng_state()]}
    return ckpt.save(root, step, model, model.trainable_state_dict(), state, {"steps": 9}, keep)


def test_save_removes_what_a_killed_write_left(make_model, tmp_path):
    model, _ = make_model("llama")
    root = tmp_path / "run"
    leftover = root / ".step-000004.tmp-abc123"
    (leftover / "model").mkdir(parents=True)
    (leftover / "trainer.pt").write_bytes(b"half")
    unrelated = root / "notes"
    unrelated.mkdir()
    _save_step(model, root, 5)
    assert not leftover.exists() and unrelated.is_dir()
    assert sorted(p.name for p in root.iterdir()) == ["notes", "step-000005"]


def test_save_syncs_files_and_folders_before_the_rename(make_model, tmp_path, monkeypatch):
    import vlm.fileio

    opened, synced = {}, []  # fd -> path while open; the paths fsync'd, in order
    real_open = vlm.fileio.os.open

    def tracking_open(path, *a, **k):
        fd = real_open(path, *a, **k)
        opened[fd] = str(path)
        return fd

    monkeypatch.setattr(vlm.fileio.os, "open", tracking_open)
    monkeypatch.setattr(vlm.fileio.os, "fsync", lambda fd: synced.append(opened[fd]))
    model, _ = make_model("llama")
    _save_step(model, tmp_path / "run", 1)
    assert any(n.endswith("trainer.pt") and ".tmp-" in n for n in synced)  # before the rename
    assert any(n.endswith(WEIGHTS_FILE) and ".tmp-" in n for n in synced)
    assert synced[-1] == str(tmp_path / "run")  # then the rename itself


CORRUPTIONS = {
    "safetensors": lambda s: (s / "model" / WEIGHTS_FILE).write_bytes(b"\x00" * 40),
    "json": lambda s: (s / "model" / CONFIG_FILE).write_text("{not json"),
    "missing": lambda s: (s / "model" / WEIGHTS_FILE).unlink(),
    "trainer": lambda s: (s / "trainer.pt").write_bytes((s / "trainer.pt").read_bytes()[:100]),
}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_resume_auto_falls_back_past_an_unreadable_checkpoint(make_model, tmp_path, corruption):
    model, _ = make_model("llama")
    root = tmp_path / "run"
    for step in (1, 2):
        _save_step(model, root, step)
    CORRUPTIONS[corruption](root / "step-000002")
    said = []
    found = ckpt.load_resume("auto", root, log=said.append)
    assert found.path == root / "step-000001" and found.state["step"] == 1
    assert set(found.trainable) == set(model.trainable_state_dict())
    assert len(said) == 1 and "step-000002" in said[0] and "falling back to" in said[0] and "step-000001" in said[0]
    # No readable checkpoint at all: an error, not a silent fresh start over the run.
    CORRUPTIONS[corruption](root / "step-000001")
    with pytest.raises(ValueError, match="no readable checkpoint"):
        ckpt.load_resume("auto", root, log=said.append)


def test_pruning_after_a_fall_back_keeps_the_checkpoint_just_written(make_model, tmp_path):
    model, _ = make_model("llama")
    root = tmp_path / "run"
    for step in (1, 3):
        _save_step(model, root, step)
    CORRUPTIONS["safetensors"](root / "step-000003")
    assert ckpt.load_resume("auto", root, log=lambda _: None).path.name == "step-000001"
    _save_step(model, root, 2, keep=1)  # the resumed run's next checkpoint
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step-000002", "step-000003"]
    assert ckpt.load_resume("auto", root, log=lambda _: None).path.name == "step-000002"


def test_training_resumes_from_the_previous_checkpoint_when_the_newest_is_corrupt(workspace, tmp_path, capsys):
    run = tmp_path / "run"
    assert train_main(_args(workspace, run, "--steps", "2", "--checkpoint.every", "1")) == 0
    (run / "step-000002" / "model" / WEIGHTS_FILE).write_bytes(b"garbage")
    capsys.readouterr()
    assert train_main(_args(workspace, run, "--steps", "3", "--checkpoint.every", "1")) == 0
    out = capsys.readouterr().out
    assert "falling back to" in out and "resumed from" in out and "step-000001 at step 1" in out
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step-000001", "step-000002", "step-000003"]
    load_file(run / "step-000002" / "model" / WEIGHTS_FILE)  # rewritten whole


# ---------------------------------------------------------------- non-finite weights


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_with_their_name(tmp_path, value):
    folder = make_checkpoint(tmp_path)
    state = load_file(folder / WEIGHTS_FILE)
    victim = sorted(k for k in state if ".xattn." in k)[0]
    state[victim].view(-1)[0] = value
    save_file(state, folder / WEIGHTS_FILE)
    with pytest.raises(ValueError, match=f"{victim}.*(NaN|Inf)"):
        vlm.from_pretrained(folder, verbose=False)


def test_a_poisoned_checkpoint_runs_nothing_through_the_tools_or_the_demo(tmp_path, monkeypatch, capsys):
    """The proof of concept end to end: ``--model`` of each command-line tool and the demo's
    allowed model, pointed at a folder whose config names a pickle with a payload."""
    import os
    from pathlib import Path

    import streamlit as st
    from streamlit.testing.v1 import AppTest

    from vlm.apps.caption import main as caption_main
    from vlm.apps.sketch2html import main as sketch_main
    from vlm_train.eval.cli import main as eval_main

    folder, marker = _poisoned_checkpoint(tmp_path, pretrained="EVIL")
    image = tmp_path / "in.png"
    shape_image("red").save(image)
    runs = {
        "vlm-caption": lambda: caption_main([str(image), "--model", str(folder), "--out", str(tmp_path / "c.jsonl")]),
        "vlm-sketch2html": lambda: sketch_main([str(image), "--model", str(folder), "--out", str(tmp_path / "html")]),
        "vlm-eval": lambda: eval_main(["--model", str(folder), "--out", str(tmp_path / "e.json")]),
    }
    for name, run in runs.items():
        try:
            code = run()
        except (ValueError, SystemExit) as e:  # a clear error, or an exit with one
            code = getattr(e, "code", 1) or str(e)
        said = capsys.readouterr()
        assert code and "not unpickled" in said.err + said.out, f"{name} did not refuse the checkpoint: {said}"
        assert not marker.exists(), f"{name} ran the payload"

    monkeypatch.setenv("VLM_DEMO_MODEL", str(folder))
    monkeypatch.delenv("VLM_DEMO_MODELS", raising=False)
    app = str(Path(__file__).resolve().parents[1] / "demo" / "app.py")
    monkeypatch.setattr("sys.argv", [app])
    st.cache_resource.clear()
    at = AppTest.from_file(app, default_timeout=120).run()
    assert not at.exception and any("not unpickled" in e.value for e in at.error), [e.value for e in at.error]
    assert not marker.exists() and os.environ["VLM_DEMO_MODEL"] == str(folder), "the demo ran the payload"


# ---------------------------------------------------------------- the one atomic-write helper


def test_atomic_file_commits_whole_or_leaves_the_old_file(tmp_path):
    from vlm.fileio import AtomicFile, write_bytes, write_text

    target = tmp_path / "out.bin"
    write_text(target, "old")
    with pytest.raises(KeyboardInterrupt):
        with AtomicFile(target) as tmp:
            tmp.write_bytes(b"half")
            raise KeyboardInterrupt
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]
    write_bytes(target, b"new")
    assert target.read_bytes() == b"new" and sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]
    writer = AtomicFile(tmp_path / "later.bin")  # opened in one place, finished in another (a shard writer)
    writer.tmp.write_bytes(b"x")
    assert not (tmp_path / "later.bin").exists()
    assert writer.commit() == tmp_path / "later.bin" and not writer.tmp.exists()


def test_atomic_folder_replaces_keeps_or_leaves_nothing(tmp_path):
    from vlm.fileio import atomic_folder

    target = tmp_path / "model"
    with atomic_folder(target) as tmp:
        (tmp / "a").write_text("1")
    with atomic_folder(target) as tmp:  # replaces the folder that is there
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in target.iterdir()) == ["b"]
    with atomic_folder(target, replace=False) as tmp:  # someone else's copy wins
        (tmp / "c").write_text("3")
    assert sorted(p.name for p in target.iterdir()) == ["b"]
    with pytest.raises(RuntimeError):
        with atomic_folder(target) as tmp:
            (tmp / "d").write_text("4")
            raise RuntimeError("killed")
    assert sorted(p.name for p in target.iterdir()) == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary folder left
