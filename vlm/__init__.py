"""vlm: a Flamingo-style vision-language model library.

Where things are: ``resampler.py`` (Perceiver resampler), ``xattn.py`` (gated
cross-attention and its masks), ``lm.py`` (wrapping a Hugging Face decoder),
``model.py`` (the model), ``processor.py`` (text/images → tensors), ``factory.py``
(building, freezing, checkpoints), ``vision.py`` and ``registry.py`` (backbones).
"""

from .config import CrossAttnConfig, LMConfig, ResamplerConfig, VisionConfig, VLMConfig, get_preset, list_presets
from .factory import create_model_and_transforms, from_pretrained, load_model, save_pretrained
from .model import VLM, VLMOutput
from .processor import Processor, Segment

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
    "get_preset",
    "list_presets",
]

__version__ = "0.1.0"
