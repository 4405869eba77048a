"""Where does a model lose the colour of an easy-VQA shape? Linear probes on features
taken at each point from the vision tower to the resampler's output latents.

    .venv/bin/python experiments/probe_colour.py [--model DIR] [--train 600] [--test 300]

Images are the first distinct images behind easy-VQA colour questions ("what is the
color of ...") in the train and test shards; each probe is a linear classifier over
the eight colours, trained with Adam on standardised features (seeded).
"""

from __future__ import annotations

import argparse
import glob
import io
import json

import torch
from PIL import Image

from vlm import load_model
from vlm_train.data.shards import iter_tar


def colour_images(split: str, n: int) -> tuple[list[Image.Image], list[str]]:
    images, answers, seen = [], [], set()
    for shard in sorted(glob.glob(f"data/shards/easy-vqa-{split}/*.tar")):
        for raw in iter_tar(shard):
            if "json" not in raw:
                continue
            meta = json.loads(raw["json"])
            if "color" not in meta["turns"][0][0] or (shard, meta["image_id"]) in seen:
                continue
            seen.add((shard, meta["image_id"]))
            images.append(Image.open(io.BytesIO(raw["png"])).convert("RGB"))
            answers.append(meta["answer"])
            if len(images) == n:
                return images, answers
    if not images:
        raise SystemExit("no easy-VQA shards under data/shards: run scripts/build_default_data.sh")
    return images, answers


@torch.no_grad()
def features(model, processor, images) -> dict[str, torch.Tensor]:
    out: dict[str, list[torch.Tensor]] = {}
    vision = model.vision
    for i in range(0, len(images), 50):
        px = torch.stack(processor.transform_images(images[i : i + 50]))[:, None]
        px = px.to(next(vision.parameters()).dtype)
        tokens = vision(px)[:, 0].float()  # (n, N, Dv)
        head = vision.tower.num_features if vision.kind == "timm" else tokens.shape[-1]
        out.setdefault("vision tokens, mean (head)", []).append(tokens[..., :head].mean(1))
        if vision.kind == "timm":
            stage = vision.tower.forward_intermediates(px[:, 0], indices=1, intermediates_only=True)[0]
            out.setdefault("last stage, mean (before head)", []).append(stage.float().mean((2, 3)))
        latents = model.encode_images(px.float())[:, 0].float()  # (n, L, D)
        out.setdefault("resampler latents, mean", []).append(latents.mean(1))
        out.setdefault("resampler latents, all", []).append(latents.flatten(1))
    return {k: torch.cat(v) for k, v in out.items()}


def probe(train_x, train_y, test_x, test_y, classes: int) -> float:
    torch.manual_seed(0)
    mu, sd = train_x.mean(0), train_x.std(0) + 1e-5
    train_x, test_x = (train_x - mu) / sd, (test_x - mu) / sd
    lin = torch.nn.Linear(train_x.shape[1], classes)
    opt = torch.optim.Adam(lin.parameters(), 1e-2, weight_decay=1e-3)
    for _ in range(300):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(lin(train_x), train_y).backward()
        opt.step()
    with torch.no_grad():
        return (lin(test_x).argmax(1) == test_y).float().mean().item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="checkpoint folder (default: the bundled model)")
    ap.add_argument("--train", type=int, default=600)
    ap.add_argument("--test", type=int, default=300)
    args = ap.parse_args()
    model, processor = load_model(args.model, verbose=False)
    model.eval()
    train_im, train_ans = colour_images("train", args.train)
    test_im, test_ans = colour_images("test", args.test)
    classes = sorted(set(train_ans))
    train_y = torch.tensor([classes.index(a) for a in train_ans])
    test_y = torch.tensor([classes.index(a) for a in test_ans])
    train_f, test_f = features(model, processor, train_im), features(model, processor, test_im)
    print(f"linear colour probes, {len(train_im)} train / {len(test_im)} test images, {len(classes)} colours")
    print("| features | width | test accuracy |\n| --- | --- | --- |")
    for name in train_f:
        acc = probe(train_f[name], train_y, test_f[name], test_y, len(classes))
        print(f"| {name} | {train_f[name].shape[1]} | {acc:.1%} |")


if __name__ == "__main__":
    main()
