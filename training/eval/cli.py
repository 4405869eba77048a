"""``vlm-eval``: score a model on held-out shards, zero- and few-shot.

    vlm-eval --model runs/x/step-004000/model --task easy-vqa shapes emoji sketch --shots 0 2 4
    vlm-eval --task easy-vqa --shards data/shards/easy-vqa-test --limit 500 --batch_size 32 --out results.json
    vlm-eval --task easy-vqa sketch --predictions p.jsonl && vlm-eval --breakdown p.jsonl

Tasks: ``easy-vqa`` and ``shapes`` (question answering: VQA-normalised exact match),
``emoji`` (captioning: BLEU-1..4, ROUGE-L, CIDEr-D, exact match), ``sketch``
(sketch-to-HTML: validity, structure, text, and with ``--render`` layout and screenshot
similarity). Prompts and decoding settings are each task's (:mod:`vlm.tasks`), the ones
the model was trained with and the apps use. Few-shot prompts put k examples from the
same shards (never the query itself), chosen with a fixed seed, before the query. Writes
JSON and a markdown table.
``--breakdown`` reads a ``--predictions`` file instead and prints where the answers go
wrong (easy-VQA by answer type, sketch page parts; :mod:`vlm_train.eval.breakdown`).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from vlm.apps import add_model_arguments
from vlm.tasks import CAPTION, SKETCH, VQA, Task

if TYPE_CHECKING:
    from PIL import Image

# Benchmark -> (task, its default test shards). Prompts and decoding are the task's (vlm/tasks.py).
TASKS: dict[str, tuple[Task, str]] = {
    "easy-vqa": (VQA, "data/shards/easy-vqa-test"),
    "shapes": (VQA, "data/shards/shapes-test"),
    "emoji": (CAPTION, "data/shards/emoji-test"),
    "sketch": (SKETCH, "data/shards/sketch-test"),
}


@dataclass
class Item:
    key: str
    image: Image.Image
    query: str | None
    """The question (question answering); None for the tasks whose prompt is fixed."""
    answer: str


def load_items(spec: str, task: Task, limit: int | None) -> list[Item]:
    from ..data.decode import SkipSample, decode_sample
    from ..data.shards import expand_shards, iter_tar

    items = []
    for path in expand_shards(spec):
        for raw in iter_tar(path):
            try:
                ex = decode_sample(raw, task.kind)
            except SkipSample:
                continue
            query, answer = ex.turns[0] if ex.turns else (None, ex.text)
            items.append(Item(raw["__key__"], ex.images[0], query, answer))
            if limit and len(items) >= limit:
                return items
    return items


def prompts(processor, task: Task, items: list[Item], pool: list[Item], shots: int, seed: int) -> Iterator[tuple]:
    """(segments, images) per item; k support examples drawn from ``pool`` minus the item."""
    for item in items:
        rng = random.Random(f"{seed}-{item.key}")
        support = [p for p in rng.sample(pool, min(len(pool), shots + 1)) if p.key != item.key][:shots]
        if shots:
            segments = task.few_shot(processor, [(s.query, s.answer) for s in support], item.query)
        else:
            segments = task.prompt(processor, item.query)
        yield segments, [s.image for s in support] + [item.image]


def predict(model, processor, task: Task, items, pool, shots, seed, batch_size) -> list[str]:
    import torch
    from tqdm import tqdm

    from vlm.generate import generate

    out: list[str] = []
    pairs = list(prompts(processor, task, items, pool, shots, seed))
    config = task.generation_config(model)
    device = next(model.parameters()).device
    for start in tqdm(range(0, len(pairs), batch_size), desc=f"{shots}-shot", unit="batch", leave=False):
        chunk = pairs[start : start + batch_size]
        batch = processor([s for s, _ in chunk], [imgs for _, imgs in chunk], padding_side="left")
        tensors = [batch[k].to(device) for k in ("pixel_values", "input_ids", "attention_mask")]
        with torch.inference_mode():
            result = generate(model, *tensors, config=config, tokenizer=processor.tokenizer)
        out.extend(t.strip() for t in result.texts)
    return out


def score(task: Task, items: list[Item], predictions: list[str], render: bool) -> tuple[dict, list[dict]]:
    from .text_metrics import caption_scores, exact_match

    per_item = [{"key": it.key, "prediction": p, "reference": it.answer} for it, p in zip(items, predictions)]
    if task is VQA:
        hits = [exact_match(p, it.answer) for it, p in zip(items, predictions)]
        for row, hit, it in zip(per_item, hits, items):
            row["question"] = it.query
            row["correct"] = hit
        return {"accuracy": sum(hits) / max(len(hits), 1), "count": len(hits)}, per_item
    if task is CAPTION:
        metrics = caption_scores(
            {it.key: p for it, p in zip(items, predictions)}, {it.key: [it.answer] for it in items}
        )
        metrics["exact_match"] = sum(exact_match(p, it.answer) for it, p in zip(items, predictions)) / len(items)
        metrics["count"] = len(items)
        return metrics, per_item
    from .html_metrics import Renderer, aggregate, html_scores

    if render:
        with Renderer() as renderer:
            rows = [html_scores(p, it.answer, renderer) for it, p in zip(items, predictions)]
    else:
        rows = [html_scores(p, it.answer) for it, p in zip(items, predictions)]
    for row, scores in zip(per_item, rows):
        row.update(scores)
    return aggregate(rows), per_item


def markdown(results: dict) -> str:
    lines = ["| task | shots | metric | value |", "| --- | --- | --- | --- |"]
    for task, by_shots in results.items():
        for shots, metrics in by_shots.items():
            for name, value in metrics.items():
                if name != "count":
                    lines.append(f"| {task} | {shots} | {name} | {value:.4f} |")
            lines.append(f"| {task} | {shots} | samples | {metrics.get('count', 0)} |")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlm-eval", description=__doc__.split("\n")[0])
    add_model_arguments(
        parser,
        "how the frozen weights are held (default: float32, the model as stored; auto or another choice "
        "scores the faster path the applications would run, see vlm.quantize)",
    )
    parser.set_defaults(lm_weights="float32")
    parser.add_argument("--task", nargs="+", default=["easy-vqa"], choices=sorted(TASKS))
    parser.add_argument("--shards", help="shards for the (single) task instead of its default test shards")
    parser.add_argument("--shots", type=int, nargs="+", default=[0])
    parser.add_argument("--limit", type=int, help="evaluate only the first N samples of each task")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--render", action="store_true", help="sketch: also layout IoU and screenshot similarity")
    parser.add_argument("--out", default="eval_results.json")
    parser.add_argument("--predictions", help="also write every prediction to this JSONL file")
    parser.add_argument(
        "--breakdown", metavar="PREDICTIONS", help="only break down a --predictions file by answer type or page part"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.breakdown:
        from .breakdown import breakdown, read_predictions

        try:
            print(breakdown(read_predictions(args.breakdown)))
        except (OSError, ValueError) as e:
            parser.exit(2, f"vlm-eval: error: {e}\n")
        return 0
    if args.shards and len(args.task) != 1:
        parser.error("--shards goes with exactly one --task")
    if args.batch_size < 1:
        parser.error("--batch_size must be at least 1")
    import torch

    from vlm import render
    from vlm.factory import load_model
    from vlm.fileio import write_text

    if args.render and "sketch" in args.task:
        try:
            render.check_available()  # before the minutes spent loading a model
        except render.RendererUnavailable as e:
            parser.exit(2, f"vlm-eval: error: --render: {e}\n")
    try:
        model, processor = load_model(
            args.model, verbose=False, device=args.device, dtype=args.dtype, lm_weights=args.lm_weights
        )
    except Exception as e:  # a broken checkpoint, a missing backbone, no such device: one line, no traceback
        parser.exit(2, f"vlm-eval: error: cannot load the model: {e}\n")
    model.eval()
    torch.manual_seed(args.seed)
    results: dict[str, dict] = {}
    rows_out = []
    for name in args.task:
        task, default_shards = TASKS[name]
        try:
            items = load_items(args.shards or default_shards, task, args.limit)
        except FileNotFoundError as e:
            parser.exit(2, f"vlm-eval: error: {name}: {e}. Build the shards with scripts/build_default_data.sh\n")
        if not items:
            parser.exit(2, f"vlm-eval: error: {name}: no usable samples\n")
        results[name] = {}
        for shots in args.shots:
            start = time.perf_counter()
            predictions = predict(model, processor, task, items, items, shots, args.seed, args.batch_size)
            metrics, per_item = score(task, items, predictions, args.render)
            metrics["seconds"] = round(time.perf_counter() - start, 1)
            results[name][f"{shots}-shot"] = metrics
            rows_out += [{"task": name, "shots": shots, **row} for row in per_item]
            shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
            print(f"{name} {shots}-shot: {shown}", flush=True)
    out = Path(args.out)
    write_text(out, json.dumps({"model": args.model or "bundled", "seed": args.seed, "results": results}, indent=2))
    write_text(out.with_suffix(".md"), markdown(results))
    if args.predictions:
        write_text(args.predictions, "".join(json.dumps(row) + "\n" for row in rows_out))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
