"""Training checkpoints: written atomically and durably, the last K kept, resumable.

``dir/step-000500/`` holds ``model/`` (the trainable weights in the ``save_pretrained``
format the applications load), ``trainer.pt`` (optimiser, scheduler, RNG states, step,
data position, counters) and ``train_config.json``; with ``optim.ema_decay`` also ``ema/``
(the weights' moving average, vlm_train.average, in the same format as ``model/``). A
folder is written under a temporary name, flushed to disk and renamed when complete, so a
folder with a final name is whole.

``trainer.pt`` holds plain data only (tensors, numbers, strings, lists, dicts) and is
read with ``torch.load(weights_only=True)``: a run folder from someone else cannot run
code on resume. Older versions pickled numpy and Python objects there; such files are
refused, not unpickled.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from vlm.factory import WEIGHTS_FILE, check_finite, load_config, save_pretrained
from vlm.fileio import atomic_folder, load_plain

TRAINER_FILE = "trainer.pt"
EMA_DIR = "ema"
TRAINER_FORMAT = "vlm-trainer/2"
STEP_DIR = re.compile(r"^step-(\d{6,})$")
PARTIAL_DIR = re.compile(r"^\.step-\d{6,}\.tmp-")  # what a killed save leaves (see save)


def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name) and (p / TRAINER_FILE).is_file()]
    return sorted(found, key=_step)


def _step(path: Path) -> int:
    return int(STEP_DIR.match(path.name).group(1))


def export_latest(
    root: str | os.PathLike, target: str | os.PathLike, dtype: torch.dtype = torch.bfloat16, average: bool = True
) -> Path:
    """Save the newest complete checkpoint's adapter in ``root`` to ``target`` in ``dtype``
    (bf16 halves the bytes), in the format the applications load: its moving average
    (``ema/``) where the run kept one and ``average`` is true, else its weights (``model/``).
    Returns the folder exported."""
    from vlm.factory import from_pretrained

    done = list_checkpoints(root)
    if not done:
        raise FileNotFoundError(f"no complete checkpoint in {root}")
    source = done[-1] / EMA_DIR if average and (done[-1] / EMA_DIR / WEIGHTS_FILE).is_file() else done[-1] / "model"
    model, _ = from_pretrained(source, verbose=False)
    save_pretrained(model, target, dtype=dtype)
    return source


def rng_state() -> dict:
    """Every RNG's state as plain data (lists, numbers, tensors) that
    ``torch.load(weights_only=True)`` reads back; numpy's key array becomes an int64 tensor."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def remove_partial(root: str | os.PathLike) -> None:
    """Delete the temporary folders a killed :func:`save` left in ``root`` (only those)."""
    for p in Path(root).iterdir():
        if p.is_dir() and PARTIAL_DIR.match(p.name):
            shutil.rmtree(p, ignore_errors=True)


def save(
    root: str | os.PathLike,
    step: int,
    model,
    trainable: dict,
    trainer_state: dict,
    config: dict,
    keep: int,
    average: dict | None = None,
) -> Path:
    """Write ``root/step-XXXXXX`` atomically (rank 0 only) and prune to the newest ``keep``.
    ``average``: the moving average of the trained weights, written to ``ema/`` (the
    weights it does not hold, as in ``model/``)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    remove_partial(root)
    final = root / f"step-{step:06d}"
    # Replaces an existing folder: a damaged checkpoint that resume fell back past.
    with atomic_folder(final) as tmp:
        # save_pretrained reads model.trainable_state_dict(); feed it the gathered tensors.
        save_pretrained(_WithState(model, trainable), tmp / "model")
        if average is not None:
            save_pretrained(_WithState(model, {**trainable, **average}), tmp / EMA_DIR)
        torch.save({"format": TRAINER_FORMAT, **trainer_state}, tmp / TRAINER_FILE)
        # Read it back as resume will: a state that is not plain data fails now, not at resume.
        load_plain(tmp / TRAINER_FILE, "trainer state")
        (tmp / "train_config.json").write_text(json.dumps(config, indent=2) + "\n")
    # Keep the newest ``keep`` up to this step. A newer folder (one that resume fell back
    # past) is not counted: keeping "the newest" could otherwise delete what we just wrote.
    for old in [p for p in list_checkpoints(root) if _step(p) <= step][:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


class _WithState:
    """The model's identity for ``save_pretrained`` with an explicit trainable state."""

    def __init__(self, model, state: dict):
        self._model, self._state = model, state

    def trainable_state_dict(self) -> dict:
        return self._state

    def __getattr__(self, name):
        return getattr(self._model, name)


@dataclass
class Resume:
    """What a resume needs from a checkpoint folder, read and checked."""

    path: Path
    state: dict
    trainable: dict[str, torch.Tensor]
    average: dict[str, torch.Tensor] | None = None
    """The moving average of the weights (``ema/``), where the run kept one."""


def read(path: str | os.PathLike) -> Resume:
    """Read a checkpoint folder as plain data, checking everything a resume uses; raises
    when any part is missing, damaged, non-finite or not plain data."""
    path = Path(path)
    load_config(path / "model")  # valid JSON, known format, a valid (allow-listed) config
    trainable = load_file(path / "model" / WEIGHTS_FILE)
    check_finite(trainable, str(path / "model" / WEIGHTS_FILE))
    average = None
    if (path / EMA_DIR).exists():
        load_config(path / EMA_DIR)
        average = load_file(path / EMA_DIR / WEIGHTS_FILE)
        check_finite(average, str(path / EMA_DIR / WEIGHTS_FILE))
    file = path / TRAINER_FILE
    advice = (
        "An older vlm version pickled Python objects in trainer.pt; to go on from its weights, start "
        f"a new run (another --checkpoint.dir, or --checkpoint.resume none) with --model.init_from {path / 'model'}."
    )
    state = load_plain(file, "trainer state", advice=advice)
    found = state.get("format") if isinstance(state, dict) else None
    if found != TRAINER_FORMAT:
        raise ValueError(f"{file}: unknown trainer state format {found!r} (expected {TRAINER_FORMAT!r})")
    return Resume(path, state, trainable, average)


def load_resume(spec: str | None, root: str | os.PathLike, log: Callable[[str], None] = print) -> Resume | None:
    """The checkpoint to resume from: ``None``/``"none"`` for none, a folder path, or
    ``"auto"``: the newest readable checkpoint in ``root`` (``None`` if there is none).
    ``auto`` falls back past unreadable ones and ``log``s which and why; when none is
    readable it raises rather than start the run afresh over its checkpoints."""
    if spec is None or spec == "none":
        return None
    if spec != "auto":
        path = Path(spec)
        if not (path / TRAINER_FILE).is_file():
            raise FileNotFoundError(f"{path} is not a complete training checkpoint (no {TRAINER_FILE})")
        return read(path)
    failures = []
    for path in reversed(list_checkpoints(root)):
        try:
            resume = read(path)
        except Exception as e:  # any damage: truncated or missing file, bad JSON, non-finite, unsafe
            failures.append(f"{path.name}: {type(e).__name__}: {e}")
            continue
        if failures:
            log(f"checkpoint unreadable, skipped ({'; '.join(failures)}); falling back to {path}")
        return resume
    if failures:
        raise ValueError(f"no readable checkpoint in {root} ({'; '.join(failures)})")
    return None
