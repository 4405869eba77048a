"""Typed training configuration, named presets and recipes (``training/presets/*.json``) and
command-line overrides of any field: ``--optim.lr 1e-4``, ``--data.batch_size 16``,
``--data.sources '[{"shards": "shards/evqa", "kind": "qa"}]'``."""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .data.loader import LoaderConfig, SourceConfig

PRESET_DIR = Path(__file__).parent / "presets"


@dataclass
class ModelConfig:
    preset: str = "default"
    """A ``vlm`` architecture preset name, or a path to a VLM config/checkpoint folder."""
    init_from: str | None = None
    """A ``save_pretrained`` folder whose trainable weights start the run."""


@dataclass
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.95)
    gate_lr_mult: float = 10.0
    """The tanh gates learn this much faster (they start at 0 and gate everything)."""
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    """The cosine schedule ends at ``lr * min_lr_ratio``."""
    grad_clip: float = 1.0
    max_bad_steps: int = 10
    """Stop after this many consecutive steps with a non-finite loss or gradient."""


@dataclass
class ParallelConfig:
    strategy: str = "auto"
    """``none``, ``ddp``, ``fsdp`` (FSDP2 ``fully_shard``), or ``auto`` (ddp when launched
    with more than one process, else none)."""
    activation_checkpointing: bool = False
    """Recompute each decoder layer (and its cross-attention) in the backward pass."""


@dataclass
class CheckpointConfig:
    dir: str = "runs/default"
    every: int = 500
    keep: int = 3
    resume: str | None = "auto"
    """``auto`` (newest complete checkpoint in ``dir``, if any), a checkpoint path, or null."""


@dataclass
class EvalConfig:
    data: LoaderConfig | None = None
    every: int = 500
    max_batches: int = 50


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: LoaderConfig = field(default_factory=LoaderConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    steps: int = 1000
    """Optimiser steps; the learning-rate schedule spans them."""
    stop_at: int | None = None
    """Stop (with a checkpoint) after this step although the schedule spans ``steps``:
    for splitting a run into time slices, or a staged recipe."""
    time_budget_s: float | None = None
    """Fit the run into this many seconds of wall time (model loading included): at step
    ``max(optim.warmup_steps, 20)`` the trainer times the steps so far and resets
    ``steps`` (and the schedule) to what fits. The chosen count is printed, logged and
    kept in checkpoints, so a resumed run keeps it."""
    grad_accum: int = 1
    """Micro-batches per step (each of ``data.batch_size`` per rank)."""
    precision: str = "fp32"
    """``fp32``; ``bf16`` (bf16 autocast, trainable weights in fp32); ``bf16-frozen``
    (as bf16, and the frozen backbones stored in bf16 too: less memory, faster on CPU)."""
    device: str = "auto"
    prefix_cache: str = "auto"
    """Cache the frozen LM's hidden states below the first cross-attention layer (a fixed
    function of each training text), built before training beside the shards (or in
    ``data.prefix_cache_dir``), so each step runs only the layers from there up. It holds
    the added tokens' embedding rows frozen. ``auto``: on where it pays (cross-attention
    not from layer 0, and a run longer than one epoch of its data), otherwise off with the
    reason printed; ``on``; ``off``."""
    seed: int = 0
    log_every: int = 10
    tensorboard: bool = True
    debug_nan_steps: list[int] = field(default_factory=list)
    """Testing aid: make the loss NaN at these steps to exercise the guard."""

    def validate(self) -> TrainConfig:
        self.data.validate()
        if self.eval.data is not None:
            self.eval.data.validate()
        if self.precision not in ("fp32", "bf16", "bf16-frozen"):
            raise ValueError(f"precision must be fp32, bf16 or bf16-frozen, got {self.precision!r}")
        if self.prefix_cache not in ("auto", "on", "off"):
            raise ValueError(f"prefix_cache must be auto, on or off, got {self.prefix_cache!r}")
        if self.parallel.strategy not in ("auto", "none", "ddp", "fsdp"):
            raise ValueError(f"parallel.strategy must be auto, none, ddp or fsdp, got {self.parallel.strategy!r}")
        if self.steps < 1 or self.grad_accum < 1:
            raise ValueError("steps and grad_accum must be >= 1")
        if self.stop_at is not None and not 1 <= self.stop_at <= self.steps:
            raise ValueError(f"stop_at must be between 1 and steps ({self.steps}), got {self.stop_at}")
        if self.time_budget_s is not None and self.time_budget_s <= 0:
            raise ValueError(f"time_budget_s must be > 0, got {self.time_budget_s}")
        if self.time_budget_s is not None and self.stop_at is not None:
            raise ValueError("stop_at and time_budget_s do not combine: the budget sets the steps")
        if self.checkpoint.every < 1 or self.checkpoint.keep < 1:
            raise ValueError("checkpoint.every and checkpoint.keep must be >= 1")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _build(cls, value: Any, where: str):
    """A dataclass (or list/tuple/optional of them) from plain JSON values, strictly."""
    origin = typing.get_origin(cls)
    args = typing.get_args(cls)
    if dataclasses.is_dataclass(cls):
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected an object, got {value!r}")
        hints = typing.get_type_hints(cls)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(value) - names
        if unknown:
            raise ValueError(f"{where}: unknown fields {sorted(unknown)}")
        return cls(**{k: _build(hints[k], v, f"{where}.{k}") for k, v in value.items()})
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _build(inner[0], value, where)
    if origin is list:
        if not isinstance(value, list):
            raise ValueError(f"{where}: expected a list, got {value!r}")
        return [_build(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        return tuple(_build(a, v, where) for a, v in zip(args, value, strict=True))
    if cls is float and isinstance(value, int):
        return float(value)
    if cls in (int, float, str, bool) and not isinstance(value, cls):
        raise ValueError(f"{where}: expected {cls.__name__}, got {value!r}")
    return value


def from_dict(data: dict) -> TrainConfig:
    return _build(TrainConfig, data, "config").validate()


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text  # a bare string such as a path


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """``["--optim.lr", "1e-4", "--steps=20"]`` applied to a config dict."""
    i = 0
    while i < len(overrides):
        arg = overrides[i]
        if not arg.startswith("--"):
            raise ValueError(f"expected --field.path value, got {arg!r}")
        if "=" in arg:
            path, raw = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(overrides):
                raise ValueError(f"{arg} needs a value")
            path, raw = arg[2:], overrides[i + 1]
            i += 2
        node = data
        keys = path.replace("-", "_").split(".")
        for key in keys[:-1]:
            if not isinstance(node.get(key), dict):
                node[key] = {} if node.get(key) is None else node[key]
                if not isinstance(node[key], dict):
                    raise ValueError(f"--{path}: {key} is not a section")
            node = node[key]
        node[keys[-1]] = _parse_value(raw)
    return data


def load_preset(name: str, _chain: tuple[Path, ...] = ()) -> dict:
    """A training preset as a dict. ``"extends": "other-preset"`` starts from that preset
    (a name in the same folder, or a path) and overrides it key by key: sections merge,
    lists and values replace. ``recipe:stage`` is one stage of a recipe
    (:mod:`vlm_train.recipe`)."""
    from .recipe import is_recipe, known_presets, recipe_stage

    stage = None
    if ":" in name:
        name, stage = name.rsplit(":", 1)
    path = Path(name)
    if not path.suffix:
        path = (_chain[-1].parent if _chain else PRESET_DIR) / f"{name}.json"
    if not path.is_file():
        known = ", ".join(known_presets(PRESET_DIR))
        raise ValueError(f"unknown training preset {name!r}; presets: {known}")
    chain = (*_chain, path.resolve())
    if path.resolve() in _chain:
        raise ValueError(f"training preset {path}: 'extends' loops: {' -> '.join(p.stem for p in chain)}")
    try:
        data = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"training preset {path}: not valid JSON: {e}") from e
    if is_recipe(data):
        return recipe_stage(data, path, stage)
    if stage is not None:
        raise ValueError(f"training preset {path.stem} is not a recipe: it has no stage {stage!r}")
    base = data.pop("extends", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ValueError(f"training preset {path}: 'extends' must be a preset name or path, got {base!r}")
    return _merge(load_preset(base, chain), data)


def resolve(preset: str | None, overrides: list[str], validate: bool = True) -> TrainConfig:
    """The config of ``preset`` (a name, ``recipe:stage`` or a path) with ``overrides``;
    ``"select": "@name"`` and ``tiny:`` paths are resolved last, so overrides use them too.
    ``validate=False`` skips the checks of values (not of names and types): to show a
    config that is not complete yet, such as the defaults, which have no data sources."""
    from .recipe import apply_selections
    from .tiny import expand_tiny_paths

    base = TrainConfig().to_dict() if preset is None else _merge(TrainConfig().to_dict(), load_preset(preset))
    data = expand_tiny_paths(apply_selections(apply_overrides(base, overrides)))
    return from_dict(data) if validate else _build(TrainConfig, data, "config")


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


__all__ = ["TrainConfig", "SourceConfig", "LoaderConfig", "resolve", "from_dict", "apply_overrides"]
