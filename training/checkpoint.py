"""Training checkpoints: written atomically, the last K kept, resumable.

``dir/step-000500/`` holds ``model/`` (the trainable weights in the ``save_pretrained``
format the applications load), ``trainer.pt`` (optimiser, scheduler, RNG states, step,
data position, counters) and ``train_config.json``. A folder is written under a
temporary name and renamed when complete, so a folder with a final name is whole.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from vlm.factory import save_pretrained

STEP_DIR = re.compile(r"^step-(\d{6,})$")


def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name) and (p / "trainer.pt").is_file()]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def export_latest(root: str | os.PathLike, target: str | os.PathLike, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Save the newest complete checkpoint's adapter in ``root`` to ``target`` in ``dtype``
    (bf16 halves the bytes), in the format the applications load. Returns the checkpoint."""
    from vlm.factory import from_pretrained

    done = list_checkpoints(root)
    if not done:
        raise FileNotFoundError(f"no complete checkpoint in {root}")
    model, _ = from_pretrained(done[-1] / "model", verbose=False)
    save_pretrained(model, target, dtype=dtype)
    return done[-1]


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(
    root: str | os.PathLike, step: int, model, trainable: dict, trainer_state: dict, config: dict, keep: int
) -> Path:
    """Write ``root/step-XXXXXX`` atomically (rank 0 only) and prune to the newest ``keep``."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=root))
    try:
        # save_pretrained reads model.trainable_state_dict(); feed it the gathered tensors.
        save_pretrained(_WithState(model, trainable), tmp / "model")
        torch.save(trainer_state, tmp / "trainer.pt")
        (tmp / "train_config.json").write_text(json.dumps(config, indent=2) + "\n")
        os.chmod(tmp, 0o755)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(root)[:-keep]:
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


def resolve_resume(spec: str | None, root: str | os.PathLike) -> Path | None:
    if spec is None or spec == "none":
        return None
    if spec == "auto":
        found = list_checkpoints(root)
        return found[-1] if found else None
    path = Path(spec)
    if not (path / "trainer.pt").is_file():
        raise FileNotFoundError(f"{path} is not a complete training checkpoint (no trainer.pt)")
    return path
