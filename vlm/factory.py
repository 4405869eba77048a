"""Building models, the freezing policy, and checkpoint folders.

A checkpoint folder holds ``config.json`` (backbones, their weights' source, every
architecture setting, the added token ids) and ``model.safetensors`` with only the
trainable weights. The backbones are rebuilt from their sources on load.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tokenizers import AddedToken

from .config import VLMConfig, get_preset
from .fileio import atomic_folder, read_json
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
CARD_FILE = "README.md"


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


def _shared_backbones(share: tuple[VLM, Processor], cfg: VLMConfig):
    """The frozen tower and LM of ``share``'s model for a second adapter: new modules
    (so each model has its own cross-attention blocks) holding the same tensors. The second
    adapter may take other tokens from the tower (``vision.feature_stride``, ...)."""
    base, processor = share
    same = base.config.vision.same_tower(cfg.vision) and (base.config.lm, base.config.new_tokens()) == (
        cfg.lm,
        cfg.new_tokens(),
    )
    if not same:
        raise ValueError(
            "sharing backbones needs the same vision tower, LM and added tokens: "
            f"this config has vision={cfg.vision}, lm={cfg.lm}; the loaded model has "
            f"vision={base.config.vision}, lm={base.config.lm}"
        )
    from .quantize import CONVERTED_LINEARS

    frozen = {
        id(t): t
        for module in (base.vision, base.lm)
        for name, t in (*module.named_parameters(), *module.named_buffers())
        if ".xattn." not in f".{name}"
    }
    # Layers converted for inference (vlm.quantize) hold their weights outside parameters and
    # buffers: the same module objects, not copies of their weights.
    frozen.update(
        (id(m), m)
        for module in (base.vision, base.lm)
        for name, m in module.named_modules()
        if isinstance(m, CONVERTED_LINEARS) and ".xattn." not in f".{name}."
    )
    vision, lm = copy.deepcopy(base.vision, frozen).reading(cfg.vision), copy.deepcopy(base.lm, frozen)
    layers = find_decoder(lm)[1]
    for i, layer in enumerate(layers):  # back to the bare decoder layers; this model's blocks go in below
        layers[i] = layer.decoder_layer
    return vision, processor.image_transform, lm, processor.tokenizer


def create_model_and_transforms(
    config: VLMConfig | str | dict | None = None,
    verbose: bool = True,
    share: tuple[VLM, Processor] | None = None,
) -> tuple[VLM, Processor]:
    """A fresh model (untrained adapter) and its processor (tokenizer + image transform).

    ``config`` is a :class:`VLMConfig`, a preset name (``vlm/presets/*.json``), a dict,
    or ``None`` for the default preset (offline backbones). ``share``: a loaded
    ``(model, processor)`` whose frozen vision tower and LM (the same config) the new model
    uses too, tensor for tensor: a second adapter costs no second copy of the backbones.
    """
    cfg = _resolve_config(config)
    if share is not None:
        vision, transform, lm, tokenizer = _shared_backbones(share, cfg)
    else:
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
    tied = share[0].head.tied if share is not None else None  # its LM's head may be converted already
    model = VLM(cfg, vision, lm, resampler, image_id, eoc_id, indices, new_ids, tied=tied)
    count = apply_freezing(model)
    model.train(False)
    if verbose:
        log.info("%s trainable parameters (cross-attention before LM layers %s)", f"{count:,}", indices)
    processor = Processor(
        tokenizer, transform, cfg.image_token, cfg.end_of_chunk_token, system_prompt=cfg.system_prompt
    )
    return model, processor


# ---------------------------------------------------------------------- checkpoints


def save_pretrained(
    model: VLM,
    path: str | os.PathLike,
    dtype: torch.dtype | None = None,
    *,
    model_card: str | None = None,
    push_to_hub: bool = False,
    repo_id: str | None = None,
    **hub_kwargs,
) -> Path:
    """Write the checkpoint folder ``path``, atomically: a reader sees the old folder or
    the complete new one, never a half-written one. It holds the trainable weights, the
    config, the decoding defaults (``generation_config.json``) and a model card
    (``README.md``: ``model_card``, else the one already in ``path``, else one written from
    the config). ``dtype`` (e.g. ``torch.bfloat16``) stores the weights smaller; loading
    casts them back. ``push_to_hub=True`` then uploads the folder to ``repo_id`` (default:
    the folder's name); ``hub_kwargs`` (``private``, ``token``, ``revision``, ...) go to
    :func:`vlm.hub.upload_folder`."""
    from .tasks import GENERATION_CONFIG_FILE, default_generation_config

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
    card = path / CARD_FILE
    if model_card is None and card.is_file():
        model_card = card.read_text()
    if model_card is None:
        from .hub import model_card_text

        model_card = model_card_text(model.config, meta, repo_id)
    decoding = model.generation_defaults or default_generation_config()
    with atomic_folder(path) as tmp:
        save_file(state, tmp / WEIGHTS_FILE, metadata={"format": FORMAT})
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        (tmp / GENERATION_CONFIG_FILE).write_text(json.dumps(decoding, indent=2) + "\n")
        (tmp / CARD_FILE).write_text(model_card)
    if push_to_hub:
        from .hub import upload_folder

        upload_folder(path, repo_id or path.name, **hub_kwargs)
    return path


def load_config(path: str | os.PathLike) -> tuple[VLMConfig, dict]:
    path = Path(path)
    file = path / CONFIG_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{path} is not a vlm checkpoint folder: {CONFIG_FILE} is missing")
    meta = read_json(file)
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
TASK_CHECKPOINTS = {"sketch": Path(__file__).parent / "weights" / "sketch"}
"""Bundled adapters of their own for a task, on the default checkpoint's backbones: a
task's tools load it instead of the default when it is there."""


def task_checkpoint(task: str | None) -> Path | None:
    """The bundled adapter of ``task`` (:data:`TASK_CHECKPOINTS`) if it is there, else None."""
    folder = TASK_CHECKPOINTS.get(task) if task else None
    return folder if folder is not None and (folder / CONFIG_FILE).is_file() else None


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


def fast_matmul(dtype: torch.dtype, device: str | torch.device | None = "cpu") -> bool:
    """Whether ``device`` multiplies ``dtype`` matrices with fast kernels. A CPU without
    them for bf16 or fp16 (oneDNN needs AVX-512 for those; x86 CPUs with only AVX2 lack
    it) falls back to PyTorch's reference GEMM, tens of times slower than fp32 there."""
    if dtype not in (torch.bfloat16, torch.float16) or resolve_device(device).type != "cpu":
        return True
    check = "_is_mkldnn_bf16_supported" if dtype == torch.bfloat16 else "_is_mkldnn_fp16_supported"
    try:
        return bool(getattr(torch.ops.mkldnn, check)())
    except (AttributeError, RuntimeError):  # a build without oneDNN: no way to tell
        return True


def load_model(
    path: str | os.PathLike | None = None,
    verbose: bool = True,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    task: str | None = None,
    lm_weights: str | None = None,
    **hub_kwargs,
) -> tuple[VLM, Processor]:
    """What the applications load: ``path`` (a checkpoint folder or Hub repo id, see
    :func:`from_pretrained`), or by default the bundled model (``vlm/weights/default``);
    without one, the default preset with an untrained adapter. ``task``: a task whose
    bundled adapter (:data:`TASK_CHECKPOINTS`, e.g. ``vlm/weights/sketch``) is the default
    when there is one; ``lm_weights``: how the frozen LM's weights are stored for inference
    (one of ``vlm.quantize.LM_WEIGHTS``, or ``"auto"``: fp16 weights with float32 arithmetic
    on CPUs that have the kernel, see :func:`vlm.quantize.apply_lm_weights`; ``None``: as
    loaded); ``hub_kwargs`` (``share=``, ``revision=``, ...) go to :func:`from_pretrained`."""
    from .quantize import apply_lm_weights

    if path is None:
        path = task_checkpoint(task)
    if path is None and (DEFAULT_CHECKPOINT / CONFIG_FILE).is_file():
        path = DEFAULT_CHECKPOINT
    if path is not None:
        model, processor = from_pretrained(path, verbose=verbose, device=device, dtype=dtype, **hub_kwargs)
    else:
        if verbose:
            log.warning("no bundled checkpoint found; using the default preset with an untrained adapter")
        model, processor = create_model_and_transforms(verbose=verbose)
        model = place(model, device, dtype)
    return apply_lm_weights(model, lm_weights), processor


def place(model: VLM, device: str | torch.device | None, dtype: str | torch.dtype | None) -> VLM:
    """``model`` moved to ``device`` and cast to ``dtype`` (see :func:`from_pretrained`)."""
    if dtype == "auto":
        dtype = torch.bfloat16 if device is not None and resolve_device(device).type == "cuda" else None
    cast = resolve_dtype(dtype)
    if cast is not None and not fast_matmul(cast, device):
        warnings.warn(
            f"dtype {cast} on this CPU: it has no fast {cast} matrix multiply, so the model will run many "
            "times slower than in float32 (dtype 'auto' or 'float32' avoids that)",
            stacklevel=3,
        )
    if device is not None or cast is not None:
        model.to(device=resolve_device(device) if device is not None else None, dtype=cast)
    return model


def from_pretrained(
    path: str | os.PathLike,
    verbose: bool = True,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    *,
    revision: str | None = None,
    local_files_only: bool = False,
    cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
    share: tuple[VLM, Processor] | None = None,
) -> tuple[VLM, Processor]:
    """Load a checkpoint: rebuild the backbones named in its ``config.json`` and load the
    trainable weights. ``share``: a loaded ``(model, processor)`` on the same backbones,
    whose tensors the new model uses instead of loading them again (two adapters, one LM).

    ``path``: a checkpoint folder, or a Hugging Face Hub repo id (``owner/name``) fetched
    through the Hub cache at ``revision`` (with ``local_files_only=True`` or
    ``HF_HUB_OFFLINE=1``: from the cache only). ``device``: where the model goes
    (``"auto"``: see :func:`resolve_device`; ``None``: the CPU it is built on). ``dtype``:
    every weight cast to it (a torch dtype or ``float32``/``bfloat16``/``float16``;
    ``"auto"`` picks bfloat16 on CUDA); ``None`` keeps the stored ones (the frozen LM in
    its config's ``lm.dtype``, the adapter as saved)."""
    from .hub import resolve_checkpoint
    from .tasks import GENERATION_CONFIG_FILE, check_generation_config

    folder = resolve_checkpoint(
        path, revision=revision, local_files_only=local_files_only, cache_dir=cache_dir, token=token
    )
    cfg, meta = load_config(folder)
    model, processor = create_model_and_transforms(cfg, verbose=verbose, share=share)
    saved = meta.get("added_tokens", {})
    now = added_token_ids(model)
    if saved and saved != now:
        raise ValueError(f"{path}: added token ids {saved} differ from this tokenizer's {now}")
    load_trainable(model, load_file(folder / WEIGHTS_FILE), source=str(folder / WEIGHTS_FILE))
    decoding = folder / GENERATION_CONFIG_FILE
    if decoding.is_file():
        model.generation_defaults = check_generation_config(read_json(decoding), str(decoding))
    return place(model, device, dtype), processor
