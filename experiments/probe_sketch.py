"""Can the frozen vision tower see a sketch's layout, and does the resampler keep it?
Linear probes on the bundled model's features of synthetic sketches.

    .venv/bin/python experiments/probe_sketch.py [--model DIR] [--train 1500] [--test 300] [--latents-only]

Targets come from each page's layout (no shards needed):
- band kind: for each row of the token grid, the kind of the top-level block drawn
  across that row's centre (header, nav, heading, paragraph, ..., or "empty"); the
  features are that row's tokens averaged across the width. At the model's own image
  size and at twice it (four times the tokens), to see what a finer grid would add.
- block count and the kinds of the first four <main> blocks (or "none"), per page,
  from every grid row's features side by side, or from all resampler latents.
Probes are linear classifiers trained with Adam on standardised features (seeded): the
probe of probe_colour.py beside this file (run both as scripts); sketches are train
pages 0.. and test pages 0.. .
"""

from __future__ import annotations

import argparse

import torch
from probe_colour import probe

from vlm import load_model

# _height is the page grammar's own block height (no public name for it yet).
from vlm_train.data.sketch2html import GAP, INNER, MARGIN, SKETCH_SIZE, _height, page_at

KINDS = (
    "empty",
    "header",
    "nav",
    "heading",
    "paragraph",
    "image",
    "button",
    "form",
    "list",
    "row",
    "columns",
    "footer",
)
CHROME = ("header", "nav", "footer")  # the blocks outside <main>
FIRST = 4  # main blocks probed by position


def band_kinds(layout, rows: int) -> list[int]:
    spans, y = [], MARGIN
    for block in layout:
        h = _height(block, INNER)
        spans.append((y, y + h, KINDS.index(block.kind)))
        y += h + GAP
    out = []
    for r in range(rows):
        centre = (r + 0.5) * SKETCH_SIZE[1] / rows
        out.append(next((k for top, bottom, k in spans if top <= centre < bottom), 0))
    return out


def page_targets(layout) -> tuple[int, list[int]]:
    main = [KINDS.index(b.kind) for b in layout if b.kind not in CHROME]
    return len(main), (main + [0] * FIRST)[:FIRST]


@torch.no_grad()
def grid_rows(model, images, size: int) -> torch.Tensor:
    """(n, rows, C): the vision tokens at ``size`` px, averaged across each grid row."""
    out = []
    for i in range(0, len(images), 25):
        px = torch.stack([_to_tensor(im.resize((size, size), resample=3)) for im in images[i : i + 25]])
        tokens = model.vision(px[:, None].to(next(model.vision.parameters()).dtype))[:, 0].float()
        side = int(tokens.shape[1] ** 0.5)
        out.append(tokens.reshape(len(px), side, side, -1).mean(2))
    return torch.cat(out)


@torch.no_grad()
def latents(model, processor, images) -> torch.Tensor:
    out = []
    for i in range(0, len(images), 25):
        px = torch.stack(processor.transform_images(images[i : i + 25]))[:, None]
        out.append(model.encode_images(px.float())[:, 0].float().flatten(1))
    return torch.cat(out)


def baseline(train_y: torch.Tensor, test_y: torch.Tensor) -> float:
    """Accuracy of always answering the train set's most common class."""
    return (test_y == train_y.mode().values).float().mean().item()


def _to_tensor(image) -> torch.Tensor:
    x = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).reshape(image.height, image.width, 3)
    return (x.permute(2, 0, 1).float() / 255 - 0.5) / 0.5  # the tower's normalisation: mean = std = 0.5


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="checkpoint folder (default: the bundled model)")
    ap.add_argument("--train", type=int, default=1500)
    ap.add_argument("--test", type=int, default=300)
    ap.add_argument("--latents-only", action="store_true",
                    help="skip the vision-token probes (the tower is frozen: they are the same for every checkpoint)")  # fmt: skip
    args = ap.parse_args()
    model, processor = load_model(args.model, verbose=False)
    model.eval()
    size = model.config.vision.image_size
    pages = {s: [page_at(s, i) for i in range(n)] for s, n in (("train", args.train), ("test", args.test))}
    images = {s: [p.sketch for p in ps] for s, ps in pages.items()}
    print(f"linear probes on sketches, {args.train} train / {args.test} test pages")
    print("| target | features | width | test accuracy | most common class |\n| --- | --- | --- | --- | --- |")
    feats = {}
    for px in () if args.latents_only else (size, 2 * size):
        rows = {s: grid_rows(model, images[s], px) for s in pages}
        n_rows = rows["train"].shape[1]
        y = {s: torch.tensor([band_kinds(p.layout, n_rows) for p in ps]) for s, ps in pages.items()}
        acc = probe(rows["train"].flatten(0, 1), y["train"].flatten(), rows["test"].flatten(0, 1), y["test"].flatten(),
                    len(KINDS))  # fmt: skip
        base = baseline(y["train"].flatten(), y["test"].flatten())
        print(
            f"| band kind ({n_rows} rows) | one row's tokens at {px} px | {rows['train'].shape[2]} | {acc:.1%} | {base:.1%} |"
        )
        feats[f"all {n_rows} rows' tokens at {px} px"] = {s: r.flatten(1) for s, r in rows.items()}
    feats["all resampler latents"] = {s: latents(model, processor, images[s]) for s in pages}
    targets = {s: [page_targets(p.layout) for p in ps] for s, ps in pages.items()}
    count = {s: torch.tensor([c for c, _ in t]) for s, t in targets.items()}
    kinds = {s: torch.tensor([k for _, k in t]) for s, t in targets.items()}
    for name, f in feats.items():
        width = f["train"].shape[1]
        acc = probe(f["train"], count["train"], f["test"], count["test"], int(count["train"].max()) + 1)
        print(f"| <main> block count | {name} | {width} | {acc:.1%} | {baseline(count['train'], count['test']):.1%} |")
        for k in range(FIRST):
            acc = probe(f["train"], kinds["train"][:, k], f["test"], kinds["test"][:, k], len(KINDS))
            base = baseline(kinds["train"][:, k], kinds["test"][:, k])
            print(f"| kind of <main> block {k + 1} | {name} | {width} | {acc:.1%} | {base:.1%} |")


if __name__ == "__main__":
    main()
