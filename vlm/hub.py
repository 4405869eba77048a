"""Checkpoints on the Hugging Face Hub: resolving a repo id to a local folder through the
Hub cache, uploading a checkpoint folder, and the model card written with it.

Only an explicit repo id or upload touches the network; with ``HF_HUB_OFFLINE=1`` or
``local_files_only=True`` a repo id resolves from the cache alone.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import VLMConfig
    from .model import VLM

# The files a checkpoint folder holds (vlm.factory writes them); nothing else is fetched.
CHECKPOINT_FILES = ("config.json", "model.safetensors", "generation_config.json", "README.md")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def is_repo_id(name: str | os.PathLike) -> bool:
    """Whether ``name`` is not a local folder and reads as a Hub repo id (``owner/name``)."""
    text = str(name)
    return not Path(text).expanduser().is_dir() and not text.startswith((".", "/", "~")) and bool(_REPO_ID.match(text))


def resolve_checkpoint(
    name: str | os.PathLike,
    revision: str | None = None,
    local_files_only: bool = False,
    cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
) -> Path:
    """The local folder of a checkpoint: ``name`` itself when it is a folder, else the
    Hub repo ``name`` at ``revision``, downloaded into (or found in) the Hub cache."""
    path = Path(name).expanduser()
    if path.is_dir():
        if revision is not None:
            raise ValueError(f"{name}: revision={revision!r} applies to Hub repo ids, and this is a local folder")
        return path
    text = str(name)
    if not is_repo_id(text):
        raise FileNotFoundError(f"checkpoint {text!r}: no such folder (nor is it a Hub repo id like 'owner/name')")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        folder = snapshot_download(
            text,
            revision=revision,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
            token=token,
            allow_patterns=list(CHECKPOINT_FILES),
        )
    except LocalEntryNotFoundError:
        raise FileNotFoundError(
            f"checkpoint {text!r}: no such local folder, and the Hub repo is not in the cache "
            f"(revision {revision or 'main'}) while downloads are off (local_files_only or HF_HUB_OFFLINE=1). "
            f"Fetch it once with network (`hf download {text}`), or pass a checkpoint folder."
        ) from None
    except RevisionNotFoundError:
        raise FileNotFoundError(f"checkpoint {text!r}: the Hub repo has no revision {revision!r}") from None
    except RepositoryNotFoundError:
        raise FileNotFoundError(
            f"checkpoint {text!r}: no such local folder, and no such Hub repo (or it is private: pass token=...)"
        ) from None
    return Path(folder)


def upload_folder(
    folder: str | os.PathLike,
    repo_id: str,
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    commit_message: str = "Upload vlm checkpoint",
):
    """Create the model repo ``repo_id`` if needed and upload the checkpoint ``folder``
    (its checkpoint files only) as one commit. Returns the Hub's commit info."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    return api.upload_folder(
        repo_id=repo_id,
        folder_path=str(folder),
        repo_type="model",
        revision=revision,
        commit_message=commit_message,
        allow_patterns=list(CHECKPOINT_FILES),
    )


def push_to_hub(model: VLM, repo_id: str, dtype=None, model_card: str | None = None, **kwargs):
    """Save ``model`` as a checkpoint folder (:func:`vlm.save_pretrained`, in a temporary
    folder) and upload it to the Hub repo ``repo_id``; ``kwargs`` go to :func:`upload_folder`."""
    from .factory import save_pretrained

    with tempfile.TemporaryDirectory() as tmp:
        folder = save_pretrained(model, Path(tmp) / "checkpoint", dtype=dtype, model_card=model_card, repo_id=repo_id)
        return upload_folder(folder, repo_id, **kwargs)


def model_card_text(config: VLMConfig, meta: dict, repo_id: str | None = None) -> str:
    """A model card for a checkpoint: Hub metadata (library, task, base model) and what the
    config says about the architecture (``meta``: what ``config.json`` records besides the
    config), with how to load it."""
    from huggingface_hub import ModelCardData

    base = config.lm.name
    hub_lm = base if "/" in base and is_repo_id(base) else None
    data = ModelCardData(
        library_name="vlm",
        pipeline_tag="image-text-to-text",
        tags=["vision-language", "flamingo", "perceiver-resampler", "gated-cross-attention"],
        base_model=hub_lm,
    )
    vision = config.vision
    tower = f"{vision.name} ({vision.pretrained})" if getattr(vision, "pretrained", None) else vision.name
    where = repo_id or "path/to/this/folder"
    return f"""---
{data.to_yaml()}
---

# {repo_id.split("/")[-1] if repo_id else "vlm checkpoint"}

A Flamingo-style vision-language model made with the `vlm` library: a frozen
image encoder and a frozen language model joined by a trainable Perceiver resampler and
gated cross-attention.

- Vision tower: `{tower}`{f", {vision.image_size} px" if vision.image_size else ""}
- Language model: `{base}`
- Resampler: {config.resampler.num_latents} latents, depth {config.resampler.depth}
- Gated cross-attention before decoder layers {", ".join(map(str, meta["cross_attn_layers"]))}
- Trainable parameters in this checkpoint: {meta["trainable_parameters"]:,}

The checkpoint holds only the trained adapter (`model.safetensors`), its `config.json` and
its decoding defaults (`generation_config.json`); the backbones load from their sources.

```python
import vlm

model, processor = vlm.from_pretrained("{where}")
```
"""
