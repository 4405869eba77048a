"""``vlm convert``: other projects' Flamingo checkpoints as vlm checkpoint folders.

    vlm convert openflamingo checkpoint.pt --release openflamingo/OpenFlamingo-4B-vitl-rpj3b --out of-4b
    vlm convert openflamingo checkpoint.pt --vision ViT-L-14 --pretrained openai \\
        --lm togethercomputer/RedPajama-INCITE-Base-3B-v1 --cross_attn_every 2 --out of-4b
    vlm convert idefics downloads/idefics-9b --out idefics-9b

An OpenFlamingo ``checkpoint.pt`` holds only what it trained: the perceiver, the gated
cross-attention blocks and the LM's embedding matrices. It is read as plain tensors
(``torch.load(weights_only=True)``, or a ``.safetensors`` file): a file that would need
unpickling is refused. The backbones are named, not copied: the folder's config.json
names the open_clip tower and the LM, which load from their own sources as for any vlm
checkpoint. docs/openflamingo.md maps their architecture onto our config fields.

IDEFICS (transformers' ``IdeficsForVisionText2Text``) is converted by :mod:`vlm.idefics`:
its decoder and ViT live only inside its checkpoint, so they are written into the folder
too (docs/idefics.md).
"""

from __future__ import annotations

import argparse
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .config import CrossAttnConfig, LMConfig, ResamplerConfig, VisionConfig, VLMConfig

log = logging.getLogger("vlm.convert")  # not __name__: under `python -m vlm.convert` that is __main__

# OpenFlamingo's tokens, in the order its factory adds them; <PAD> only to a tokenizer without a pad token.
OPENFLAMINGO_TOKENS = ("<|endofchunk|>", "<image>")
OPENFLAMINGO_PAD = "<PAD>"
# Its factory builds every perceiver and cross-attention block with 8 heads (their
# dim_head=64 default); the weights' shapes give only heads * head_dim.
OPENFLAMINGO_HEADS = 8

RELEASES: dict[str, dict[str, Any]] = {
    # Hub repo of checkpoint.pt → what it was trained on (OpenFlamingo's README).
    "openflamingo/OpenFlamingo-3B-vitl-mpt1b": dict(lm="anas-awadalla/mpt-1b-redpajama-200b", every=1),
    "openflamingo/OpenFlamingo-3B-vitl-mpt1b-langinstruct": dict(
        lm="anas-awadalla/mpt-1b-redpajama-200b-dolly", every=1
    ),
    "openflamingo/OpenFlamingo-4B-vitl-rpj3b": dict(lm="togethercomputer/RedPajama-INCITE-Base-3B-v1", every=2),
    "openflamingo/OpenFlamingo-4B-vitl-rpj3b-langinstruct": dict(
        lm="togethercomputer/RedPajama-INCITE-Instruct-3B-v1", every=2
    ),
    "openflamingo/OpenFlamingo-9B-vitl-mpt7b": dict(lm="anas-awadalla/mpt-7b", every=4),
    "openflamingo/OpenFlamingo-9B-deprecated": dict(lm="decapoda-research/llama-7b-hf", every=4),
}
"""All use open_clip ViT-L-14 with the ``openai`` weights."""

_XATTN_KEY = re.compile(r"^lang_encoder\.(?:.+\.)?(\d+)\.gated_cross_attn_layer\.(.+)$")
# Their block's parameter names → ours (GatedCrossAttentionBlock in vlm/xattn.py); the
# feed-forward (ff.0/1/3) and the gates keep their names.
_XATTN_RENAME = {"attn.norm.": "norm.", "attn.to_q.": "to_q.", "attn.to_kv.": "to_kv.", "attn.to_out.": "to_out."}
# Copies of the same weights in an unfiltered state dict, and the frozen backbones.
_IGNORED = ("vision_encoder.", "lang_encoder.old_decoder_blocks.", "lang_encoder.gated_cross_attn_layers.")
# GPT-NeoX's output embedding was `embed_out` before transformers 5 (the 4B checkpoints).
_OUTPUT_ALIASES = ("embed_out.weight", "lm_head.weight")


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """An OpenFlamingo checkpoint as plain tensors: ``checkpoint.pt`` (the state dict, or a
    training checkpoint's ``model_state_dict``) or ``.safetensors``."""
    import torch

    from .fileio import load_plain

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = load_plain(path, "OpenFlamingo checkpoint")
        for key in ("model_state_dict", "state_dict"):
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    # DDP's prefix and FSDP/activation-checkpointing wrappers are not part of the names.
    clean = re.compile(r"^module\.|_fsdp_wrapped_module\.|_checkpoint_wrapped_module\.")
    return {clean.sub("", k): v for k, v in state.items()}


def _perceiver_shape(state: dict[str, Any]) -> dict[str, Any]:
    if "perceiver.latents" not in state:
        raise ValueError("not an OpenFlamingo checkpoint: it has no perceiver.latents")
    if "perceiver.frame_embs" in state:
        raise ValueError("this checkpoint has frame embeddings (video); vlm supports single images only")
    num_latents, width = state["perceiver.latents"].shape
    depth = len({k.split(".")[2] for k in state if k.startswith("perceiver.layers.")})
    inner = state["perceiver.layers.0.0.to_q.weight"].shape[0]
    ff = state["perceiver.layers.0.1.1.weight"].shape[0]
    times = state.get("perceiver.media_time_embs")
    return dict(num_latents=num_latents, width=width, depth=depth, inner=inner, ff_mult=ff // width, times=times)


def _cross_attn_blocks(state: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """Decoder-layer index → that layer's block, in our parameter names."""
    blocks: dict[int, dict[str, Any]] = {}
    for key, value in state.items():
        m = _XATTN_KEY.match(key)
        if m and not key.startswith(_IGNORED):
            name = m.group(2)
            for theirs, ours in _XATTN_RENAME.items():
                if name.startswith(theirs):
                    name = ours + name.removeprefix(theirs)
            blocks.setdefault(int(m.group(1)), {})[name] = value
    if not blocks:
        raise ValueError("not an OpenFlamingo checkpoint: it has no gated_cross_attn_layer weights")
    return blocks


def openflamingo_vision(name: str, pretrained: str | None) -> VisionConfig:
    """The open_clip tower. Before open_clip 2.29 the ``openai`` tag built its towers with
    QuickGELU by itself (OpenFlamingo's releases were trained so); newer versions build
    ``ViT-L-14`` with GELU unless asked, so a tag trained with QuickGELU asks here."""
    import open_clip

    tag = open_clip.get_pretrained_cfg(name, pretrained) if pretrained else {}
    quick = tag.get("quick_gelu") and not (open_clip.get_model_config(name) or {}).get("quick_gelu")
    kwargs = {"force_quick_gelu": True} if quick else {}
    return VisionConfig(kind="open_clip", name=name, pretrained=pretrained, model_kwargs=kwargs)


def openflamingo_config(
    state: dict[str, Any],
    tokenizer,
    vision: VisionConfig,
    lm: str,
    cross_attn_every: int | None = None,
    lm_dtype: str = "float32",
) -> VLMConfig:
    """The :class:`VLMConfig` of an OpenFlamingo model, from its weights' shapes and its LM's tokenizer."""
    p = _perceiver_shape(state)
    blocks = _cross_attn_blocks(state)
    indices = sorted(blocks)
    every = cross_attn_every or indices[0] + 1
    # Their block sits before decoder layer i when (i + 1) % every == 0: ours from `every - 1` on.
    if indices != list(range(every - 1, indices[-1] + 1, every)):
        raise ValueError(
            f"cross-attention before layers {indices} is not every {every}-th layer from layer {every - 1}"
        )
    first = blocks[indices[0]]
    inner, lm_width = first["to_q.weight"].shape
    if first["to_kv.weight"].shape[1] != p["width"]:
        raise ValueError(
            f"cross-attention reads {first['to_kv.weight'].shape[1]}-wide media, perceiver is {p['width']}"
        )
    added = [*OPENFLAMINGO_TOKENS, *([OPENFLAMINGO_PAD] if tokenizer.pad_token is None else [])]
    new = sum(t not in tokenizer.get_vocab() for t in added)
    return VLMConfig(
        vision=vision,
        # Their LM's vocabulary is its tokenizer's, with their tokens (resize_token_embeddings).
        lm=LMConfig(name=lm, dtype=lm_dtype, vocab_size=len(tokenizer) + new),
        resampler=ResamplerConfig(
            num_latents=p["num_latents"],
            depth=p["depth"],
            heads=OPENFLAMINGO_HEADS,
            head_dim=p["inner"] // OPENFLAMINGO_HEADS,
            ff_mult=p["ff_mult"],
            project=False,
            media_time=p["times"] is not None,
            max_images=p["times"].shape[0] if p["times"] is not None else ResamplerConfig.max_images,
        ),
        cross_attn=CrossAttnConfig(
            every=every,
            start=every - 1,
            heads=OPENFLAMINGO_HEADS,
            head_dim=inner // OPENFLAMINGO_HEADS,
            ff_mult=first["ff.1.weight"].shape[0] // lm_width,
            only_latest_image=True,  # their only_attend_immediate_media, which their factory never changes
        ),
        image_token="<image>",
        end_of_chunk_token="<|endofchunk|>",
        added_tokens=added,
        pad_token=OPENFLAMINGO_PAD if OPENFLAMINGO_PAD in added else None,
    ).validate()


def _lm_tensor(state: dict[str, Any], names: Sequence[str]):
    return next((state[f"lang_encoder.{n}"] for n in names if f"lang_encoder.{n}" in state), None)


def _check_rows(theirs, base, keep, what: str, lm: str) -> None:
    """The checkpoint's rows of the LM's own tokens must be the LM's: we keep those frozen."""
    mine = base.detach()[keep].float()
    diff = (theirs[keep].to(base.dtype).float() - mine).abs().max().item() if len(keep) else 0.0
    if not diff <= 1e-3 * max(mine.abs().max().item(), 1.0):
        raise ValueError(
            f"the checkpoint's {what} rows for the LM's own tokens differ from {lm!r} (max difference {diff:.3g}): "
            "is this the LM it was trained with? (vlm trains only the added tokens' rows)"
        )


def openflamingo_state_dict(model, state: dict[str, Any]) -> dict[str, Any]:
    """OpenFlamingo's weights under our names (``model.trainable_state_dict()``'s keys)."""
    import torch

    cfg = model.config
    out = {"resampler." + k.removeprefix("perceiver."): v for k, v in state.items() if k.startswith("perceiver.")}
    if "resampler.media_time_embs" in out:
        out["resampler.media_time"] = out.pop("resampler.media_time_embs")
    names = {p: n for n, p in model.named_parameters()}
    layers = model.decoder_layers()
    for index, block in _cross_attn_blocks(state).items():
        xattn = layers[index].xattn if index < len(layers) else None
        if xattn is None:
            raise ValueError(f"the checkpoint has cross-attention before layer {index}, the config does not")
        for key, value in block.items():
            try:
                out[names[xattn.get_parameter(key)]] = value
            except AttributeError:
                raise ValueError(f"unknown cross-attention weight {key!r} (layer {index})") from None

    # The added tokens' rows, at their ids in the LM's input (and untied output) embedding.
    new_ids = model.embed.new_ids.cpu()
    base_in = model.embed.base.weight
    new = set(new_ids.tolist())
    keep = torch.tensor([i for i in range(min(cfg.lm.vocab_size, base_in.shape[0])) if i not in new], dtype=torch.long)
    in_name = names.get(base_in, "").removeprefix("lm.")
    rows_in = _lm_tensor(state, [in_name])
    if rows_in is None:
        raise ValueError(f"the checkpoint has no lang_encoder.{in_name}: the added tokens' input rows are missing")
    if rows_in.shape[0] != cfg.lm.vocab_size:
        raise ValueError(
            f"the checkpoint's embedding has {rows_in.shape[0]} rows, the tokenizer of {cfg.lm.name!r} with "
            f"OpenFlamingo's tokens {cfg.lm.vocab_size}: is this the LM it was trained with?"
        )
    _check_rows(rows_in, base_in, keep, "input embedding", cfg.lm.name)
    out["embed.new_rows"] = rows_in[new_ids].float()
    if model.head.new_rows is not None:  # an untied LM head
        base_out = model.head.base.weight
        rows_out = _lm_tensor(state, [names.get(base_out, "").removeprefix("lm."), *_OUTPUT_ALIASES])
        if rows_out is not None:
            _check_rows(rows_out, base_out, keep, "output embedding", cfg.lm.name)
            out["head.new_rows"] = rows_out[new_ids].float()
        else:
            # OpenFlamingo never trains them, and its loader leaves them at resize_token_embeddings'
            # random initialisation; the mean row is a deterministic stand-in.
            log.warning("the checkpoint has no output rows for the added tokens; using the LM head's mean row")
            mean = base_out.detach()[keep].float().mean(0)
            out["head.new_rows"] = mean.expand(len(new_ids), -1).clone()
    return out


def _check_runs(model) -> None:
    """One token through every layer: an LM whose decoder does not hand keyword arguments
    to its layers (e.g. transformers' MPT) cannot reach the cross-attention."""
    import torch

    ids = torch.tensor([[model.image_token_id, model.end_of_chunk_token_id]])
    latents = model.resampler.latents.detach()[None, None]  # (1, 1, L, D)
    try:
        with torch.no_grad():
            model.hidden_states(ids, None, model.media_state(latents, ids))
    except RuntimeError as e:
        raise ValueError(f"{model.config.lm.name!r} cannot run with vlm's cross-attention: {e}") from None


def convert_openflamingo(
    checkpoint: str | Path,
    *,
    lm: str,
    out_dir: str | Path,
    vision: str = "ViT-L-14",
    pretrained: str | None = "openai",
    cross_attn_every: int | None = None,
    lm_dtype: str = "float32",
) -> Path:
    """Write an OpenFlamingo checkpoint as a vlm checkpoint folder; returns its path.

    ``vision``/``pretrained``: the open_clip tower it was trained with (a pretrained tag or a
    local weights file: then name the tower ``ViT-L-14-quickgelu`` for OpenAI's weights, as
    a file has no tag to say so); ``lm``: its HF causal LM (hub id or folder); ``cross_attn_every``:
    their ``cross_attn_every_n_layers`` (``None``: read from the checkpoint).
    """
    import dataclasses

    from transformers import AutoTokenizer

    from .factory import create_model_and_transforms, load_trainable, save_pretrained
    from .registry import resolve_lm_source

    state = read_checkpoint(checkpoint)
    # Local files by absolute path: config.json must name them from wherever it is loaded.
    if pretrained and Path(pretrained).is_file():
        pretrained = str(Path(pretrained).resolve())
    source, local_only = resolve_lm_source(lm)
    lm = str(Path(lm).resolve()) if local_only and not lm.startswith("bundled:") else lm
    tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only)
    cfg = openflamingo_config(state, tokenizer, openflamingo_vision(vision, pretrained), lm, cross_attn_every, lm_dtype)
    # The tower's weights are not part of the folder: build it at random, without fetching them.
    build = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, pretrained=None))
    model, _ = create_model_and_transforms(build, verbose=False)
    model.config = cfg
    width = _perceiver_shape(state)["width"]
    if model.vision.width != width:
        raise ValueError(
            f"{vision!r} gives {model.vision.width}-wide image tokens; the checkpoint's perceiver is {width}"
        )
    load_trainable(model, openflamingo_state_dict(model, state), source=str(checkpoint))
    _check_runs(model)
    path = save_pretrained(model, out_dir)
    log.info("wrote %s (cross-attention before LM layers %s)", path, model.cross_attn_layers)
    return path


# ---------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vlm convert",
        description="Turn another project's Flamingo checkpoint into a vlm checkpoint folder.",
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="source", required=True, metavar="SOURCE")
    of = sub.add_parser("openflamingo", help="an OpenFlamingo checkpoint.pt (or .safetensors)")
    add = of.add_argument
    add("checkpoint", metavar="CHECKPOINT", help="checkpoint.pt or .safetensors")
    add("--out", required=True, metavar="DIR", help="the vlm checkpoint folder to write")
    add(
        "--release",
        choices=sorted(RELEASES),
        metavar="REPO",
        help="a released model's Hub repo, to fill in --lm and --cross_attn_every: " + ", ".join(sorted(RELEASES)),
    )
    add("--lm", metavar="NAME_OR_DIR", help="its language model: a Hugging Face id or a local folder")
    add("--vision", default="ViT-L-14", help="its open_clip model (default: %(default)s)")
    add("--pretrained", default="openai", help="open_clip pretrained tag or weights file (default: %(default)s)")
    add("--cross_attn_every", type=int, metavar="N", help="its cross_attn_every_n_layers (default: from the weights)")
    add("--lm_dtype", choices=("float32", "bfloat16", "float16"), default="float32", help="default: %(default)s")

    idefics = sub.add_parser("idefics", help="a transformers IdeficsForVisionText2Text folder or weights file")
    add = idefics.add_argument
    add("checkpoint", metavar="SOURCE", help="a folder saved with save_pretrained, or a weights file")
    add("--out", required=True, metavar="DIR", help="the vlm checkpoint folder to write (with lm/ and the ViT)")
    add("--config", metavar="CONFIG_JSON", help="its config.json (default: SOURCE/config.json)")
    add("--tokenizer", metavar="DIR", help="a folder with its tokenizer (default: SOURCE)")
    add("--lm_dtype", choices=("float32", "bfloat16", "float16"), default="float32", help="default: %(default)s")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(name)s: %(message)s")
    logging.getLogger("vlm").setLevel(logging.INFO)
    if args.source == "idefics":
        from .idefics import convert_idefics

        return _run(
            convert_idefics,
            args.checkpoint,
            out_dir=args.out,
            config=args.config,
            tokenizer=args.tokenizer,
            lm_dtype=args.lm_dtype,
        )
    release = RELEASES.get(args.release, {})
    lm = args.lm or release.get("lm")
    if lm is None:
        parser.error("give --lm (or --release)")
    if args.cross_attn_every is not None and args.cross_attn_every < 1:
        parser.error("--cross_attn_every must be at least 1")
    return _run(
        convert_openflamingo,
        args.checkpoint,
        lm=lm,
        out_dir=args.out,
        vision=args.vision,
        pretrained=args.pretrained,
        cross_attn_every=args.cross_attn_every or release.get("every"),
        lm_dtype=args.lm_dtype,
    )


def _run(convert, *args, **kwargs) -> int:
    try:
        convert(*args, **kwargs)
    except (OSError, ValueError) as e:  # a refused pickle (UnsafeFileError) is a ValueError
        log.error("error: %s", e)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
