"""The trainer: ``vlm train`` / ``python -m vlm_train.train``, one command from a laptop CPU to many GPUs.

    vlm train --preset tiny --steps 200
    torchrun --nproc_per_node 2 -m vlm_train.train --preset tiny --parallel.strategy fsdp
    vlm train --preset default:colour --optim.lr 2e-4 --checkpoint.dir runs/mine   # resumes by itself

Any field of :class:`vlm_train.config.TrainConfig` can be set with ``--section.field value``;
``vlm train --help`` lists them all. The command line is parsed in :mod:`vlm_train.config`.
"""

from __future__ import annotations

import json
import math
import sys
import time
import warnings
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path

import torch
from tqdm import tqdm

import vlm
from vlm.config import VisionConfig
from vlm.factory import fast_matmul, load_trainable
from vlm.fileio import write_text

from . import checkpoint as ckpt
from .average import WeightAverage
from .config import TrainConfig
from .config import main as cli_main
from .data import prefix_cache
from .data.decode import SkipCounter
from .data.loader import is_report_only, make_loader
from .data.shards import expand_shards
from .distributed import Dist, all_reduce_mean, apply_activation_checkpointing, no_gradient_sync, setup, teardown, wrap

NO_DECAY = ("_gate", "latents", "media_time", "new_rows", "norm", "bias")


def build_model(cfg: TrainConfig, init: bool = True):
    """The model of ``cfg.model.preset`` (a preset or a saved model folder) with, where
    ``init``, the trainable weights of ``cfg.model.init_from``."""
    path = Path(cfg.model.preset)
    if (path / "config.json").is_file():
        model, processor = vlm.from_pretrained(path, verbose=False)
    else:
        model, processor = vlm.create_model_and_transforms(cfg.model.preset, verbose=False)
    if init and cfg.model.init_from:
        model_init, _ = vlm.from_pretrained(cfg.model.init_from, verbose=False)
        state = model_init.trainable_state_dict()
        if adds_channels_after(model_init.config.vision, model.config.vision):
            state = add_channel_inputs(state, model.resampler.proj_in.in_features)
        load_trainable(model, state, source=cfg.model.init_from)
    if cfg.precision == "bf16-frozen":
        cast_frozen(model, torch.bfloat16)
    return model, processor


def adds_channels_after(old: VisionConfig, new: VisionConfig) -> bool:
    """Whether ``new`` reads the same tower as ``old`` and gives each token more channels
    after ``old``'s: its channel blocks (the head's, then ``with_last_stage``'s, then
    ``fold_stride``'s) start with all of ``old``'s."""

    def blocks(v: VisionConfig) -> list:
        return ["head"] + ["last stage"] * v.with_last_stage + ([("fold", v.fold_stride)] if v.fold_stride else [])

    if not old.same_tower(new) or old.feature_stride is not None or new.feature_stride is not None:
        return False
    before, after = blocks(old), blocks(new)
    return len(after) > len(before) and after[: len(before)] == before


def add_channel_inputs(state: dict[str, torch.Tensor], width: int) -> dict[str, torch.Tensor]:
    """Start a model whose tokens have more channels (``vision.with_last_stage``,
    ``vision.fold_stride``) from a checkpoint without them: the resampler's input projection
    gets zero weights for the new channels, so the model computes what the checkpoint did
    (to float rounding) until training moves them."""
    w = state["resampler.proj_in.weight"]
    return {**state, "resampler.proj_in.weight": torch.cat([w, w.new_zeros(w.shape[0], width - w.shape[1])], dim=1)}


def cast_frozen(model, dtype: torch.dtype) -> None:
    """Store the frozen backbones in ``dtype``; the trainable adapter stays fp32."""
    model.vision.to(dtype)  # buffers too: batch norm needs its statistics in the same dtype
    for p in model.lm.parameters():
        if not p.requires_grad:
            p.data = p.data.to(dtype)


def param_groups(model, optim) -> list[dict]:
    """AdamW groups: decay for weight matrices only; the gates at a higher learning rate."""
    groups = {"decay": [], "no_decay": [], "gates": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.endswith("_gate"):
            groups["gates"].append(p)
        elif any(k in name for k in NO_DECAY) or p.ndim < 2:
            groups["no_decay"].append(p)
        else:
            groups["decay"].append(p)
    return [
        {"params": groups["decay"], "weight_decay": optim.weight_decay, "lr": optim.lr, "name": "decay"},
        {"params": groups["no_decay"], "weight_decay": 0.0, "lr": optim.lr, "name": "no_decay"},
        {"params": groups["gates"], "weight_decay": 0.0, "lr": optim.lr * optim.gate_lr_mult, "name": "gates"},
    ]


def lr_lambda(optim, steps: int):
    def f(step: int) -> float:
        if step < optim.warmup_steps:
            return (step + 1) / optim.warmup_steps
        progress = (step - optim.warmup_steps) / max(1, steps - optim.warmup_steps)
        return optim.min_lr_ratio + (1 - optim.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return f


class Batches:
    """Endless batches of one rank with a resumable position ``(epoch, batch_in_epoch)``."""

    def __init__(self, cfg, processor, d: Dist, epoch: int = 0, position: int = 0, prefix=None):
        self.loader = make_loader(cfg, processor, d.rank, d.world_size, prefix)
        self.epoch, self.position = epoch, position
        self.show_skip = d.is_main
        self.skipped = SkipCounter()
        self._iter = self._start(skip=position)

    def _start(self, skip: int):
        self.loader.dataset.set_epoch(self.epoch, skip_batches=skip)
        it = iter(self.loader)
        for _ in tqdm(
            range(skip), desc="resume: skipping trained batches", disable=skip < 100 or not self.show_skip, leave=False
        ):
            self._next_data(it)
        return it

    def _next_data(self, it) -> dict:
        while True:
            batch = next(it)
            self.skipped.update(batch["skipped"])
            if not is_report_only(batch):
                return batch

    def __next__(self) -> dict:
        for _ in range(2):
            try:
                batch = self._next_data(self._iter)
                if batch.get("skip_only"):  # the loader's count of batches to skip went wrong
                    raise RuntimeError(
                        f"epoch {self.epoch}, batch {self.position}: the data loader sent a batch to skip "
                        "where one to train on was due"
                    )
                self.position += 1
                return batch
            except StopIteration:
                self.epoch, self.position = self.epoch + 1, 0
                self._iter = self._start(skip=0)
        raise RuntimeError("the training data yields no batches (too few samples for one batch?)")


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def forward_loss(model, batch: dict, autocast) -> torch.Tensor:
    with autocast:
        out = model(
            batch["pixel_values"],
            batch["input_ids"],
            batch["attention_mask"],
            batch["labels"],
            return_logits=False,
            prefix=batch.get("prefix"),
            label_weights=batch.get("label_weights"),
        )
    return out.loss


def count_samples(shards: str) -> int:
    from vlm.tario import ShardError, iter_tar_samples

    n = 0
    for url in expand_shards(shards):
        try:
            n += sum(1 for sample in iter_tar_samples(url) if not sample.problem)
        except ShardError:
            pass
    return n


def prefix_cache_off_reason(cfg: TrainConfig, model, world_size: int) -> str | None:
    """Why ``prefix_cache: auto`` leaves the cache off for this run, or None where it pays."""
    layer = model.first_cross_attn_layer
    if layer == 0:
        return "cross-attention starts at layer 0, so no layer runs on text alone"
    batches = cfg.steps * cfg.grad_accum  # per rank
    if cfg.data.resampled:
        epoch = cfg.data.epoch_batches
    else:
        samples = sum(count_samples(s.shards) for s in cfg.data.sources)
        epoch = samples // (cfg.data.batch_size * world_size)
        if cfg.data.epoch_batches:
            epoch = min(epoch, cfg.data.epoch_batches)
    if batches <= epoch:
        return f"the run ({batches} batches a rank) sees its data at most once (an epoch is {epoch} batches a rank)"
    return None


def setup_prefix_cache(cfg: TrainConfig, core, processor, d: Dist, say) -> prefix_cache.PrefixLookup | None:
    """Decide on the prefix cache; where it is on, freeze the added rows, build what is
    missing or stale (rank 0, the others wait) and return the loader's lookup."""
    if cfg.prefix_cache == "off":
        return None
    if cfg.prefix_cache == "auto":
        reason = prefix_cache_off_reason(cfg, core, d.world_size)
        if reason is not None:
            say(f"prefix cache off: {reason}; every step runs the whole LM")
            return None
    elif core.first_cross_attn_layer == 0:
        raise ValueError("prefix_cache on: cross-attention starts at layer 0, so there is no text-only prefix")
    layer = core.first_cross_attn_layer
    # The added rows enter the layers below the first cross-attention layer: with their
    # effect there cached they must not change (and the cache's fingerprint holds them).
    core.embed.new_rows.requires_grad_(False)
    say(
        f"prefix cache on: layers 0-{layer - 1} run once per sample, before training; the added tokens' "
        "embedding rows are held frozen"
    )
    storage = "bf16" if cfg.precision.startswith("bf16") else "fp32"
    autocast = torch.autocast(d.device.type, dtype=torch.bfloat16) if storage == "bf16" else None
    prints = [None]
    if d.is_main:
        prints[0], _ = prefix_cache.ensure(
            core, processor, cfg.data.sources, storage, cfg.data.prefix_cache_dir, autocast=autocast, log=say
        )
    if d.enabled:
        torch.distributed.broadcast_object_list(prints, src=0)
    return prefix_cache.PrefixLookup(prints[0], cfg.data.prefix_cache_dir)


@torch.no_grad()
def evaluate(model, core, cfg: TrainConfig, processor, d: Dist, autocast) -> dict:
    """Loss and exact match (the greedy answer equals the reference: every labelled
    position's argmax equals its label) on the held-out shards."""
    eval_cfg = cfg.eval.data
    loader = make_loader(eval_cfg, processor, d.rank, d.world_size)
    model.eval()
    totals = torch.zeros(4, device=d.device)  # loss sum, batches, correct, samples
    for i, batch in enumerate(loader):
        if i >= cfg.eval.max_batches:
            break
        if is_report_only(batch):
            continue
        batch = to_device(batch, d.device)
        with autocast:
            out = model(batch["pixel_values"], batch["input_ids"], batch["attention_mask"], batch["labels"])
        targets = batch["labels"][:, 1:]
        hit = (out.logits[:, :-1].argmax(-1) == targets) | (targets == -100)
        totals += torch.tensor([out.loss.item(), 1, hit.all(1).sum().item(), targets.shape[0]], device=d.device)
    core.train()
    if d.enabled:
        torch.distributed.all_reduce(totals)
    loss_sum, batches, correct, samples = totals.tolist()
    return {"eval_loss": loss_sum / max(batches, 1), "eval_exact_match": correct / max(samples, 1)}


class Logger:
    """``metrics.jsonl`` and TensorBoard. On resume from step ``start``, what a killed run
    logged after its last checkpoint is dropped, so every step appears once."""

    def __init__(self, cfg: TrainConfig, d: Dist, start: int = 0):
        self.enabled = d.is_main
        self.tb = None
        if not self.enabled:
            return
        root = Path(cfg.checkpoint.dir)
        root.mkdir(parents=True, exist_ok=True)
        path = root / "metrics.jsonl"
        if path.is_file():
            kept = [
                line for line in path.read_text(encoding="utf-8").splitlines(keepends=True) if _logged_by(line, start)
            ]
            write_text(path, "".join(kept))
        self.jsonl = open(path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close)
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(root / "tensorboard"), purge_step=start + 1 if start else None)

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, int | float):
                    self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            if self.tb is not None:
                self.tb.close()


def _logged_by(line: str, start: int) -> bool:
    """Whether a ``metrics.jsonl`` line belongs to steps up to ``start`` (a cut last line does not)."""
    try:
        return json.loads(line)["step"] <= start and line.endswith("\n")
    except (ValueError, KeyError, TypeError):
        return False


def gather_trainable(model, core, strategy: str) -> dict[str, torch.Tensor]:
    names = set(core.trainable_state_dict())
    if strategy == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {k: v for k, v in full.items() if k in names}
    return {k: v.detach().float().cpu().clone() for k, v in core.trainable_state_dict().items()}


def optimizer_state(model, optimizer, strategy: str) -> dict:
    if strategy == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(
            model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
    return optimizer.state_dict()


def load_state(model, core, optimizer, state: dict, trainable: dict, strategy: str) -> None:
    if strategy == "fsdp":
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True, strict=False)
        set_model_state_dict(model, trainable, options=opts)
        set_optimizer_state_dict(model, optimizer, state["optimizer"], options=opts)
    else:
        load_trainable(core, trainable, source="checkpoint")
        optimizer.load_state_dict(state["optimizer"])


def start_average(cfg: TrainConfig, core, resume: ckpt.Resume | None, say) -> WeightAverage | None:
    """The moving average of the trained weights where ``optim.ema_decay`` asks for one: the
    checkpoint's where it holds one, else started from the weights the run begins with."""
    decay = cfg.optim.ema_decay
    if not decay:
        if resume is not None and resume.average is not None:
            say(f"{resume.path} holds a moving average of the weights; optim.ema_decay is 0, so this run drops it")
        return None
    trained = {name: p for name, p in core.named_parameters() if p.requires_grad}
    if resume is None or resume.average is None:
        if resume is not None:
            say(f"{resume.path} holds no moving average of the weights: it starts from the weights resumed")
        return WeightAverage(trained, decay)
    return WeightAverage(trained, decay, resume.average, resume.state.get("ema_updates", 0))


def _say(message: str) -> None:
    print(message, flush=True)


def _quiet(message: str) -> None:
    pass


def fit_steps(step: int, elapsed: float, step_s: float, budget: float, margin: float = 0.9) -> int:
    """How many steps a run at ``step`` fits into ``budget`` seconds, ``elapsed`` of them spent,
    at ``step_s`` seconds a step; ``margin`` of the rest is used (evaluations, checkpoints)."""
    return step + max(0, int(margin * (budget - elapsed) / step_s))


def mixture_step_s(timed: Sequence[tuple[Sequence[int], float]], weights: Sequence[float]) -> float:
    """Expected seconds a step over the data mixture, from timed steps ``(sources, seconds)``
    (``sources``: the source index of each micro-batch, -1 where a batch mixes sources).

    A few dozen timed steps draw the sources unevenly, and a page of HTML costs several
    times a short answer, so each source's mean step time is weighted by its share of the
    mixture; a source not yet drawn counts at the mean of all timed steps, and where steps
    mix sources the plain mean is the estimate."""
    if not timed:
        raise ValueError("no timed steps")
    overall = sum(seconds for _, seconds in timed) / len(timed)
    per_source: dict[int, list[float]] = {}
    for sources, seconds in timed:
        if len(set(sources)) != 1 or sources[0] < 0:
            return overall
        per_source.setdefault(sources[0], []).append(seconds)
    mean = {i: sum(t) / len(t) for i, t in per_source.items()}
    return sum(w * mean.get(i, overall) for i, w in enumerate(weights)) / sum(weights)


def train(cfg: TrainConfig) -> dict:
    began = time.perf_counter()
    d = setup(cfg.device)
    if cfg.precision != "fp32" and not fast_matmul(torch.bfloat16, d.device):
        (_say if d.is_main else _quiet)(
            f"precision {cfg.precision}: this CPU has no fast bf16 matrix multiply (it would run many "
            "times slower than fp32), so this run trains in fp32",
        )
        cfg.precision = "fp32"
    torch.manual_seed(cfg.seed)
    # Plain data only (weights_only): a run folder from someone else cannot run code here.
    resume = ckpt.load_resume(cfg.checkpoint.resume, cfg.checkpoint.dir, log=_say if d.is_main else _quiet)
    if resume is not None and cfg.model.init_from:
        (_say if d.is_main else _quiet)(f"resuming from {resume.path}: model.init_from is not read")
    model, processor = build_model(cfg, init=resume is None)  # a resumed run's weights are its checkpoint's
    core = model.to(d.device)
    if resume is not None and "embed.new_rows" in resume.trainable:
        # The prefix cache's key holds the added rows the run goes on with (a run resumed
        # with the cache after training them without it must not use a cache of the old ones).
        with torch.no_grad():
            core.embed.new_rows.copy_(resume.trainable["embed.new_rows"])
    prefix = setup_prefix_cache(cfg, core, processor, d, _say if d.is_main else _quiet)
    if cfg.parallel.activation_checkpointing:
        apply_activation_checkpointing(core)
    strategy = cfg.parallel.strategy if cfg.parallel.strategy != "auto" else ("ddp" if d.world_size > 1 else "none")
    if strategy != "none" and not d.enabled:
        raise ValueError(f"parallel.strategy {strategy!r} needs a process group: launch with torchrun")
    if strategy != "fsdp":  # FSDP2 shards contiguous parameters only
        core.vision.channels_last()  # frozen: only its layout changes, and a conv tower runs faster
    core.train()
    model = wrap(core, strategy, d, cfg.precision)
    optimizer = torch.optim.AdamW(param_groups(core, cfg.optim), betas=cfg.optim.betas, fused=False)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.optim, cfg.steps))
    bf16 = cfg.precision.startswith("bf16")
    autocast = torch.autocast(d.device.type, dtype=torch.bfloat16) if bf16 and strategy != "fsdp" else nullcontext()

    step, epoch, position, bad_total = 0, 0, 0, 0
    if resume is not None:
        state = resume.state
        load_state(model, core, optimizer, state, resume.trainable, strategy)
        scheduler.load_state_dict(state["scheduler"])
        ckpt.set_rng_state(state["rng"][d.rank] if d.rank < len(state["rng"]) else state["rng"][0])
        step, epoch, position, bad_total = state["step"], state["epoch"], state["position"], state["bad_steps"]
        if state.get("steps_fitted"):  # a time-budgeted run keeps the step count it chose
            cfg.steps = state["steps"]
            scheduler.lr_lambdas = [lr_lambda(cfg.optim, cfg.steps) for _ in optimizer.param_groups]
        if d.is_main:
            print(f"resumed from {resume.path} at step {step}", flush=True)
    fitted = resume is not None and bool(state.get("steps_fitted"))
    average = start_average(cfg, core, resume, _say if d.is_main else _quiet)
    fit_at = max(cfg.optim.warmup_steps, 20)
    timed: list[tuple[list[int], float]] = []  # (micro-batch sources, seconds) of the steps timed for the budget
    if d.is_main:
        print(json.dumps(cfg.to_dict(), indent=2), flush=True)
    batches = Batches(cfg.data, processor, d, epoch, position, prefix)
    logger = Logger(cfg, d, step)
    per_step = cfg.data.batch_size * cfg.grad_accum * d.world_size
    bar = tqdm(total=cfg.steps, initial=step, disable=not d.is_main, desc="train", dynamic_ncols=True)
    consecutive_bad, loss_window, start, start_step = 0, [], time.perf_counter(), step
    last = {}
    end = cfg.stop_at or cfg.steps
    tick = time.perf_counter()
    while step < end:
        total = torch.zeros((), device=d.device)
        step_sources = []
        for micro in range(cfg.grad_accum):
            batch = to_device(next(batches), d.device)
            step_sources.append(batch.get("source", -1))
            with no_gradient_sync(model, strategy, micro < cfg.grad_accum - 1):
                loss = forward_loss(model, batch, autocast) / cfg.grad_accum
                if step in cfg.debug_nan_steps:
                    loss = loss * float("nan")
                loss.backward()
            total += loss.detach()
        grad_norm = torch.nn.utils.clip_grad_norm_(
            [p for p in core.parameters() if p.requires_grad], cfg.optim.grad_clip
        )
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        flag = torch.tensor(float(not (torch.isfinite(total) and torch.isfinite(grad_norm))), device=d.device)
        if d.enabled:
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        if flag.item() > 0:
            optimizer.zero_grad(set_to_none=True)
            bad_total, consecutive_bad = bad_total + 1, consecutive_bad + 1
            if d.is_main:
                tqdm.write(f"step {step}: non-finite loss or gradient; step skipped ({bad_total} so far)")
            if consecutive_bad > cfg.optim.max_bad_steps:
                raise RuntimeError(
                    f"{consecutive_bad} consecutive steps had a non-finite loss or gradient; stopping. "
                    "Lower the learning rate, check the data, or try fp32."
                )
        else:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if average is not None:
                average.update()
            consecutive_bad = 0
            loss_window.append(all_reduce_mean(total, d).item())
        with warnings.catch_warnings():  # a skipped first step still advances the schedule
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
            scheduler.step()
        step += 1
        bar.update(1)
        now = time.perf_counter()
        if cfg.time_budget_s and not fitted and fit_at // 2 < step <= fit_at:
            timed.append((step_sources, now - tick))
        tick = now
        if cfg.time_budget_s and not fitted and step == fit_at and timed:
            step_s = mixture_step_s(timed, [s.weight for s in cfg.data.sources])
            cfg.steps = fit_steps(step, now - began, step_s, cfg.time_budget_s)
            if d.enabled:  # ranks time themselves a little differently: all take the smallest count
                count = torch.tensor(cfg.steps, device=d.device)
                torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.MIN)
                cfg.steps = int(count.item())
            scheduler.lr_lambdas = [lr_lambda(cfg.optim, cfg.steps) for _ in optimizer.param_groups]
            end, fitted, bar.total = cfg.steps, True, cfg.steps
            bar.refresh()
            if d.is_main:
                tqdm.write(
                    f"time budget {cfg.time_budget_s:.0f} s: {step_s:.3f} s a step (over the data mixture) after "
                    f"{now - began:.0f} s, so the run spans {cfg.steps} steps"
                )
            plain = sum(seconds for _, seconds in timed) / len(timed)
            logger.log(step, {"fitted_steps": cfg.steps, "fit_s_per_step": step_s, "fit_s_per_step_plain": plain})
        if step % cfg.log_every == 0 or step == end:
            rate = (step - start_step) * per_step / (time.perf_counter() - start)
            last = {
                "loss": sum(loss_window) / max(len(loss_window), 1),
                "lr": scheduler.get_last_lr()[0],
                "samples_per_s": rate,
                "bad_steps": bad_total,
                "skipped_samples": batches.skipped.skipped(),
                "truncated_samples": batches.skipped.get("truncated", 0),
                "epoch": batches.epoch,
            }
            loss_window = []
            bar.set_postfix(loss=f"{last['loss']:.4f}", lr=f"{last['lr']:.2e}", sps=f"{rate:.1f}")
            logger.log(step, last)
        if cfg.eval.data is not None and (step % cfg.eval.every == 0 or step == end):
            metrics = evaluate(model, core, cfg, processor, d, autocast)
            if average is not None:
                with average.swapped_in():
                    metrics.update(
                        {f"ema_{k}": v for k, v in evaluate(model, core, cfg, processor, d, autocast).items()}
                    )
            logger.log(step, metrics)
            last.update(metrics)
            if d.is_main:
                tqdm.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        if step % cfg.checkpoint.every == 0 or step == end:
            trainable = gather_trainable(model, core, strategy)
            averaged = average.full_state() if average is not None else None
            opt_state = optimizer_state(model, optimizer, strategy)
            rngs = [ckpt.rng_state()]
            if d.enabled:
                gathered = [None] * d.world_size
                torch.distributed.all_gather_object(gathered, rngs[0])
                rngs = gathered
            if d.is_main:
                state = {
                    "optimizer": opt_state,
                    "scheduler": scheduler.state_dict(),
                    "rng": rngs,
                    "step": step,
                    "epoch": batches.epoch,
                    "position": batches.position,
                    "bad_steps": bad_total,
                    "steps": cfg.steps,
                    "steps_fitted": fitted,
                    "ema_updates": average.updates if average is not None else 0,
                }
                ckpt.save(
                    cfg.checkpoint.dir, step, core, trainable, state, cfg.to_dict(), cfg.checkpoint.keep, averaged
                )
            if d.enabled:
                torch.distributed.barrier()
    bar.close()
    if d.is_main:
        print(f"data: {batches.skipped.summary()}")
        print(f"done: {step} steps, {bad_total} skipped as non-finite; weights in {cfg.checkpoint.dir}")
    logger.close()
    teardown()
    return last


def main(argv: list[str] | None = None) -> int:
    """``python -m vlm_train.train`` (how torchrun starts each rank): the same command line as
    ``vlm train``, whose parsing, help and ``--print_config`` live in :func:`vlm_train.config.main`."""
    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
