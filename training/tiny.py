"""The ``tiny`` preset's workspace: a tiny random model and a few synthetic shape shards,
built offline in seconds into the user cache, for smoke runs and examples.

``"tiny:<part>"`` as ``model.preset`` or as a source's ``shards`` names a part of the
workspace (``model``, ``shapes-train``, ``shapes-val``); :func:`expand_tiny_paths` builds the
workspace on first use and puts the folder in its place when the config is built.
"""

from __future__ import annotations

import shutil
from pathlib import Path

PARTS = ("model", "shapes-train", "shapes-val")
SAMPLES = {"train": 48, "val": 16}  # shape scenes; each gives a few questions
VERSION = 1  # bump when the workspace's contents change: an older one is rebuilt


def workspace_dir() -> Path:
    from vlm.registry import cache_dir

    return cache_dir() / f"tiny-workspace-v{VERSION}"


def tiny_workspace(root: Path | None = None) -> Path:
    """The workspace folder, built once (under a file lock, so ranks of one launch that
    all ask for it build it once)."""
    root = workspace_dir() if root is None else Path(root)
    if (root / "ready").is_file():
        return root
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        _lock(lock)
        if not (root / "ready").is_file():
            _build(root)
            (root / "ready").write_text("")
    return root


def _lock(file) -> None:
    try:
        import fcntl  # POSIX only: imported here so the module imports on Windows too
    except ImportError:  # Windows: build unlocked (several ranks of one launch are rare there)
        return
    fcntl.flock(file, fcntl.LOCK_EX)


def _build(root: Path) -> None:
    import torch

    import vlm
    from vlm.tiny import make_tiny_lm, tiny_config

    from .data import builders
    from .data.shards import ShardWriter

    for part in ("lm", *PARTS):
        shutil.rmtree(root / part, ignore_errors=True)  # what a killed build left
    make_tiny_lm(root / "lm", "llama", chat=True)
    torch.manual_seed(0)
    model, _ = vlm.create_model_and_transforms(tiny_config(root / "lm"), verbose=False)
    vlm.save_pretrained(model, root / "model")
    for split, count in SAMPLES.items():
        with ShardWriter(root / f"shapes-{split}", f"shapes-{split}", max_samples=100) as writer:
            for sample, _error in builders.shapes(split, count):
                if sample is not None:
                    writer.write(sample)


def _expand(value, where: str):
    if not (isinstance(value, str) and value.startswith("tiny:")):
        return value
    part = value.split(":", 1)[1]
    if part not in PARTS:
        raise ValueError(f"{where}: unknown tiny workspace part {value!r}; parts: {', '.join(PARTS)}")
    return str(tiny_workspace() / part)


def expand_tiny_paths(data: dict) -> dict:
    """Replace ``tiny:<part>`` in ``model.preset`` and in every source's ``shards``."""
    if isinstance(data.get("model"), dict):
        data["model"]["preset"] = _expand(data["model"].get("preset"), "model.preset")
    loaders = [("data", data.get("data"))]
    if isinstance(data.get("eval"), dict):
        loaders.append(("eval.data", data["eval"].get("data")))
    for where, loader in loaders:
        if isinstance(loader, dict) and isinstance(loader.get("sources"), list):
            for i, source in enumerate(loader["sources"]):
                if isinstance(source, dict):
                    source["shards"] = _expand(source.get("shards"), f"{where}.sources[{i}].shards")
    return data
