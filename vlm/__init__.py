"""vlm: a Flamingo-style vision-language model library.

Where things are: ``resampler.py`` (Perceiver resampler), ``xattn.py`` (gated
cross-attention and its masks), ``lm.py`` (wrapping a Hugging Face decoder),
``model.py`` (the model), ``processor.py`` (text/images → tensors), ``factory.py``
(building, freezing, checkpoints), ``vision.py`` and ``registry.py`` (backbones).

The public names below are imported on first use (PEP 562), so that ``import vlm`` and
the command line's ``vlm --help`` do not pay for torch and transformers until a model is
needed: ``vlm.load_model()`` and ``from vlm import VLM`` work as usual.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .chat import Chat
    from .config import CrossAttnConfig, LMConfig, ResamplerConfig, VisionConfig, VLMConfig, get_preset, list_presets
    from .factory import create_model_and_transforms, from_pretrained, load_model, save_pretrained
    from .generate import GenerationConfig, generate
    from .hub import push_to_hub
    from .model import VLM, VLMOutput
    from .processor import Processor, Segment
    from .tasks import caption_images, sketch_to_html

# Where each public name (``__all__``) is defined.
_EXPORTS = {
    "VLM": "model",
    "VLMOutput": "model",
    "VLMConfig": "config",
    "VisionConfig": "config",
    "LMConfig": "config",
    "ResamplerConfig": "config",
    "CrossAttnConfig": "config",
    "Processor": "processor",
    "Segment": "processor",
    "create_model_and_transforms": "factory",
    "from_pretrained": "factory",
    "load_model": "factory",
    "save_pretrained": "factory",
    "push_to_hub": "hub",
    "get_preset": "config",
    "list_presets": "config",
    "Chat": "chat",
    "GenerationConfig": "generate",
    "generate": "generate",
    "caption_images": "tasks",
    "sketch_to_html": "tasks",
}

__all__ = [
    "VLM",
    "VLMOutput",
    "VLMConfig",
    "VisionConfig",
    "LMConfig",
    "ResamplerConfig",
    "CrossAttnConfig",
    "Processor",
    "Segment",
    "create_model_and_transforms",
    "from_pretrained",
    "load_model",
    "save_pretrained",
    "push_to_hub",
    "get_preset",
    "list_presets",
    "Chat",
    "GenerationConfig",
    "generate",
    "caption_images",
    "sketch_to_html",
]

__version__ = "0.1.0"


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
