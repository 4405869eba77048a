"""Sketch-to-HTML adapter ablation: the arms, each a fresh (untrained, same seed) adapter.

    python experiments/sketch_arms.py init ~/.cache/vlm/ablation      # one checkpoint folder per arm
    python experiments/sketch_arms.py markup RUN_EXPORT --limit 100    # teacher-forced markup accuracy
    python experiments/sketch_arms.py markup RUN_EXPORT --other-sketch # the same, each page shown another page's sketch

Every arm trains from scratch with the same data order and step count
(``experiments/sketch_ablation.sh``); they differ only in the architecture below.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

import vlm
from vlm.config import get_preset

ARMS = {
    "base": {},
    "tokens": {"resampler": {"pass_tokens": True}},
    "latents128": {"resampler": {"num_latents": 128}},
    "px640": {"vision": {"image_size": 640}},
    "px640-tokens": {"vision": {"image_size": 640}, "resampler": {"pass_tokens": True}},
}


def arm_config(name: str) -> dict:
    cfg = get_preset("default").to_dict()
    for section, values in ARMS[name].items():
        cfg[section].update(values)
    return cfg


def init(root: Path, names: list[str]) -> None:
    for name in names:
        torch.manual_seed(0)  # the same draws for the weights every arm shares
        model, _ = vlm.create_model_and_transforms(arm_config(name), verbose=False)
        vlm.save_pretrained(model, root / name / "init")
        print(f"{name}: {sum(p.numel() for p in model.parameters() if p.requires_grad):,} trainable", flush=True)


@torch.no_grad()
def markup_accuracy(model_dir: str, shards: str, limit: int, batch_size: int = 8, other_sketch: bool = False) -> dict:
    """Teacher-forced next-token accuracy on the target tokens of test sketches, split into
    markup (inside ``<...>``) and text tokens, with each part's mean loss and the text's share
    of the summed loss. ``other_sketch``: each page is shown the sketch
    of the next page in its batch instead of its own, so the difference from the plain
    figures is what the model reads off the sketch (none: it writes a generic page)."""
    from vlm_train.data.decode import decode_sample, example_segments, inside_markup
    from vlm_train.data.shards import expand_shards, iter_tar

    model, processor = vlm.load_model(model_dir, verbose=False)
    model.eval()
    examples = []
    for path in expand_shards(shards):
        for raw in iter_tar(path):
            examples.append(decode_sample(raw, "sketch"))
            if len(examples) == limit:
                break
        if len(examples) == limit:
            break
    hits = {"markup": [0, 0], "text": [0, 0]}
    nll = {"markup": 0.0, "text": 0.0}
    pages_exact = 0
    for i in range(0, len(examples), batch_size):
        chunk = examples[i : i + batch_size]
        encoded = [processor.encode(example_segments(processor, ex)) for ex in chunk]
        pixels = [processor.transform_images(ex.images) for ex in chunk]
        if other_sketch:  # a last batch of one page takes the first page's sketch
            pixels = pixels[1:] + pixels[:1] if len(chunk) > 1 else [processor.transform_images(examples[0].images)]
        batch = processor.collate(encoded, pixels)
        out = model(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
        pred = out.logits[:, :-1].argmax(-1)
        target = batch["labels"][:, 1:]
        token_nll = torch.nn.functional.cross_entropy(
            out.logits[:, :-1].float().transpose(1, 2), target, ignore_index=-100, reduction="none"
        )
        for b in range(len(chunk)):
            positions = (target[b] != -100).nonzero().flatten().tolist()
            ids = target[b, positions].tolist()
            inside = inside_markup(processor.tokenizer.decode([t]) for t in ids)
            all_right = True
            for pos, markup in zip(positions, inside):
                ok = bool(pred[b, pos] == target[b, pos])
                part = hits["markup" if markup else "text"]
                part[0] += ok
                part[1] += 1
                nll["markup" if markup else "text"] += float(token_nll[b, pos])
                all_right &= ok or not markup
            pages_exact += all_right
    return {
        "markup_token_accuracy": hits["markup"][0] / max(hits["markup"][1], 1),
        "text_token_accuracy": hits["text"][0] / max(hits["text"][1], 1),
        "markup_tokens": hits["markup"][1],
        "text_tokens": hits["text"][1],
        "markup_mean_nll": nll["markup"] / max(hits["markup"][1], 1),
        "text_mean_nll": nll["text"] / max(hits["text"][1], 1),
        "text_share_of_loss": nll["text"] / max(nll["markup"] + nll["text"], 1e-9),
        "pages_all_markup_right": pages_exact / len(examples),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("init")
    p.add_argument("root", type=Path)
    p.add_argument("--arms", nargs="*", default=list(ARMS))
    p = sub.add_parser("markup")
    p.add_argument("model")
    p.add_argument("--shards", default="data/shards/sketch-test")
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--other-sketch", action="store_true", help="show each page the next page's sketch")
    args = parser.parse_args(argv)
    if args.cmd == "init":
        init(args.root.expanduser(), args.arms)
    else:
        print(
            json.dumps(markup_accuracy(args.model, args.shards, args.limit, other_sketch=args.other_sketch), indent=2)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
