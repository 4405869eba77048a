"""Can the frozen vision tower see a sketch's layout, and does the resampler keep it?
Linear probes on the bundled model's features of synthetic sketches.

    .venv/bin/python experiments/probe_sketch.py [--model DIR] [--train 1500] [--test 300] [--latents-only]
    .venv/bin/python experiments/probe_sketch.py --faults [--sizes 320 512] [--train 1500] [--test 400]
    .venv/bin/python experiments/probe_sketch.py --faults --sizes 320 --preset sketch-stride16

Targets come from each page's layout (no shards needed):
- band kind: for each row of the token grid, the kind of the top-level block drawn
  across that row's centre (header, nav, heading, paragraph, ..., or "empty"); the
  features are that row's tokens averaged across the width. At the model's own image
  size and at twice it (four times the tokens), to see what a finer grid would add.
- block count and the kinds of the first four <main> blocks (or "none"), per page,
  from every grid row's features side by side, or from all resampler latents.
- ``--faults``: the details a sketch model still gets wrong late in training, per
  top-level block, from the vision tokens at each of ``--sizes``: a heading's level (h1 or
  h2, from the grid row through its centre, averaged across the width), a list's item
  count (2-5, from the rows from its top down, each averaged across the width, as many as
  five items can cover) and a nav's link count (2-5, from the tokens of the row through
  its centre, side by side).
``--preset NAME`` probes the vision tokens of an architecture preset instead (the tower is
frozen, so an untrained adapter does not matter to the vision-token probes; e.g.
``sketch-stride16``: EfficientNet-Lite0's stride-16 stage, 20 × 20 tokens at 320 px).
Probes are linear classifiers trained with Adam on standardised features (seeded): the
probe of probe_colour.py beside this file (run both as scripts); sketches are train
pages 0.. and test pages 0.. .
"""

from __future__ import annotations

import argparse
import math

import torch
from probe_colour import probe

from vlm import create_model_and_transforms, load_model

# _height and _ITEM_H are the page grammar's own block sizes (no public names for them yet).
from vlm_train.data.sketch2html import _ITEM_H, GAP, INNER, MARGIN, SKETCH_SIZE, _height, page_at

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


def spans(layout):
    """(block, top, bottom) of each top-level block, in sketch pixels."""
    y = MARGIN
    for block in layout:
        h = _height(block, INNER)
        yield block, y, y + h
        y += h + GAP


def band_kinds(layout, rows: int) -> list[int]:
    kinds = [(top, bottom, KINDS.index(block.kind)) for block, top, bottom in spans(layout)]
    out = []
    for r in range(rows):
        centre = (r + 0.5) * SKETCH_SIZE[1] / rows
        out.append(next((k for top, bottom, k in kinds if top <= centre < bottom), 0))
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


def _row(y: float, side: int) -> int:
    """The grid row (of ``side``) holding sketch height ``y``."""
    return min(side - 1, int(y * side / SKETCH_SIZE[1]))


@torch.no_grad()
def fault_features(model, pages, size: int) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], int]:
    """Per target of ``--faults``: (features, class) of every top-level block it applies to;
    and the side of the token grid."""
    out = {"heading level (h1 or h2)": ([], []), "list item count (2-5)": ([], []), "nav link count (2-5)": ([], [])}
    heading, items, links = out.values()
    dtype = next(model.vision.parameters()).dtype
    for i in range(0, len(pages), 20):
        chunk = pages[i : i + 20]
        px = torch.stack([_to_tensor(p.sketch.resize((size, size), resample=3)) for p in chunk])
        tokens = model.vision(px[:, None].to(dtype))[:, 0].float()
        side = int(tokens.shape[1] ** 0.5)
        grids = tokens.reshape(len(chunk), side, side, -1)
        list_rows = math.ceil(5 * _ITEM_H * side / SKETCH_SIZE[1]) + 1
        for page, grid in zip(chunk, grids):
            for block, top, bottom in spans(page.layout):
                if block.kind == "heading" and block.level in (1, 2):
                    heading[0].append(grid[_row((top + bottom) / 2, side)].mean(0))
                    heading[1].append(block.level - 1)
                elif block.kind == "list":
                    rows = grid[_row(top, side) : _row(top, side) + list_rows].mean(1)
                    rows = torch.cat([rows, rows.new_zeros(list_rows - len(rows), rows.shape[1])])
                    items[0].append(rows.flatten())
                    items[1].append(len(block.items) - 2)
                elif block.kind == "nav":
                    links[0].append(grid[_row((top + bottom) / 2, side)].flatten())
                    links[1].append(len(block.items) - 2)
    return {k: (torch.stack(x), torch.tensor(y)) for k, (x, y) in out.items()}, side


def faults(model, pages, sizes: list[int]) -> None:
    print("| target | image size | grid | train / test blocks | test accuracy | most common class |")
    print("| --- | --- | --- | --- | --- | --- |")
    for size in sizes:
        (train, side), (test, _) = (
            fault_features(model, pages["train"], size),
            fault_features(model, pages["test"], size),
        )
        for name, (x, y) in train.items():
            tx, ty = test[name]
            acc = probe(x, y, tx, ty, int(y.max()) + 1)
            print(f"| {name} | {size} px | {side} × {side} | {len(y)} / {len(ty)} | {acc:.1%} | {baseline(y, ty):.1%} |",
                  flush=True)  # fmt: skip


def baseline(train_y: torch.Tensor, test_y: torch.Tensor) -> float:
    """Accuracy of always answering the train set's most common class."""
    return (test_y == train_y.mode().values).float().mean().item()


def _to_tensor(image) -> torch.Tensor:
    x = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).reshape(image.height, image.width, 3)
    return (x.permute(2, 0, 1).float() / 255 - 0.5) / 0.5  # the tower's normalisation: mean = std = 0.5


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="checkpoint folder (default: the bundled model)")
    ap.add_argument("--preset", default=None, help="an architecture preset instead of --model (untrained adapter)")
    ap.add_argument("--train", type=int, default=1500)
    ap.add_argument("--test", type=int, default=300)
    ap.add_argument("--latents-only", action="store_true",
                    help="skip the vision-token probes (the tower is frozen: they are the same for every checkpoint)")  # fmt: skip
    ap.add_argument("--faults", action="store_true",
                    help="probe heading levels and item counts from the vision tokens instead (see above)")  # fmt: skip
    ap.add_argument("--sizes", type=int, nargs="+", default=[320, 512], help="image sizes for --faults")
    args = ap.parse_args()
    if args.preset:
        model, processor = create_model_and_transforms(args.preset, verbose=False)
    else:
        model, processor = load_model(args.model, verbose=False)
    model.eval()
    size = model.config.vision.image_size
    pages = {s: [page_at(s, i) for i in range(n)] for s, n in (("train", args.train), ("test", args.test))}
    images = {s: [p.sketch for p in ps] for s, ps in pages.items()}
    print(f"linear probes on sketches, {args.train} train / {args.test} test pages")
    if args.faults:
        faults(model, pages, args.sizes)
        return
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
