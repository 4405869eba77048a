"""Building models, the freezing policy, and checkpoint folders.

A checkpoint folder holds ``config.json`` (backbones, their weights' source, every
architecture setting, the added token ids) and ``model.safetensors`` with only the
trainable weights. The backbones are rebuilt from their sources on load.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tokenizers import AddedToken

from .config import VLMConfig, get_preset
from .fileio import atomic_folder
from .lm import check_supported_lm, find_decoder, insert_cross_attention
from .model import VLM
from .processor import Processor
from .registry import load_causal_lm
from .resampler import PerceiverResampler
from .vision import create_vision_encoder
from .xattn import GatedCrossAttentionBlock

log = logging.getLogger(__name__)

FORMAT = "vlm-checkpoint/1"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def _resolve_config(config: VLMConfig | str | dict | None) -> VLMConfig:
    if config is None:
        return get_preset("default")
    if isinstance(config, str):
        return get_preset(config)
    if isinstance(config, dict):
        return VLMConfig.from_dict(config)
    return config.validate()


def _add_media_tokens(tokenizer, cfg: VLMConfig) -> list[int]:
    """Add ``cfg.new_tokens()`` in order; their ids, in that order."""
    tokens = cfg.new_tokens()
    missing = [t for t in tokens if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in missing], special_tokens=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = cfg.pad_token or tokenizer.eos_token
    return tokenizer.convert_tokens_to_ids(tokens)


def added_token_ids(model: VLM) -> dict[str, int]:
    """Each added token's id, as ``config.json`` records them."""
    return dict(zip(model.config.new_tokens(), model.embed.new_ids.tolist(), strict=True))


def apply_freezing(model: VLM) -> int:
    """The one freezing policy: only the resampler, the cross-attention blocks and the
    added tokens' rows train. Returns the trainable parameter count."""
    model.requires_grad_(False)
    model.resampler.requires_grad_(True)
    for layer in model.decoder_layers():
        if layer.xattn is not None:
            layer.xattn.requires_grad_(True)
    model.embed.new_rows.requires_grad_(True)
    if model.head.new_rows is not None:
        model.head.new_rows.requires_grad_(True)

    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    allowed = ("resampler.", "embed.new_rows", "head.new_rows")
    for name in trainable:
        assert name.startswith(allowed) or ".xattn." in name, f"{name} must be frozen"
    for name, p in model.vision.named_parameters():
        assert not p.requires_grad, f"vision.{name} must be frozen"
    for name, p in model.lm.named_parameters():
        assert ".xattn." in f".{name}" or not p.requires_grad, f"lm.{name} must be frozen"
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def create_model_and_transforms(
    config: VLMConfig | str | dict | None = None, verbose: bool = True
) -> tuple[VLM, Processor]:
    """A fresh model (untrained adapter) and its processor (tokenizer + image transform).

    ``config`` is a :class:`VLMConfig`, a preset name (``vlm/presets/*.json``), a dict,
    or ``None`` for the default preset (offline backbones).
    """
    cfg = _resolve_config(config)
    vision, transform = create_vision_encoder(cfg.vision)
    lm, tokenizer = load_causal_lm(cfg.lm.name, getattr(torch, cfg.lm.dtype))
    check_supported_lm(lm)
    new_ids = _add_media_tokens(tokenizer, cfg)
    image_id, eoc_id = tokenizer.convert_tokens_to_ids([cfg.image_token, cfg.end_of_chunk_token])

    _, layers = find_decoder(lm)
    indices = cfg.cross_attn.layer_indices(len(layers))
    dim = lm.config.hidden_size
    xa = cfg.cross_attn
    rs = cfg.resampler
    media_dim = None if rs.project else vision.width  # the resampler's output width
    xa_options = dict(
        norm=xa.norm, norm_eps=xa.norm_eps, ff=xa.ff, ff_dim=xa.ff_dim, qk_norm=xa.qk_norm, vector_gates=xa.vector_gates
    )
    insert_cross_attention(
        layers,
        indices,
        lambda: GatedCrossAttentionBlock(dim, xa.heads, xa.head_dim, xa.ff_mult, media_dim, **xa_options),
    )
    resampler = PerceiverResampler(
        vision_dim=vision.width,
        lm_dim=dim,
        dim=rs.dim or (dim if rs.project else vision.width),
        num_latents=rs.num_latents,
        depth=rs.depth,
        heads=rs.heads,
        head_dim=rs.head_dim,
        ff_mult=rs.ff_mult,
        max_images=rs.max_images,
        spatial_pos=rs.spatial_pos,
        pass_tokens=rs.pass_tokens,
        project=rs.project,
        media_time=rs.media_time,
        ff_act=rs.ff_act,
        qk_norm=rs.qk_norm,
    )
    model = VLM(cfg, vision, lm, resampler, image_id, eoc_id, indices, new_ids)
    count = apply_freezing(model)
    model.train(False)
    if verbose:
        log.info("%s trainable parameters (cross-attention before LM layers %s)", f"{count:,}", indices)
    processor = Processor(
        tokenizer, transform, cfg.image_token, cfg.end_of_chunk_token, system_prompt=cfg.system_prompt
    )
    return model, processor


# ---------------------------------------------------------------------- checkpoints


def save_pretrained(model: VLM, path: str | os.PathLike, dtype: torch.dtype | None = None) -> Path:
    """Write the trainable weights and the config to ``path``, atomically: a reader sees
    the old folder or the complete new one, never a half-written one. ``dtype`` (e.g.
    ``torch.bfloat16``) stores the weights smaller; loading casts them back."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        k: v.detach().to("cpu", dtype=dtype or v.dtype).contiguous() for k, v in model.trainable_state_dict().items()
    }
    meta = {
        "format": FORMAT,
        "config": model.config.to_dict(),
        "added_tokens": added_token_ids(model),
        "cross_attn_layers": model.cross_attn_layers,
        "trainable_parameters": sum(v.numel() for v in state.values()),
    }
    with atomic_folder(path) as tmp:
        save_file(state, tmp / WEIGHTS_FILE, metadata={"format": FORMAT})
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return path


def load_config(path: str | os.PathLike) -> tuple[VLMConfig, dict]:
    path = Path(path)
    file = path / CONFIG_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{path} is not a vlm checkpoint folder: {CONFIG_FILE} is missing")
    try:
        meta = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from None
    found = meta.get("format") if isinstance(meta, dict) else None
    if found != FORMAT:
        raise ValueError(f"{file}: unknown checkpoint format {found!r} (expected {FORMAT!r})")
    return VLMConfig.from_dict(meta["config"]), meta


def load_trainable(model: VLM, state: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Strictly load trainable weights: every key present, no extra key, shapes equal."""
    expected = model.trainable_state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys: {', '.join(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {', '.join(unexpected)}")
        raise ValueError(f"{source} does not match the model; " + "; ".join(parts))
    for name, param in expected.items():
        if state[name].shape != param.shape:
            raise ValueError(f"{source}: {name} has shape {tuple(state[name].shape)}, model has {tuple(param.shape)}")
    check_finite(state, source)
    with torch.no_grad():
        for name, param in expected.items():
            param.copy_(state[name])


def check_finite(state: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Refuse weights with NaN or Inf: they would silently turn every output into NaN
    (a diverged run's checkpoint, or a damaged file)."""
    for name, tensor in state.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            bad = "NaN" if torch.isnan(tensor).any() else "Inf"
            raise ValueError(f"{source}: {name} holds {bad} values; refusing non-finite weights")


DEFAULT_CHECKPOINT = Path(__file__).parent / "weights" / "default"


DEVICES = "auto|cpu|cuda|cuda:N|mps"
DTYPES = ("auto", "float32", "bfloat16", "float16")


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"`` (or ``None``): CUDA when available, else Apple's MPS, else the CPU;
    otherwise the device named (``cpu``, ``cuda``, ``cuda:1``, ``mps``)."""
    if device is None or device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        return torch.device("mps" if mps is not None and mps.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """A torch dtype from its name; ``"auto"`` or ``None``: ``None`` (keep the stored dtypes)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return None if dtype == "auto" else getattr(torch, dtype)


def load_model(
    path: str | os.PathLike | None = None,
    verbose: bool = True,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
) -> tuple[VLM, Processor]:
    """What the applications load: a checkpoint folder, or by default the bundled model
    (``vlm/weights/default``); without one, the default preset with an untrained adapter.

    ``device``: where the model goes (``"auto"``: see :func:`resolve_device`; ``None``:
    it stays on the CPU it is built on). ``dtype``: every weight cast to it (a torch dtype
    or ``float32``/``bfloat16``/``float16``); ``None`` or ``"auto"`` keep the stored ones
    (the frozen LM in its config's ``lm.dtype``, the adapter as saved)."""
    cast = resolve_dtype(dtype)
    if path is not None:
        model, processor = from_pretrained(path, verbose=verbose)
    elif (DEFAULT_CHECKPOINT / CONFIG_FILE).is_file():
        model, processor = from_pretrained(DEFAULT_CHECKPOINT, verbose=verbose)
    else:
        if verbose:
            log.warning("no bundled checkpoint found; using the default preset with an untrained adapter")
        model, processor = create_model_and_transforms(verbose=verbose)
    if device is not None or cast is not None:
        model.to(device=resolve_device(device) if device is not None else None, dtype=cast)
    return model, processor


def from_pretrained(path: str | os.PathLike, verbose: bool = True) -> tuple[VLM, Processor]:
    """Rebuild the backbones named in ``path/config.json`` and load the trainable weights."""
    cfg, meta = load_config(path)
    model, processor = create_model_and_transforms(cfg, verbose=verbose)
    saved = meta.get("added_tokens", {})
    now = added_token_ids(model)
    if saved and saved != now:
        raise ValueError(f"{path}: added token ids {saved} differ from this tokenizer's {now}")
    load_trainable(model, load_file(Path(path) / WEIGHTS_FILE), source=str(Path(path) / WEIGHTS_FILE))
    return model, processor
