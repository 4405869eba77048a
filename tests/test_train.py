"""The trainer on tiny random backbones: learning, DDP and FSDP2 (gloo), resume after
SIGKILL, the non-finite guard, config overrides."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from conftest import shape_image
from safetensors.torch import load_file

import vlm
from vlm.tiny import make_tiny_lm, tiny_config
from vlm_train import checkpoint as ckpt
from vlm_train.config import TrainConfig, apply_overrides, resolve
from vlm_train.data.shards import ShardWriter, caption_sample, image_bytes
from vlm_train.train import main as train_main
from vlm_train.train import mixture_step_s

# Two shards of four with the same number of caption tokens each (in the tiny tokenizer),
# so the mean of the two ranks' mean losses is exactly the single process's mean loss.
COLORS = ["red", "blue", "purple", "green", "cyan", "yellow", "orange", "white"]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny model folder and two shards of four captions each."""
    root = tmp_path_factory.mktemp("train")
    make_tiny_lm(root / "lm", "llama")
    torch.manual_seed(0)
    model, processor = vlm.create_model_and_transforms(tiny_config(root / "lm"), verbose=False)
    vlm.save_pretrained(model, root / "init")
    tokens = []
    with ShardWriter(root / "shards", "caps", max_samples=4) as writer:
        for i, color in enumerate(COLORS):
            caption = f"a {color} circle"
            tokens.append(len(processor.tokenizer(caption)["input_ids"]))
            writer.write(caption_sample(f"s{i}", image_bytes(shape_image(color)), caption))
    assert sum(tokens[:4]) == sum(tokens[4:])
    return root


def args(workspace, run: str, *extra: str) -> list[str]:
    return [
        "--model.preset", str(workspace / "init"),
        "--data.sources", json.dumps([{"shards": str(workspace / "shards"), "kind": "caption"}]),
        "--data.shuffle_buffer", "0",
        "--data.num_workers", "0",
        "--data.batch_size", "8",
        "--optim.lr", "3e-3",
        "--optim.warmup_steps", "5",
        "--log_every", "1",
        "--tensorboard", "false",
        "--checkpoint.dir", str(workspace / run),
        *extra,
    ]  # fmt: skip


def metrics(workspace, run: str) -> list[dict]:
    lines = (workspace / run / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_single_process_training_reduces_the_loss(workspace):
    assert train_main(args(workspace, "single", "--steps", "150", "--checkpoint.every", "150")) == 0
    losses = [m["loss"] for m in metrics(workspace, "single")]
    assert losses[-1] < losses[0] / 4, (losses[0], losses[-1])
    final = workspace / "single" / "step-000150" / "model"
    model, _ = vlm.from_pretrained(final, verbose=False)  # the export loads in the apps' format
    assert any(p.abs().sum() > 0 for n, p in model.trainable_state_dict().items() if n.endswith("attn_gate"))


def _torchrun(workspace, run: str, *extra: str, nproc: int = 2) -> subprocess.CompletedProcess:
    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(port)]
    cmd += ["-m", "vlm_train.train", *args(workspace, run, *extra)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_ddp_two_processes_follow_the_single_process_curve(workspace):
    steps = ["--steps", "20", "--checkpoint.every", "100"]
    assert train_main(args(workspace, "ref", *steps)) == 0
    _torchrun(workspace, "ddp", *steps, "--data.batch_size", "4", "--parallel.strategy", "ddp")
    ref = [m["loss"] for m in metrics(workspace, "ref")]
    ddp = [m["loss"] for m in metrics(workspace, "ddp")]
    assert len(ddp) == len(ref) == 20
    assert ref[-1] < ref[0] * 0.75, (ref[0], ref[-1])  # it does learn within these steps
    assert ddp == pytest.approx(ref, rel=2e-3, abs=2e-3)


def test_fsdp2_two_processes_train_checkpoint_and_resume(workspace):
    common = ["--data.batch_size", "4", "--parallel.strategy", "fsdp", "--checkpoint.every", "5"]
    common += ["--optim.ema_decay", "0.9"]  # the moving average of sharded weights
    _torchrun(workspace, "fsdp", "--steps", "10", *common)
    first = metrics(workspace, "fsdp")
    assert first[-1]["loss"] < first[0]["loss"]
    done = _torchrun(workspace, "fsdp", "--steps", "15", *common)
    assert "resumed from" in done.stdout and "step-000010" in done.stdout
    steps = [m["step"] for m in metrics(workspace, "fsdp")]
    assert steps[-5:] == [11, 12, 13, 14, 15]
    state = load_file(workspace / "fsdp" / "step-000015" / "model" / "model.safetensors")
    model, _ = vlm.from_pretrained(workspace / "fsdp" / "step-000015" / "model", verbose=False)
    assert set(state) == set(model.trainable_state_dict())
    average = load_file(workspace / "fsdp" / "step-000015" / "ema" / "model.safetensors")
    assert set(average) == set(state) and any(not torch.equal(average[k], state[k]) for k in state)
    assert "ema_eval_loss" not in metrics(workspace, "fsdp")[-1]  # no held-out data in this run
    assert torch.load(workspace / "fsdp" / "step-000015" / "trainer.pt", weights_only=True)["ema_updates"] == 15


def test_sigkill_and_resume_ends_with_the_same_weights(workspace):
    common = ["--steps", "30", "--checkpoint.every", "10", "--data.num_workers", "1", "--checkpoint.keep", "2"]
    common += ["--optim.ema_decay", "0.9"]  # the weights' moving average resumes bit for bit too
    assert train_main(args(workspace, "straight", *common)) == 0
    cmd = [sys.executable, "-m", "vlm_train.train", *args(workspace, "killed", *common)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (workspace / "killed" / "step-000010").is_dir() and time.time() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    found = ckpt.list_checkpoints(workspace / "killed")
    assert found and int(found[-1].name.split("-")[1]) < 30  # it really died mid-run
    for folder in (workspace / "killed").glob("step-*"):
        assert (folder / "trainer.pt").is_file() and (folder / "model" / "model.safetensors").is_file()
    assert train_main(args(workspace, "killed", *common)) == 0
    for part in ("model", "ema"):
        a = load_file(workspace / "straight" / "step-000030" / part / "model.safetensors")
        b = load_file(workspace / "killed" / "step-000030" / part / "model.safetensors")
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (part, k)
    assert len(ckpt.list_checkpoints(workspace / "killed")) == 2  # keep=2
    # What the killed run logged after its last checkpoint was dropped on resume.
    assert [m["step"] for m in metrics(workspace, "killed")] == list(range(1, 31))

    # Time slices: stop_at ends a run early with a checkpoint; the next call finishes the
    # same schedule, bit for bit.
    assert train_main(args(workspace, "sliced", *common, "--stop_at", "17")) == 0
    assert ckpt.list_checkpoints(workspace / "sliced")[-1].name == "step-000017"
    assert train_main(args(workspace, "sliced", *common)) == 0
    for part in ("model", "ema"):
        a = load_file(workspace / "straight" / "step-000030" / part / "model.safetensors")
        c = load_file(workspace / "sliced" / "step-000030" / part / "model.safetensors")
        assert a.keys() == c.keys() and all(torch.equal(a[k], c[k]) for k in a), part


def test_non_finite_steps_are_skipped_and_counted(workspace):
    assert (
        train_main(args(workspace, "nan", "--steps", "4", "--checkpoint.every", "1", "--debug_nan_steps", "[2]")) == 0
    )
    assert metrics(workspace, "nan")[-1]["bad_steps"] == 1

    def weights(step):
        return load_file(workspace / "nan" / f"step-{step:06d}" / "model" / "model.safetensors")

    # The third step (index 2) had a NaN loss: it was not applied; the next one was.
    w2, w3, w4 = weights(2), weights(3), weights(4)
    assert all(torch.equal(w2[k], w3[k]) for k in w2)
    assert any(not torch.equal(w3[k], w4[k]) for k in w3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(RuntimeError, match="3 consecutive steps had a non-finite loss"):
            train_main(
                args(workspace, "nan2", "--steps", "6", "--optim.max_bad_steps", "2", "--debug_nan_steps", "[0,1,2,3]")
            )
    # Skipped steps still advance the schedule, without PyTorch's call-order warning.
    assert not [w for w in caught if "lr_scheduler.step()" in str(w.message)]


def test_the_moving_average_of_the_weights_follows_its_rule_and_travels_with_the_run(workspace, capsys):
    from vlm_train.average import WeightAverage

    # The rule: the mean of the weights after each step until 1 / (1 - d) steps are in it,
    # then avg <- d * avg + (1 - d) * w. With d = 0.75: the mean of 1, 2, 4, 8, then EMA.
    p = torch.nn.Parameter(torch.zeros(3))
    average = WeightAverage({"w": p}, 0.75)
    for value in [1.0, 2.0, 4.0, 8.0, 16.0]:
        with torch.no_grad():
            p.fill_(value)
        average.update()
        if average.updates == 4:
            assert torch.allclose(average.average["w"], torch.full((3,), 15 / 4))
    assert torch.allclose(average.average["w"], torch.full((3,), 0.75 * 15 / 4 + 0.25 * 16)) and average.updates == 5
    with average.swapped_in():  # the model computes with the average inside, its own weights after
        assert torch.equal(p.detach(), average.average["w"])
    assert torch.equal(p.detach(), torch.full((3,), 16.0))
    with pytest.raises(ValueError, match=r"optim.ema_decay must be in \[0, 1\)"):
        resolve(None, ["--optim.ema_decay", "1", "--data.sources", '[{"shards": "x", "kind": "qa"}]'])

    # A run that switches the average on at a resume starts it from the resumed weights; the
    # held-out evaluation reports both; the export takes the average.
    held_out = json.dumps({"sources": [{"shards": str(workspace / "shards"), "kind": "caption"}], "num_workers": 0})
    run = ["--steps", "6", "--checkpoint.every", "3", "--eval.every", "3", "--eval.data", held_out]
    assert train_main(args(workspace, "ema", *run, "--stop_at", "3")) == 0
    assert not (workspace / "ema" / "step-000003" / "ema").exists()
    assert train_main(args(workspace, "ema", *run, "--optim.ema_decay", "0.5")) == 0
    assert "holds no moving average of the weights: it starts from the weights resumed" in capsys.readouterr().out
    last = workspace / "ema" / "step-000006"
    assert torch.load(last / "trainer.pt", weights_only=True)["ema_updates"] == 3
    own, averaged = load_file(last / "model" / "model.safetensors"), load_file(last / "ema" / "model.safetensors")
    before = load_file(workspace / "ema" / "step-000003" / "model" / "model.safetensors")
    trained = [k for k in own if not torch.equal(own[k], before[k])]
    assert trained  # the weights moved, and the average lies between (here: not on) either end
    assert all(not torch.equal(averaged[k], own[k]) and not torch.equal(averaged[k], before[k]) for k in trained)
    logged = metrics(workspace, "ema")[-1]
    assert logged["step"] == 6 and {"eval_loss", "ema_eval_loss", "ema_eval_exact_match"} <= set(logged)
    assert logged["ema_eval_loss"] != logged["eval_loss"]
    assert ckpt.export_latest(workspace / "ema", workspace / "ema-bf16") == last / "ema"
    exported = load_file(workspace / "ema-bf16" / "model.safetensors")
    assert all(torch.equal(exported[k], averaged[k].bfloat16()) for k in averaged)
    assert ckpt.export_latest(workspace / "ema", workspace / "ema-own", average=False) == last / "model"
    # Going on without the average drops it, and says so.
    assert train_main(args(workspace, "ema", *run, "--steps", "7")) == 0
    assert "optim.ema_decay is 0, so this run drops it" in capsys.readouterr().out
    assert not (workspace / "ema" / "step-000007" / "ema").exists()


def test_init_from_starts_a_run_and_its_resume_reads_the_checkpoint_alone(workspace, capsys):
    import shutil

    from vlm.factory import load_trainable

    model, _ = vlm.from_pretrained(workspace / "init", verbose=False)
    base = {k: v.detach().clone() for k, v in model.trainable_state_dict().items()}
    load_trainable(model, {k: v + 0.1 for k, v in base.items()}, source="test")
    vlm.save_pretrained(model, workspace / "start")
    run = args(workspace, "from-start", "--steps", "4", "--model.init_from", str(workspace / "start"))
    assert train_main([*run, "--stop_at", "1"]) == 0
    first = load_file(workspace / "from-start" / "step-000001" / "model" / "model.safetensors")
    for k, v in base.items():  # one step (at most ~10 lr, the gates') from init_from's weights, 0.1 from the preset's
        assert (first[k] - v - 0.1).abs().max() < 0.05 < (first[k] - v).abs().min(), k
    shutil.rmtree(workspace / "start")  # a resume needs its checkpoint only
    capsys.readouterr()
    assert train_main(run) == 0
    assert "model.init_from is not read" in capsys.readouterr().out
    assert ckpt.list_checkpoints(workspace / "from-start")[-1].name == "step-000004"


def test_time_budget_fits_the_schedule_and_survives_a_resume(workspace):
    from vlm_train.train import fit_steps

    assert fit_steps(20, elapsed=10.0, step_s=0.5, budget=110.0) == 20 + 180  # 0.9 * 100 s / 0.5
    assert fit_steps(20, elapsed=200.0, step_s=0.5, budget=110.0) == 20  # over budget: stop now

    # Whatever the machine's speed, the run ends at the step count it chose at step 20,
    # with the cosine schedule completed there and the count kept in its checkpoint.
    run = args(workspace, "budget", "--time_budget_s", "4", "--steps", "1000", "--checkpoint.every", "1000")
    assert train_main(run) == 0
    logged = metrics(workspace, "budget")
    fitted = [m["fitted_steps"] for m in logged if "fitted_steps" in m]
    assert len(fitted) == 1 and fitted[0] >= 20 and logged[-1]["step"] == fitted[0]
    assert logged[-1]["lr"] == pytest.approx(3e-3 * 0.1)  # lr * min_lr_ratio: the schedule ended
    # Throughput is still samples a second after the fit (a mix-up once logged ~1).
    rates = [m["samples_per_s"] for m in logged if "samples_per_s" in m]
    assert 0.2 < rates[-1] / rates[len(rates) // 2 - 1] < 5, rates
    last = ckpt.list_checkpoints(workspace / "budget")[-1]
    assert last.name == f"step-{fitted[0]:06d}"
    assert torch.load(last / "trainer.pt", weights_only=True)["steps"] == fitted[0]
    # The apps' bf16 export of the newest checkpoint (what scripts/train_default.sh bundles).
    assert ckpt.export_latest(workspace / "budget", workspace / "budget-bf16") == last / "model"  # no ema/
    full, half = (
        load_file(last / "model" / "model.safetensors"),
        load_file(workspace / "budget-bf16" / "model.safetensors"),
    )
    assert half.keys() == full.keys() and all(torch.equal(half[k], full[k].bfloat16()) for k in full)
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        ckpt.export_latest(workspace / "nothing-here", workspace / "x")
    # Resumed with the same command, the finished run stays finished.
    assert train_main(run) == 0
    assert ckpt.list_checkpoints(workspace / "budget")[-1] == last
    with pytest.raises(ValueError, match="stop_at and time_budget_s do not combine"):
        resolve(None, ["--time_budget_s", "60", "--stop_at", "5", "--data.sources", '[{"shards": "x", "kind": "qa"}]'])


def test_budget_step_time_weighs_each_source_by_its_share():
    # Source 0 (short answers) 1 s a step, source 1 (pages) 5 s; weights 3 : 1. Ten timed
    # steps that happened to draw source 1 four times average 2.6 s; the mixture costs 2 s.
    timed = [([0], 1.0)] * 6 + [([1], 5.0)] * 4
    assert mixture_step_s(timed, [3.0, 1.0]) == pytest.approx(2.0)
    # A source not drawn yet counts at the mean of all timed steps (here 2.6 s).
    assert mixture_step_s(timed, [3.0, 1.0, 1.0]) == pytest.approx((3 * 1 + 5 + 2.6) / 5)
    # Steps that mix sources (a batch of -1, or micro-batches from two) give the plain mean.
    assert mixture_step_s([([0], 1.0), ([-1], 3.0)], [1.0, 1.0]) == pytest.approx(2.0)
    assert mixture_step_s([([0, 1], 4.0), ([0], 2.0)], [1.0, 1.0]) == pytest.approx(3.0)
    with pytest.raises(ValueError, match="no timed steps"):
        mixture_step_s([], [1.0])


def test_time_budget_under_ddp_gives_every_rank_the_same_step_count(workspace):
    _torchrun(workspace, "ddp_budget", "--steps", "1000", "--time_budget_s", "8", "--checkpoint.every", "1000",
              "--data.batch_size", "4", "--parallel.strategy", "ddp")  # fmt: skip
    fitted = [m["fitted_steps"] for m in metrics(workspace, "ddp_budget") if "fitted_steps" in m]
    assert len(fitted) == 1
    assert ckpt.list_checkpoints(workspace / "ddp_budget")[-1].name == f"step-{fitted[0]:06d}"


def test_config_overrides_and_errors():
    with pytest.raises(ValueError, match="stop_at must be between 1 and steps"):
        resolve(None, ["--steps", "10", "--stop_at", "11", "--data.sources", '[{"shards": "x", "kind": "qa"}]'])
    cfg = resolve(None, ["--optim.lr", "2e-4", "--steps=7", "--data.sources", '[{"shards": "x", "kind": "qa"}]'])
    assert cfg.optim.lr == 2e-4 and cfg.steps == 7 and cfg.data.sources[0].kind == "qa"
    with pytest.raises(ValueError, match="unknown fields \\['lrr'\\]"):
        resolve(None, ["--optim.lrr", "1", "--data.sources", '[{"shards": "x", "kind": "qa"}]'])
    with pytest.raises(ValueError, match="expected float"):
        resolve(None, ["--optim.lr", "fast", "--data.sources", '[{"shards": "x", "kind": "qa"}]'])
    with pytest.raises(ValueError, match="has no sources"):
        resolve(None, [])
    assert apply_overrides({}, ["--a.b", "3"]) == {"a": {"b": 3}}
    assert isinstance(TrainConfig().to_dict()["optim"]["betas"], tuple)


def test_presets_extend_other_presets(tmp_path):
    source = {"shards": "x", "kind": "qa"}
    base = {"data": {"sources": [source, source], "batch_size": 8}, "optim": {"lr": 1e-3, "warmup_steps": 5}}
    (tmp_path / "base.json").write_text(json.dumps(base))
    child = {"extends": "base", "data": {"sources": [source]}, "optim": {"lr": 2e-4}, "seed": 3}
    (tmp_path / "child.json").write_text(json.dumps(child))
    cfg = resolve(str(tmp_path / "child.json"), ["--steps", "9"])
    # Sections merge key by key; a list replaces the parent's list; overrides still win.
    assert len(cfg.data.sources) == 1 and cfg.data.batch_size == 8
    assert cfg.optim.lr == 2e-4 and cfg.optim.warmup_steps == 5 and cfg.seed == 3 and cfg.steps == 9
    (tmp_path / "base.json").write_text(json.dumps({**base, "extends": "child"}))
    with pytest.raises(ValueError, match="'extends' loops: child -> base -> child"):
        resolve(str(tmp_path / "child.json"), [])
    (tmp_path / "child.json").write_text(json.dumps({**child, "extends": "missing"}))
    with pytest.raises(ValueError, match="unknown training preset 'missing'"):
        resolve(str(tmp_path / "child.json"), [])
    # The bundled recipe's stages extend one another: stage 7 keeps stage 3's loader and eval.
    stage7, stage3 = resolve("default:stage7", []), resolve("default:stage3", [])
    assert stage7.data.batch_size == stage3.data.batch_size == 16 and stage7.eval == stage3.eval
    assert stage7.time_budget_s == 4800 and stage7.seed == 9 and stage7.checkpoint.every == 100


def test_bf16_on_a_cpu_without_fast_bf16_trains_in_fp32_and_says_so(workspace, monkeypatch, capsys):
    import vlm_train.train as train_module

    assert train_main(args(workspace, "fp32", "--steps", "2", "--checkpoint.every", "2")) == 0
    monkeypatch.setattr(train_module, "fast_matmul", lambda dtype, device: False)
    capsys.readouterr()
    assert (
        train_main(
            args(workspace, "slow-bf16", "--steps", "2", "--checkpoint.every", "2", "--precision", "bf16-frozen")
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "no fast bf16 matrix multiply" in out and '"precision": "fp32"' in out
    fp32, fallback = (
        load_file(workspace / run / "step-000002" / "model" / "model.safetensors") for run in ("fp32", "slow-bf16")
    )
    assert all(torch.equal(fp32[k], fallback[k]) for k in fp32)  # the very same fp32 run


def test_a_half_precision_dtype_on_a_cpu_without_fast_kernels_warns(workspace, monkeypatch):
    from vlm import factory

    model, _ = vlm.from_pretrained(workspace / "init", verbose=False)
    monkeypatch.setattr(factory, "fast_matmul", lambda dtype, device: dtype == torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        factory.place(model, "cpu", "auto")  # auto keeps float32 on a CPU: no warning
    assert next(model.parameters()).dtype == torch.float32
    with pytest.warns(UserWarning, match="no fast torch.bfloat16 matrix multiply"):
        factory.place(model, "cpu", "bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16  # warned, and still done as asked
