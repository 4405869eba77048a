"""The prefix cache (issue #19): the model skips the frozen layers below the first
cross-attention layer exactly; cache files are fingerprinted, rebuilt when stale and
never read half-written; the loader delivers each sample's prefix; the trainer uses it,
resumes after SIGKILL bit for bit, and says why ``auto`` leaves it off."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import set_gates, shape_image
from safetensors.torch import load_file

import vlm
from vlm.tiny import FAMILIES, make_tiny_lm, tiny_config
from vlm_train import checkpoint as ckpt
from vlm_train.data import prefix_cache
from vlm_train.data.loader import LoaderConfig, SourceConfig, make_loader
from vlm_train.data.shards import ShardWriter, caption_sample, image_bytes, qa_sample
from vlm_train.train import cast_frozen
from vlm_train.train import main as train_main

ROOT = Path(__file__).resolve().parents[1]
COLORS = ["red", "blue", "purple", "green", "cyan", "yellow", "orange", "white"]


def _model(lm_dir, layers=(2,), seed=0):
    cfg = tiny_config(lm_dir)
    cfg.cross_attn.layers = list(layers)
    torch.manual_seed(seed)
    model, processor = vlm.create_model_and_transforms(cfg, verbose=False)
    set_gates(model, 0.8)
    with torch.no_grad():
        for p in model.trainable_state_dict().values():
            p.add_(torch.randn_like(p) * 0.1)
    return model, processor


def _batch(processor, texts):
    encoded, pixels = [], []
    for i, (q, a) in enumerate(texts):
        encoded.append(processor.encode(processor.chat_segments([(q, a)], images_per_turn=[1])))
        pixels.append(processor.transform_images([shape_image(COLORS[i % len(COLORS)])]))
    return processor.collate(encoded, pixels)


TEXTS = [
    ("what colour is the shape?", "red"),
    ("how many objects are there? answer with a long sentence", "there are three objects."),
    ("is there a circle?", "yes"),
]


def _cached_prefix(model, batch):
    """Each sample's prefix computed alone and padded, as the loader collates the cache."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    rows = []
    for i in range(ids.shape[0]):
        n = int(mask[i].sum())
        rows.append(model.prefix_hidden_states(ids[i : i + 1, :n], mask[i : i + 1, :n])[0])
    out = rows[0].new_zeros(ids.shape[0], ids.shape[1], rows[0].shape[-1])
    for i, r in enumerate(rows):
        out[i, : r.shape[0]] = r
    return out


def _loss_and_grads(model, batch, prefix=None, autocast=None):
    model.zero_grad(set_to_none=True)
    with autocast or torch.autocast("cpu", enabled=False):
        out = model(
            batch["pixel_values"], batch["input_ids"], batch["attention_mask"], batch["labels"], False, prefix=prefix
        )
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("family", FAMILIES)
def test_fp32_loss_and_every_gradient_equal_with_and_without_the_cache(tiny_lm_dirs, family):
    model, processor = _model(tiny_lm_dirs[family])
    model.embed.new_rows.requires_grad_(False)  # as the trainer holds them with the cache on
    model.train()
    batch = _batch(processor, TEXTS)
    loss, grads = _loss_and_grads(model, batch)
    prefix = _cached_prefix(model, batch)
    loss_c, grads_c = _loss_and_grads(model, batch, prefix)
    assert torch.allclose(loss, loss_c, rtol=0, atol=1e-6), (loss, loss_c)
    assert grads.keys() == grads_c.keys() and len(grads) > 5
    for name in grads:
        assert torch.allclose(grads[name], grads_c[name], rtol=0, atol=1e-6), name
    # The cached run really skipped the layers below the first cross-attention layer.
    calls = []
    hook = model.decoder_layers()[0].decoder_layer.register_forward_hook(lambda *a: calls.append(1))
    _loss_and_grads(model, batch, prefix)
    hook.remove()
    assert not calls


BF16_TOL = 2e-2
"""bf16 (frozen weights stored in bf16, autocast): the cache is bit-identical per sample,
but a batch of one and a padded batch pick different kernels, so loss and gradients
agree to bf16's precision: within 2e-2 relative to each tensor's largest entry."""


def test_bf16_within_the_stated_tolerance(tiny_lm_dirs):
    model, processor = _model(tiny_lm_dirs["llama"])
    model.embed.new_rows.requires_grad_(False)
    cast_frozen(model, torch.bfloat16)
    model.train()
    batch = _batch(processor, TEXTS)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16)
    loss, grads = _loss_and_grads(model, batch, autocast=autocast)
    with autocast:
        prefix = _cached_prefix(model, batch)
    assert prefix.dtype == torch.bfloat16
    loss_c, grads_c = _loss_and_grads(model, batch, prefix, autocast=autocast)
    assert abs(loss.item() - loss_c.item()) <= BF16_TOL * abs(loss.item())
    for name in grads:
        scale = grads[name].abs().max().item() + 1e-12
        assert (grads[name] - grads_c[name]).abs().max().item() <= BF16_TOL * scale, name


# ---------------------------------------------------------------------- cache files


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("prefix")
    make_tiny_lm(root / "lm", "llama", chat=True)
    make_tiny_lm(root / "lm2", "llama", seed=1, chat=True)
    with ShardWriter(root / "caps", "caps", max_samples=4) as w:
        for i, c in enumerate(COLORS):
            w.write(caption_sample(f"c{i}", image_bytes(shape_image(c)), f"a {c} circle"))
    with ShardWriter(root / "qa", "qa", max_samples=3) as w:
        for i, c in enumerate(COLORS[:6]):
            w.write(qa_sample(f"q{i}", image_bytes(shape_image(c)), [("what colour is it?", c)]))
    return root


def _sources(root):
    return [SourceConfig(str(root / "caps"), "caption"), SourceConfig(str(root / "qa"), "qa", weight=2.0)]


def test_stale_or_foreign_caches_are_rejected_and_rebuilt(data, tmp_path):
    model, processor = _model(data / "lm")
    sources = [SourceConfig(str(data / "caps"), "caption")]
    cache = str(tmp_path / "cache")
    prints, report = prefix_cache.ensure(model, processor, sources, "fp32", cache, log=lambda m: None)
    assert report.built == 2 and report.samples == 8 and report.bytes > 0
    again, report = prefix_cache.ensure(model, processor, sources, "fp32", cache, log=lambda m: None)
    assert again == prints and report.built == 0 and report.fresh == 2
    # Another layer index, another LM, another dtype, other added rows: another fingerprint,
    # so the old file is never opened; a new one is built.
    for other in (
        _model(data / "lm", layers=(1, 3))[0],
        _model(data / "lm2")[0],
    ):
        fp, report = prefix_cache.ensure(other, processor, sources, "fp32", cache, log=lambda m: None)
        assert fp != prints and report.built == 2
    fp, report = prefix_cache.ensure(model, processor, sources, "bf16", cache, log=lambda m: None)
    assert fp != prints and report.built == 2
    with torch.no_grad():
        model.embed.new_rows.add_(1.0)
    fp, _ = prefix_cache.ensure(model, processor, sources, "fp32", cache, log=lambda m: None)
    assert fp != prints
    with torch.no_grad():
        model.embed.new_rows.sub_(1.0)

    # Changed text: the shard's hash no longer matches, the cache is rebuilt.
    shards = tmp_path / "shards"
    with ShardWriter(shards, "caps", max_samples=4) as w:
        for i, c in enumerate(COLORS[:4]):
            w.write(caption_sample(f"c{i}", image_bytes(shape_image(c)), f"a {c} circle"))
    src = [SourceConfig(str(shards), "caption")]
    fp, _ = prefix_cache.ensure(model, processor, src, "fp32", log=lambda m: None)
    old = prefix_cache.PrefixLookup(fp)
    shard = str(shards / "caps-000000.tar")
    with ShardWriter(shards, "caps", max_samples=4) as w:
        for i, c in enumerate(COLORS[:4]):
            w.write(caption_sample(f"c{i}", image_bytes(shape_image(c)), f"a {c} square"))
    said = []
    _, report = prefix_cache.ensure(model, processor, src, "fp32", log=said.append)
    assert report.built == 1 and any("stale" in m for m in said)
    # A reader holding the ids of text the cache was not built from is refused, loudly.
    with pytest.raises(RuntimeError, match="does not match sample 'c0'"):
        old.get(shard, 0, "c0", [1, 2, 3])


def test_a_half_written_cache_is_never_read(data, tmp_path, monkeypatch):
    model, processor = _model(data / "lm")
    sources = [SourceConfig(str(data / "caps"), "caption")]
    cache = tmp_path / "cache"
    import safetensors.torch

    real = safetensors.torch.save_file

    def dies_midway(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:
            f.truncate(os.path.getsize(filename) // 2)
        raise KeyboardInterrupt  # the writer is killed after half the bytes

    monkeypatch.setattr(safetensors.torch, "save_file", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        prefix_cache.ensure(model, processor, sources, "fp32", str(cache), log=lambda m: None)
    assert not list(cache.glob("*.safetensors"))  # the final name never appeared
    monkeypatch.setattr(safetensors.torch, "save_file", real)
    # A leftover temporary file (a kill -9 leaves one) and a damaged file under the final
    # name are both ignored: the cache is built again and reads back whole.
    fp = prefix_cache.source_fingerprint(prefix_cache.model_fingerprint(model, "fp32", processor), "caption", 2048)
    first = prefix_cache.cache_path(data / "caps" / "caps-000000.tar", fp, cache)
    (cache / f".{first.name}.tmp-99999").write_bytes(b"\0" * 100)
    first.write_bytes(b"garbage")
    _, report = prefix_cache.ensure(model, processor, sources, "fp32", str(cache), log=lambda m: None)
    assert report.built == 2
    assert set(load_file(first)) == {"c0", "c1", "c2", "c3"}


def test_loader_with_workers_shuffling_and_a_mixture_delivers_each_samples_prefix(data, tmp_path):
    model, processor = _model(data / "lm")
    sources = _sources(data)
    cache = str(tmp_path / "cache")
    prints, _ = prefix_cache.ensure(model, processor, sources, "fp32", cache, log=lambda m: None)
    cfg = LoaderConfig(
        sources=sources, batch_size=2, num_workers=2, shuffle_buffer=10, prefix_cache_dir=cache, drop_last=False
    )
    loader = make_loader(cfg, processor, prefix=prefix_cache.PrefixLookup(prints, cache))
    seen = set()
    for batch in loader:
        if "input_ids" not in batch:
            continue
        assert batch["prefix"].shape[:2] == batch["input_ids"].shape
        for i, key in enumerate(batch["keys"]):
            n = int(batch["attention_mask"][i].sum())
            want = model.prefix_hidden_states(batch["input_ids"][i : i + 1, :n])[0]
            assert torch.allclose(batch["prefix"][i, :n], want, rtol=1e-5, atol=1e-5), key  # batched vs alone
            assert not batch["prefix"][i, n:].any()
            seen.add(key)
    assert seen == {f"c{i}" for i in range(8)} | {f"q{i}" for i in range(6)}


# ---------------------------------------------------------------------- trainer


@pytest.fixture(scope="module")
def workspace(data):
    torch.manual_seed(0)
    cfg = tiny_config(data / "lm")
    cfg.cross_attn.layers = [2]
    model, _ = vlm.create_model_and_transforms(cfg, verbose=False)
    vlm.save_pretrained(model, data / "init-l2")
    model0, _ = vlm.create_model_and_transforms(tiny_config(data / "lm"), verbose=False)
    vlm.save_pretrained(model0, data / "init-l0")
    return data


def args(root, run, init="init-l2", *extra):
    return [
        "--model.preset", str(root / init),
        "--data.sources", json.dumps([{"shards": str(root / "caps"), "kind": "caption"}]),
        "--data.shuffle_buffer", "0",
        "--data.num_workers", "0",
        "--data.batch_size", "4",
        "--optim.lr", "3e-3",
        "--optim.warmup_steps", "5",
        "--log_every", "1",
        "--tensorboard", "false",
        "--data.prefix_cache_dir", str(root / "cache"),
        "--checkpoint.dir", str(root / run),
        *extra,
    ]  # fmt: skip


def test_auto_says_why_the_cache_is_off(workspace, capsys):
    # Cross-attention from layer 0: no text-only prefix.
    assert train_main(args(workspace, "auto0", "init-l0", "--steps", "4", "--checkpoint.every", "4")) == 0
    assert "prefix cache off: cross-attention starts at layer 0" in capsys.readouterr().out
    # Eight samples, batch 4: two steps are one epoch.
    assert train_main(args(workspace, "auto1", "init-l2", "--steps", "2", "--checkpoint.every", "2")) == 0
    assert "prefix cache off: the run (2 batches a rank) sees its data at most once" in capsys.readouterr().out
    assert train_main(args(workspace, "auto3", "init-l2", "--steps", "3", "--checkpoint.every", "3")) == 0
    out = capsys.readouterr().out
    assert "prefix cache on: layers 0-1" in out and "embedding rows are held frozen" in out
    saved = load_file(workspace / "auto3" / "step-000003" / "model" / "model.safetensors")
    assert "embed.new_rows" in saved  # frozen, but still the checkpoint's


def test_sigkill_and_resume_with_the_cache_ends_with_the_same_weights(workspace):
    common = ["--steps", "30", "--checkpoint.every", "10", "--data.num_workers", "1", "--prefix_cache", "on"]
    assert train_main(args(workspace, "straight", "init-l2", *common)) == 0
    cmd = [sys.executable, "-m", "vlm_train.train", *args(workspace, "killed", "init-l2", *common)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (workspace / "killed" / "step-000010").is_dir() and time.time() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    found = ckpt.list_checkpoints(workspace / "killed")
    assert found and int(found[-1].name.split("-")[1]) < 30
    assert train_main(args(workspace, "killed", "init-l2", *common)) == 0
    a = load_file(workspace / "straight" / "step-000030" / "model" / "model.safetensors")
    b = load_file(workspace / "killed" / "step-000030" / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_ddp_and_fsdp2_train_with_the_cache(workspace, strategy):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    run = f"dist-{strategy}"
    extra = ["--steps", "8", "--checkpoint.every", "8", "--data.batch_size", "2", "--prefix_cache", "on"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port)]
    cmd += ["-m", "vlm_train.train", *args(workspace, run, "init-l2", *extra, "--parallel.strategy", strategy)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "prefix cache on" in done.stdout
    losses = [json.loads(line)["loss"] for line in (workspace / run / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 8 and losses[-1] < losses[0]
    saved = load_file(workspace / run / "step-000008" / "model" / "model.safetensors")
    assert "embed.new_rows" in saved and "decoder" not in " ".join(saved)


def test_vlm_data_cache_builds_what_the_trainer_then_finds(workspace, tmp_path, capsys):
    from vlm_train.data.cli import main as data_main

    cache = tmp_path / "cache"
    argv = ["cache", "--model", str(workspace / "init-l2"), "--shards", str(workspace / "caps"), "--kind", "caption"]
    assert data_main([*argv, "--cache-dir", str(cache)]) == 0
    out = capsys.readouterr().out
    assert "2 built" in out and "8 samples" in out and "per 1,000 samples" in out
    assert len(list(cache.glob("caps-*.prefix-*.safetensors"))) == 2
    run = args(workspace, "after-cli", "init-l2", "--steps", "3", "--checkpoint.every", "3", "--prefix_cache", "on")
    run[run.index("--data.prefix_cache_dir") + 1] = str(cache)
    assert train_main(run) == 0
    assert "0 built, 2 up to date" in capsys.readouterr().out


# ---------------------------------------------------------------------- prompt length


def test_new_checkpoints_use_an_empty_system_message_and_the_bundled_one_keeps_its_own():
    from vlm.config import get_preset
    from vlm.processor import Processor

    assert get_preset("default").system_prompt == ""
    bundled = json.loads((ROOT / "vlm" / "weights" / "default" / "config.json").read_text())
    assert bundled["config"]["system_prompt"] is None  # the checkpoint keeps the template's default prompt
    try:
        from transformers import AutoTokenizer

        from vlm.registry import smollm2_folder

        tok = AutoTokenizer.from_pretrained(str(smollm2_folder()), local_files_only=True)
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"SmolLM2 not available: {e}")
    lengths = {}
    for prompt in (None, ""):
        p = Processor(tok, None, system_prompt=prompt)
        segments = p.chat_segments([("What color is the shape?", "red")], images_per_turn=[1])
        ids, labels = p.encode(segments)
        lengths[prompt] = next(i for i, label in enumerate(labels) if label != -100)
        if prompt == "":
            assert segments[0].text.startswith("<|im_start|>system\n<|im_end|>\n<|im_start|>user\n")
            assert "SmolLM" not in "".join(s.text for s in segments)
    assert (lengths[None], lengths[""]) == (39, 23)
