"""Typed training configuration, named presets and recipes (``training/presets/*.json``),
command-line overrides of any field (``--optim.lr 1e-4``, ``--data.batch_size 16``,
``--data.sources '[{"shards": "shards/evqa", "kind": "qa"}]'``) and the trainer's command
line, ``vlm train`` (:func:`main`).

Every field is documented by the string literal after it (an attribute docstring):
``vlm train --help`` lists them, generated from these dataclasses by jsonargparse. This
module imports neither torch nor the data pipeline, so that help and ``--print_config``
answer at once; training itself starts in :mod:`vlm_train.train`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlm.images import DEFAULT_MAX_PIXELS

PRESET_DIR = Path(__file__).parent / "presets"


@dataclass
class SourceConfig:
    """One shard set in the mixture."""

    shards: str
    """Brace pattern (``data/caps-{000000..000009}.tar``), folder of ``.tar`` files, or one file."""
    kind: str
    """Sample format: caption, qa, interleaved or sketch."""
    weight: float = 1.0
    """Relative sampling weight in the mixture."""
    select: str | None = None
    """Keep only samples whose text members (``.json``, ``.txt``, ``.html``) match this
    regular expression, case-insensitive: ``"colou?r|red|teal"`` picks easy-VQA's colour
    questions. Samples left out are not counted as skipped."""
    max_tokens: int = 2048
    """Most tokens of one sample, image markers included. A longer sample keeps its start
    and loses the end of its trained text (counted as ``truncated``); one whose untrained
    prompt leaves no trained token within the cap is skipped (``too long``). 2048 holds any
    caption, question or compact page here and bounds a batch, which pads to its longest
    sample; lower it for an LM with a shorter context."""
    text_weight: float = 1.0
    """Weight in the training loss of this source's trained tokens outside ``<...>`` (in a
    sketch page: its labels and placeholder text), where markup tokens weigh 1; the loss is
    then the weighted mean. A page's labels are small print on the drawing, and most of the
    loss sits on them; below 1 the markup, which structure is scored on, gets more of the
    gradient. The held-out loss stays the plain mean."""

    def validate(self) -> None:
        from vlm.tasks import KINDS as FORMATS

        if self.kind not in FORMATS:
            raise ValueError(f"source {self.shards}: kind must be one of {FORMATS}, got {self.kind!r}")
        if self.weight <= 0:
            raise ValueError(f"source {self.shards}: weight must be > 0, got {self.weight}")
        if self.max_tokens < 1:
            raise ValueError(f"source {self.shards}: max_tokens must be >= 1, got {self.max_tokens}")
        if not 0 < self.text_weight <= 1:
            raise ValueError(f"source {self.shards}: text_weight must be in (0, 1], got {self.text_weight}")
        if self.select is not None:
            try:
                re.compile(self.select)
            except re.error as e:
                raise ValueError(f"source {self.shards}: select is not a regular expression: {e}") from None


@dataclass
class LoaderConfig:
    """Streaming batches from webdataset shards (:mod:`vlm_train.data.loader`)."""

    sources: list[SourceConfig] = field(default_factory=list)
    """The shard sets of the mixture, as a JSON list of objects with the fields ``shards``,
    ``kind``, ``weight``, ``select``, ``max_tokens`` and ``text_weight``:
    ``'[{"shards": "data/shards/easy-vqa-train", "kind": "qa"}]'``."""
    batch_size: int = 8
    """Samples per batch on each rank (a step takes ``grad_accum`` of them)."""
    num_workers: int = 2
    """DataLoader worker processes per rank that decode and tokenise (0: in the main process)."""
    shuffle_buffer: int = 1000
    """Samples held for shuffling per source and worker (0: no shuffling)."""
    resampled: bool = False
    """Draw shards with replacement, endlessly; an epoch is then ``epoch_batches`` long."""
    epoch_batches: int | None = None
    """Batches per rank in an epoch (required when resampled; optional cap otherwise)."""
    mix: str = "batch"
    """``batch``: each batch comes from one source, drawn by weight (no padding of short
    question-answer samples up to long HTML pages); ``sample``: sources mix within a batch."""
    max_pixels: int = DEFAULT_MAX_PIXELS
    """Images with more pixels than this are refused (counted as skipped), before decoding."""
    drop_last: bool = True
    """Drop the last, smaller batch of an epoch instead of yielding it."""
    group_by_length: int = 0
    """Batches per length group (0 or 1: off). The loader holds this many full batches of
    one source, sorts their samples by token count and yields them again as batches of
    near-equal length, in a random order: much less padding (a random batch of 16 sketch
    pages is about 61 % real tokens) for batches that are less mixed."""
    seed: int = 0
    """Seed of the shard order, the shuffling and the mixture draws."""
    prefix_cache_dir: str | None = None
    """Where the trainer's prefix cache files go (``--prefix_cache``); by default beside
    each shard. Set it when the shard folders are read-only."""
    barren_shards: int = 16
    """Resampled mode: a source whose last ``barren_shards`` distinct shards in a row (all its
    shards, when it has fewer) gave no usable sample is dropped from the mixture with a
    warning that names it and why; with no source left the loader raises. Drawing from it
    would otherwise go on forever. With replacement, a source whose shards are half bad
    gives 16 bad ones in a row about once in 65,000 draws: raise it for such a source."""

    def validate(self) -> None:
        if not self.sources:
            raise ValueError("the data config has no sources")
        for s in self.sources:
            s.validate()
        if self.batch_size < 1 or self.num_workers < 0:
            raise ValueError("batch_size must be >= 1 and num_workers >= 0")
        if self.mix not in ("batch", "sample"):
            raise ValueError(f"mix must be 'batch' or 'sample', got {self.mix!r}")
        if self.resampled and not self.epoch_batches:
            raise ValueError("resampled mode needs epoch_batches")
        if self.group_by_length < 0:
            raise ValueError(f"group_by_length must be >= 0, got {self.group_by_length}")
        if self.barren_shards < 1:
            raise ValueError(f"barren_shards must be >= 1, got {self.barren_shards}")


@dataclass
class ModelConfig:
    """The model to train."""

    preset: str = "default"
    """A ``vlm`` architecture preset name, or a path to a VLM config/checkpoint folder."""
    init_from: str | None = None
    """A ``save_pretrained`` folder whose trainable weights start the run (a resumed run
    takes them from its checkpoint and does not read this folder)."""


@dataclass
class OptimConfig:
    """AdamW with linear warm-up and a cosine schedule."""

    lr: float = 1e-4
    """Peak learning rate, reached after ``warmup_steps``."""
    weight_decay: float = 0.01
    """AdamW weight decay, for weight matrices only (not gates, latents, norms or biases)."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW's beta1 and beta2: ``'[0.9, 0.95]'``."""
    gate_lr_mult: float = 10.0
    """The tanh gates learn this much faster (they start at 0 and gate everything)."""
    warmup_steps: int = 100
    """Steps of linear warm-up from ``lr / warmup_steps`` to ``lr``."""
    min_lr_ratio: float = 0.1
    """The cosine schedule ends at ``lr * min_lr_ratio``."""
    grad_clip: float = 1.0
    """Clip the gradient's global norm to this."""
    max_bad_steps: int = 10
    """Stop after this many consecutive steps with a non-finite loss or gradient."""
    ema_decay: float = 0.0
    """Keep an exponential moving average of the trained weights with this decay a step
    (e.g. 0.99; 0: none). Checkpoints then also hold it in ``ema/``, the held-out evaluation
    reports it (``ema_eval_*``) and ``export_latest`` exports it (vlm_train.average)."""


@dataclass
class ParallelConfig:
    """How the run spreads over processes (launched with torchrun)."""

    strategy: str = "auto"
    """``none``, ``ddp``, ``fsdp`` (FSDP2 ``fully_shard``), or ``auto`` (ddp when launched
    with more than one process, else none)."""
    activation_checkpointing: bool = False
    """Recompute each decoder layer (and its cross-attention) in the backward pass."""


@dataclass
class CheckpointConfig:
    """Where and how often the run saves itself, and what it resumes from."""

    dir: str = "runs/default"
    """The run's folder: checkpoints (``step-XXXXXX``), ``metrics.jsonl`` and tensorboard logs."""
    every: int = 500
    """Save a checkpoint every this many steps (and at the last step)."""
    keep: int = 3
    """Keep only the newest this many checkpoints."""
    resume: str | None = "auto"
    """``auto`` (newest complete checkpoint in ``dir``, if any), a checkpoint path, or null."""


@dataclass
class EvalConfig:
    """Held-out loss during training."""

    data: LoaderConfig | None = None
    """The held-out data, a loader config as ``data`` (null: no evaluation)."""
    every: int = 500
    """Evaluate every this many steps (and at the last step)."""
    max_batches: int = 50
    """Batches per evaluation."""


@dataclass
class TrainConfig:
    """A training run: its model, data, optimiser, parallelism, checkpoints and evaluation."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The model to train."""
    data: LoaderConfig = field(default_factory=LoaderConfig)
    """The training data."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """The optimiser and its schedule."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Data parallelism and activation checkpointing."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpoints and resuming."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Held-out evaluation."""
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
    (as bf16, and the frozen backbones stored in bf16 too: less memory, faster on CPUs with
    fast bf16 kernels). A CPU without them trains in fp32 instead (see ``vlm.factory.fast_matmul``)."""
    device: str = "auto"
    """``auto`` (CUDA when available, else CPU), ``cuda`` or ``cpu``; each rank of a
    torchrun launch takes the GPU of its local rank."""
    prefix_cache: str = "auto"
    """Cache the frozen LM's hidden states below the first cross-attention layer (a fixed
    function of each training text), built before training beside the shards (or in
    ``data.prefix_cache_dir``), so each step runs only the layers from there up. It holds
    the added tokens' embedding rows frozen. ``auto``: on where it pays (cross-attention
    not from layer 0, and a run longer than one epoch of its data), otherwise off with the
    reason printed; ``on``; ``off``."""
    seed: int = 0
    """Seed of torch's random numbers (the adapter's initialisation)."""
    log_every: int = 10
    """Log the loss and learning rate every this many steps (``metrics.jsonl``, tensorboard)."""
    tensorboard: bool = True
    """Also write tensorboard logs into ``checkpoint.dir``."""
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
        if not 0.0 <= self.optim.ema_decay < 1.0:
            raise ValueError(f"optim.ema_decay must be in [0, 1) (0: no average), got {self.optim.ema_decay}")
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


# ---------------------------------------------------------------------- command line

PROG = "vlm train"
USAGE = f"{PROG} [-h] [--preset NAME|FILE] [--print_config] [--SECTION.FIELD VALUE ...]"
DESCRIPTION = """\
Train a model: one command from a laptop CPU to many GPUs. The config is the defaults,
then the preset, then each --SECTION.FIELD VALUE (or --FIELD VALUE) in order. A VALUE is
read as JSON where it parses as JSON (1e-4, true, null, '[0.9, 0.99]', '{"preset": "x"}'),
else as a string (a path, a name). Any spelling with dashes works too (--print-config)."""
EPILOG = """\
examples:
  vlm train --preset tiny --steps 200
  vlm train --preset default:colour --checkpoint.dir runs/mine     # resumes by itself
  vlm train --preset mine.json --optim.lr 2e-4 --data.sources '[{"shards": "shards/x", "kind": "qa"}]'
  vlm train --preset tiny --print_config
  torchrun --nproc_per_node 2 -m vlm_train.train --preset tiny --parallel.strategy fsdp

A preset is a JSON file of fields (any subset); "extends": "other" starts from another
preset. A recipe (training/presets/default.json) lists stages: --preset default:STAGE."""


def parse_args(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    """``vlm train``'s own options (``help``, ``preset``, ``print_config``) and the rest: the
    ``--section.field value`` overrides, for :func:`resolve`. Dashes in option names are
    read as underscores."""
    from vlm.cli import underscore_options

    parser = argparse.ArgumentParser(prog=PROG, usage=USAGE, add_help=False, allow_abbrev=False)
    parser.add_argument("-h", "--help", action="store_true")
    parser.add_argument("--preset")
    parser.add_argument("--print_config", action="store_true")
    return parser.parse_known_args(underscore_options(sys.argv[1:] if argv is None else argv))


def help_text() -> str:
    """``vlm train --help``: every field of :class:`TrainConfig`, section by section, with its
    docstring, type and default, generated from the dataclasses by jsonargparse (imported
    here only: it is not needed to train)."""
    import docstring_parser
    from jsonargparse import ArgumentParser, DefaultHelpFormatter, set_parsing_settings

    from .recipe import known_presets

    class Formatter(DefaultHelpFormatter, argparse.RawDescriptionHelpFormatter):
        pass

    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    parser = ArgumentParser(
        prog=PROG, usage=USAGE, description=DESCRIPTION, epilog=EPILOG, formatter_class=Formatter, exit_on_error=False
    )
    parser.add_argument(
        "--preset",
        metavar="NAME|FILE",
        help=f"a training preset or recipe stage ({', '.join(known_presets(PRESET_DIR))}) or a JSON file",
    )
    parser.add_argument("--print_config", action="store_true", help="print the resolved config as JSON and exit")
    parser.add_class_arguments(TrainConfig, fail_untyped=False)
    for action in parser._actions:
        # Shown as our parser reads them: no jsonargparse-only options (a section loaded from a
        # config file, --x.help of a nested class, --list+ to append), JSON for lists and objects.
        strings = [s for s in action.option_strings if not s.endswith("+")]
        if not strings or (action.help and "configuration file" in action.help) or strings[0].endswith(".help"):
            action.help = argparse.SUPPRESS
            continue
        action.option_strings = strings
        if isinstance(action.metavar, str) and "ITEM" in action.metavar or strings[0] == "--eval.data":
            action.metavar = "JSON"
    group = parser.add_argument_group(
        "Each entry of data.sources (and of eval.data.sources: eval.data has the fields of data) is an object"
    )
    for param in docstring_parser.parse_from_object(SourceConfig).params:
        f = next(f for f in dataclasses.fields(SourceConfig) if f.name == param.arg_name)
        kind = str(f.type).replace("None", "null")
        shown = "required, " if f.default is dataclasses.MISSING else ""
        shown += f"type: {kind}" + ("" if shown else f", default: {json.dumps(f.default)}")
        text = f"{param.description} ({shown})"
        group.add_argument(f"source.{f.name}", metavar=f.name, nargs="?", default=argparse.SUPPRESS, help=text)
    return parser.format_help().rstrip("\n") + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """``vlm train`` (and ``python -m vlm_train.train``): resolve the config, print it or train.
    Help and ``--print_config`` import neither torch nor the data pipeline."""
    args, overrides = parse_args(argv)
    if args.help:
        print(help_text(), end="")
        return 0
    try:
        cfg = resolve(args.preset, overrides, validate=not args.print_config)
    except (ValueError, FileNotFoundError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    if args.print_config:
        print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    from .train import train

    train(cfg)
    return 0


__all__ = ["TrainConfig", "SourceConfig", "LoaderConfig", "resolve", "from_dict", "apply_overrides", "main"]
