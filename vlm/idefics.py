"""``vlm convert idefics``: transformers' ``IdeficsForVisionText2Text`` as a vlm checkpoint folder.

    vlm convert idefics downloads/idefics-9b --out models/idefics-9b
    vlm convert idefics weights.safetensors --config config.json --tokenizer tok/ --out models/idefics

IDEFICS is Flamingo with a LLaMA decoder: its decoder layers are Llama's, so the decoder
becomes a stock ``LlamaForCausalLM`` and everything else maps onto our blocks with config
fields (docs/idefics.md lists them). Its decoder and its ViT exist only inside the IDEFICS
checkpoint, so the folder written holds them too::

    OUT/config.json, model.safetensors, ...   the adapter, as in every vlm checkpoint
    OUT/lm/                                   the decoder: a Llama folder with IDEFICS's tokenizer
    OUT/vision.safetensors                    the ViT under open_clip's names

config.json names ``lm/`` and ``vision.safetensors`` by absolute path: move the folder and
convert again (or edit the two paths). Weights are read as plain tensors (safetensors, or
``torch.load(weights_only=True)``); nothing is unpickled and no IDEFICS model is built.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from pathlib import Path
from typing import Any

from .config import CrossAttnConfig, LMConfig, ResamplerConfig, VisionConfig, VLMConfig
from .fileio import read_json

log = logging.getLogger("vlm.convert")

LM_DIR = "lm"
VISION_FILE = "vision.safetensors"
IMAGE_TOKEN = "<image>"
FAKE_TOKEN = "<fake_token_around_image>"
"""IDEFICS writes each image as ``<fake_token_around_image><image><fake_token_around_image>``;
it is vlm's ``end_of_chunk_token`` here (the only other added token, and a stop token)."""

# The open_clip config the ViT is built from: IDEFICS's own tower is open_clip's ViT-H-14
# (laion2b), and every size below is overwritten from the checkpoint's vision config.
VISION_NAME = "ViT-H-14"
# IDEFICS keeps neither CLIP's projection nor its text tower. open_clip builds both: the
# projection (unused, vlm reads tokens) is stored as zeros, the text tower is built tiny.
PROJ_DIM = 16
TEXT_CFG = {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 1, "layers": 1}

# Buffers that older transformers versions saved with the weights.
_BUFFERS = re.compile(r"(position_ids|rotary_emb\.inv_freq)$")


# ---------------------------------------------------------------------- reading


def read_config(path: str | Path):
    """An IDEFICS ``config.json`` (or the folder holding it) as transformers' ``IdeficsConfig``."""
    from transformers import IdeficsConfig

    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"IDEFICS config {str(file)!r} not found")
    data = read_json(file)
    if not isinstance(data, dict) or data.get("model_type") != "idefics":
        found = data.get("model_type") if isinstance(data, dict) else None
        raise ValueError(f"{file} is not an IDEFICS config (model_type {found!r}, expected 'idefics')")
    return IdeficsConfig.from_dict(data)


def _weight_files(folder: Path) -> list[Path]:
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (folder / index).is_file():
            names = sorted(set(json.loads((folder / index).read_text())["weight_map"].values()))
            if any(Path(n).name != n for n in names):  # an index names files beside it, nothing else
                raise ValueError(f"{folder / index} names files outside {folder}")
            return [folder / n for n in names]
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return [folder / name]
    raise FileNotFoundError(f"no model.safetensors or pytorch_model.bin (or their index) in {folder}")


def read_weights(source: str | Path) -> dict[str, Any]:
    """The state dict of an ``IdeficsForVisionText2Text``: a folder saved with ``save_pretrained``
    (one file or shards) or a single weights file, read as plain tensors."""
    from .fileio import load_tensors

    source = Path(source)
    files = _weight_files(source) if source.is_dir() else [source]
    state: dict[str, Any] = {}
    for file in files:
        state.update(load_tensors(file, "IDEFICS weights file"))
    state = {k: v for k, v in state.items() if not _BUFFERS.search(k)}
    if "model.perceiver_resampler.latents" not in state and "model.embed_tokens.weight" not in state:
        raise ValueError(f"{source} does not hold an IdeficsForVisionText2Text state dict (no model.* weights)")
    return state


class _Weights:
    """The checkpoint's tensors, each taken once; what is left over at the end is an error."""

    def __init__(self, state: dict[str, Any]):
        self.state = dict(state)

    def take(self, key: str):
        if key not in self.state:
            raise ValueError(f"the checkpoint has no {key!r}: its weights do not fit its config")
        return self.state.pop(key)

    def cat(self, *keys: str):
        import torch

        return torch.cat([self.take(k) for k in keys])

    def check_used(self) -> None:
        if self.state:
            names = sorted(self.state)
            raise ValueError(
                f"the checkpoint has {len(names)} weights its config does not explain, e.g. {names[:4]}: "
                "its weights do not fit its config"
            )


def _check_keys(expected: set[str], found: set[str], what: str) -> None:
    missing, unexpected = sorted(expected - found), sorted(found - expected)
    parts = [
        f"{len(names)} {kind}, e.g. {names[:3]}"
        for kind, names in (("missing", missing), ("unexpected", unexpected))
        if names
    ]
    if parts:
        raise ValueError(f"the {what}'s weights do not fit its config: " + "; ".join(parts))


# ---------------------------------------------------------------------- config


def check_supported(cfg) -> None:
    """Refuse IDEFICS configs with no vlm equivalent, naming the setting."""
    v = cfg.vision_config
    reasons = []
    if not cfg.use_resampler:
        reasons.append("use_resampler=False (the cross-attention reads the ViT tokens directly; vlm always resamples)")
    if cfg.hidden_act != "silu":
        reasons.append(f"hidden_act={cfg.hidden_act!r} (the cross-attention's MLP is a SwiGLU: silu only)")
    if cfg.num_hidden_layers % cfg.cross_layer_interval:
        reasons.append(
            f"{cfg.num_hidden_layers} layers with cross_layer_interval={cfg.cross_layer_interval} "
            "(IDEFICS itself runs out of cross-attention layers)"
        )
    if v.hidden_act not in ("gelu", "quick_gelu") or v.layer_norm_eps != 1e-5:
        reasons.append(f"a ViT with {v.hidden_act!r} and layer_norm_eps={v.layer_norm_eps} (open_clip: gelu, 1e-5)")
    mlp_width = int(v.embed_dim * (v.intermediate_size / v.embed_dim))  # as open_clip computes it from mlp_ratio
    if v.embed_dim % v.num_attention_heads or mlp_width != v.intermediate_size:
        reasons.append(f"a ViT of width {v.embed_dim}, {v.num_attention_heads} heads, MLP {v.intermediate_size}")
    if reasons:
        raise ValueError("this IDEFICS model cannot be converted: " + "; ".join(reasons))


def idefics_vision(cfg, pretrained: str | None) -> VisionConfig:
    """open_clip's ViT with IDEFICS's sizes, read with its class token."""
    v = cfg.vision_config
    vision_cfg = {
        "image_size": v.image_size,
        "layers": v.num_hidden_layers,
        "width": v.embed_dim,
        "head_width": v.embed_dim // v.num_attention_heads,
        "mlp_ratio": v.intermediate_size / v.embed_dim,
        "patch_size": v.patch_size,
    }
    kwargs: dict[str, Any] = {"embed_dim": PROJ_DIM, "vision_cfg": vision_cfg, "text_cfg": dict(TEXT_CFG)}
    if v.hidden_act == "quick_gelu":
        kwargs["force_quick_gelu"] = True
    return VisionConfig(
        kind="open_clip",
        name=VISION_NAME,
        pretrained=pretrained,
        image_size=v.image_size,
        model_kwargs=kwargs,
        class_token=True,  # the perceiver reads last_hidden_state: class token first, no ln_post
    )


def idefics_config(cfg, tokenizer, lm: str, vision: str | None, lm_dtype: str = "float32") -> VLMConfig:
    """The :class:`VLMConfig` of an IDEFICS model (its ``IdeficsConfig`` and tokenizer)."""
    check_supported(cfg)
    p = cfg.perceiver_config
    base, extra = cfg.vocab_size, cfg.additional_vocab_size
    if len(tokenizer) < base + extra:
        raise ValueError(
            f"the tokenizer has {len(tokenizer)} tokens, the model {base} + {extra} additional: "
            "is this the tokenizer of this checkpoint?"
        )
    if len(tokenizer) > base + extra:  # IDEFICS itself fails on their ids: it has no rows for them
        rowless = tokenizer.convert_ids_to_tokens(list(range(base + extra, len(tokenizer))))
        log.warning("the tokenizer's tokens %s have no embedding rows in the checkpoint: do not use them", rowless)
    added = tokenizer.convert_ids_to_tokens(list(range(base, base + extra)))
    if IMAGE_TOKEN not in added or FAKE_TOKEN not in added:
        raise ValueError(f"the tokenizer's additional tokens are {added}: expected {IMAGE_TOKEN} and {FAKE_TOKEN}")
    heads = cfg.num_attention_heads
    return VLMConfig(
        vision=idefics_vision(cfg, vision),
        lm=LMConfig(name=lm, dtype=lm_dtype, vocab_size=base + extra),
        resampler=ResamplerConfig(
            num_latents=p.resampler_n_latents,
            depth=p.resampler_depth,
            heads=p.resampler_n_heads,
            head_dim=p.resampler_head_dim,
            ff_mult=4,  # IDEFICS's perceiver MLP is 4 × the vision width
            project=False,
            media_time=False,
            ff_act="relu",
            qk_norm=p.qk_layer_norms_perceiver,
        ),
        cross_attn=CrossAttnConfig(
            every=cfg.cross_layer_interval,
            start=0,  # before layer i when i % cross_layer_interval == 0
            heads=heads,
            head_dim=cfg.hidden_size // heads,
            ff_dim=cfg.intermediate_size,
            only_latest_image=True,
            norm="rmsnorm",
            norm_eps=cfg.rms_norm_eps,
            ff="swiglu",
            qk_norm=cfg.qk_layer_norms,
            vector_gates=cfg.alpha_type == "vector",
        ),
        image_token=IMAGE_TOKEN,
        end_of_chunk_token=FAKE_TOKEN,
        added_tokens=added,
    ).validate()


def llama_config(cfg):
    """The decoder's ``LlamaConfig``: the same layers (RMSNorm, rotary, SwiGLU, no biases)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_attention_heads,
        hidden_act=cfg.hidden_act,
        max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps,
        rope_parameters=dict(cfg.rope_parameters),
        tie_word_embeddings=cfg.tie_word_embeddings,
        pad_token_id=cfg.pad_token_id,
        bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id,
    )


# ---------------------------------------------------------------------- weights


def vision_state_dict(w: _Weights, cfg) -> dict[str, Any]:
    """HF CLIP ViT weights under open_clip's ``VisionTransformer`` names (``visual.*``)."""
    import torch

    p = "model.vision_model."
    out = {
        "conv1.weight": w.take(p + "embeddings.patch_embedding.weight"),
        "class_embedding": w.take(p + "embeddings.class_embedding"),
        "positional_embedding": w.take(p + "embeddings.position_embedding.weight"),
    }
    pairs = {"ln_pre": "pre_layrnorm", "ln_post": "post_layernorm"}
    for i in range(cfg.vision_config.num_hidden_layers):
        a, o = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for ours, theirs in [("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"), ("attn.out_proj", "self_attn.out_proj")]:
            pairs[o + ours] = a + theirs
        pairs[o + "mlp.c_fc"], pairs[o + "mlp.c_proj"] = a + "mlp.fc1", a + "mlp.fc2"
        for kind in ("weight", "bias"):  # open_clip's nn.MultiheadAttention keeps q, k, v in one matrix
            out[f"{o}attn.in_proj_{kind}"] = w.cat(*(f"{p}{a}self_attn.{x}_proj.{kind}" for x in "qkv"))
    for ours, theirs in pairs.items():
        for kind in ("weight", "bias"):
            out[f"{ours}.{kind}"] = w.take(f"{p}{theirs}.{kind}")
    width = out["class_embedding"].shape[0]
    out["proj"] = torch.zeros(width, PROJ_DIM, dtype=out["class_embedding"].dtype)
    return {"visual." + k: v.contiguous() for k, v in out.items()}


def decoder_state_dict(w: _Weights, cfg) -> dict[str, Any]:
    """The decoder's weights under ``LlamaForCausalLM``'s names (the same names, minus IDEFICS's extras)."""
    names = [
        k
        for k in list(w.state)
        if k.startswith("model.layers.") or k in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")
    ]
    out = {k: w.take(k) for k in names}
    if cfg.tie_word_embeddings:
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
    return out


def adapter_state_dict(model, w: _Weights, cfg) -> dict[str, Any]:
    """The perceiver, the gated cross-attention and the additional tokens' rows under our
    names (``model.trainable_state_dict()``'s keys)."""
    pr = "model.perceiver_resampler."
    out = {"resampler.latents": w.take(pr + "latents")}
    norms = ("weight", "bias")
    for i in range(cfg.perceiver_config.resampler_depth):
        b, o = f"{pr}blocks.{i}.", f"resampler.layers.{i}."
        pairs = {"0.norm_media": "0.context_layer_norm", "0.norm_latents": "0.latents_layer_norm", "1.0": "1.ln"}
        if cfg.perceiver_config.qk_layer_norms_perceiver:
            pairs.update({"0.q_norm": "0.q_layer_norm", "0.k_norm": "0.k_layer_norm"})
        for ours, theirs in pairs.items():
            for kind in norms:
                out[f"{o}{ours}.{kind}"] = w.take(f"{b}{theirs}.{kind}")
        out[o + "0.to_q.weight"] = w.take(b + "0.q_proj.weight")
        out[o + "0.to_kv.weight"] = w.cat(b + "0.k_proj.weight", b + "0.v_proj.weight")
        out[o + "0.to_out.weight"] = w.take(b + "0.output_proj.weight")
        out[o + "1.1.weight"] = w.take(b + "1.fc.weight")
        out[o + "1.3.weight"] = w.take(b + "1.c_proj.weight")
    for kind in norms:
        out[f"resampler.norm.{kind}"] = w.take(f"{pr}layer_norm.{kind}")

    module_names = {m: n for n, m in model.named_modules()}
    layers = model.decoder_layers()
    for j, index in enumerate(model.cross_attn_layers):
        g, o = f"model.gated_cross_attn_layers.{j}.", module_names[layers[index].xattn] + "."
        pairs = {
            "norm.weight": "input_layernorm.weight",
            "to_q.weight": "cross_attn.q_proj.weight",
            "to_out.weight": "cross_attn.o_proj.weight",
            "ff.0.weight": "post_attention_layernorm.weight",
            **{f"ff.1.{n}.weight": f"mlp.{n}.weight" for n in ("gate_proj", "up_proj", "down_proj")},
        }
        if cfg.qk_layer_norms:
            pairs.update(
                {"q_norm.weight": "cross_attn.q_layer_norm.weight", "k_norm.weight": "cross_attn.k_layer_norm.weight"}
            )
        for ours, theirs in pairs.items():
            out[o + ours] = w.take(g + theirs)
        out[o + "to_kv.weight"] = w.cat(g + "cross_attn.k_proj.weight", g + "cross_attn.v_proj.weight")
        out[o + "attn_gate"] = w.take(g + "alpha_cross_attn").reshape(-1)  # (1, 1, D) or (1,) → (D,) or (1,)
        out[o + "ff_gate"] = w.take(g + "alpha_dense").reshape(-1)

    # The additional tokens (ids from vocab_size on) are IDEFICS's decoupled rows, ours too.
    out["embed.new_rows"] = w.take("model.embed_tokens.additional_embedding.weight")
    head_rows = w.state.pop("lm_head.additional_fc.weight", None)
    if model.head.new_rows is not None:
        if head_rows is None:
            raise ValueError("the checkpoint has no 'lm_head.additional_fc.weight' (its untied output rows)")
        out["head.new_rows"] = head_rows
    return {k: v.float() for k, v in out.items()}


# ---------------------------------------------------------------------- converting


def convert_idefics(
    source: str | Path,
    *,
    out_dir: str | Path,
    config: str | Path | None = None,
    tokenizer: str | Path | None = None,
    lm_dtype: str = "float32",
) -> Path:
    """Write an IDEFICS checkpoint as a vlm checkpoint folder (with its decoder and ViT); returns its path.

    ``source``: a folder saved by ``IdeficsForVisionText2Text.save_pretrained`` (config.json,
    weights, tokenizer), or a weights file, then with ``config`` (its config.json) and
    ``tokenizer`` (a folder holding its tokenizer). ``lm_dtype``: the dtype the decoder loads in.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, LlamaForCausalLM

    from .convert import _check_runs
    from .factory import create_model_and_transforms, load_trainable, save_pretrained
    from .fileio import atomic_folder

    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"IDEFICS checkpoint {str(source)!r} not found")
    if not source.is_dir() and (config is None or tokenizer is None):
        raise ValueError("a weights file needs --config (its config.json) and --tokenizer (its tokenizer folder)")
    cfg = read_config(config or source)
    check_supported(cfg)
    tok = AutoTokenizer.from_pretrained(str(tokenizer or source), local_files_only=True)
    w = _Weights(read_weights(source))
    vision_state = vision_state_dict(w, cfg)
    decoder_state = decoder_state_dict(w, cfg)

    out = Path(out_dir)
    final = out.resolve()
    with atomic_folder(out) as tmp:
        # The decoder, as a stock Llama folder: built without memory, then given the tensors.
        with torch.device("meta"):
            llama = LlamaForCausalLM(llama_config(cfg))
        _check_keys(set(llama.state_dict()), set(decoder_state), "decoder")
        try:
            llama.load_state_dict(decoder_state, strict=True, assign=True)
        except RuntimeError as e:  # shapes
            raise ValueError(f"the decoder's weights do not fit its config: {e}") from None
        llama.save_pretrained(tmp / LM_DIR)
        tok.save_pretrained(tmp / LM_DIR)
        del llama, decoder_state
        save_file(vision_state, tmp / VISION_FILE)

        vlm_cfg = idefics_config(cfg, tok, str(final / LM_DIR), str(final / VISION_FILE), lm_dtype)
        build = dataclasses.replace(
            vlm_cfg,
            lm=dataclasses.replace(vlm_cfg.lm, name=str(tmp / LM_DIR)),
            vision=dataclasses.replace(vlm_cfg.vision, pretrained=str(tmp / VISION_FILE)),
        )
        model, _ = create_model_and_transforms(build, verbose=False)
        model.config = vlm_cfg
        load_trainable(model, adapter_state_dict(model, w, cfg), source=str(source))
        w.check_used()
        _check_runs(model)
        # The adapter's files (config.json, model.safetensors, ...) beside lm/ and the ViT.
        adapter = save_pretrained(model, tmp / "adapter")
        for file in adapter.iterdir():
            file.rename(tmp / file.name)
        adapter.rmdir()
    log.info("wrote %s (cross-attention before decoder layers %s)", out, model.cross_attn_layers)
    return out
