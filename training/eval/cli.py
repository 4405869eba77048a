"""``vlm-eval``: score a model on held-out shards, zero- and few-shot.

    vlm-eval --model runs/x/step-004000/model --task easy-vqa shapes emoji sketch --shots 0 2 4
    vlm-eval --task easy-vqa --shards data/shards/easy-vqa-test --limit 500 --out results.json
    vlm-eval --task easy-vqa sketch --predictions p.jsonl && vlm-eval --breakdown p.jsonl

Tasks: ``easy-vqa`` and ``shapes`` (question answering: VQA-normalised exact match),
``emoji`` (captioning: BLEU-1..4, ROUGE-L, CIDEr-D, exact match), ``sketch``
(sketch-to-HTML: validity, structure, text, and with ``--render`` layout and screenshot
similarity). Few-shot prompts put k examples from the same shards (never the query
itself), chosen with a fixed seed, before the query. Writes JSON and a markdown table.
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

import torch
from tqdm import tqdm

from vlm.factory import load_model
from vlm.generate import GenerationConfig, generate
from vlm.processor import CAPTION_PROMPT, SKETCH_PROMPT

from ..data.decode import Example, SkipSample, decode_sample
from ..data.shards import expand_shards, iter_tar

TASKS = {
    "easy-vqa": ("qa", "data/shards/easy-vqa-test", 8),
    "shapes": ("qa", "data/shards/shapes-test", 8),
    "emoji": ("caption", "data/shards/emoji-test", 24),
    "sketch": ("sketch", "data/shards/sketch-test", 400),
}


@dataclass
class Item:
    key: str
    image: object
    prompt: str
    answer: str


def load_items(spec: str, kind: str, limit: int | None) -> list[Item]:
    items = []
    for path in expand_shards(spec):
        for raw in iter_tar(path):
            try:
                ex: Example = decode_sample(raw, kind)
            except SkipSample:
                continue
            if kind == "qa":
                prompt, answer = ex.turns[0]
            else:
                prompt, answer = (CAPTION_PROMPT if kind == "caption" else SKETCH_PROMPT), ex.text
            items.append(Item(raw["__key__"], ex.images[0], prompt, answer))
            if limit and len(items) >= limit:
                return items
    return items


def prompts(processor, items: list[Item], pool: list[Item], shots: int, seed: int) -> Iterator[tuple]:
    """(segments, images) per item; k support examples drawn from ``pool`` minus the item."""
    for item in items:
        rng = random.Random(f"{seed}-{item.key}")
        support = [p for p in rng.sample(pool, min(len(pool), shots + 1)) if p.key != item.key][:shots]
        if shots:
            segments = processor.few_shot_segments([(s.prompt, s.answer) for s in support], item.prompt)
        else:
            segments = processor.chat_segments([(item.prompt, None)])
        yield segments, [s.image for s in support] + [item.image]


def predict(model, processor, items, pool, shots, seed, batch_size, max_new_tokens) -> list[str]:
    out: list[str] = []
    pairs = list(prompts(processor, items, pool, shots, seed))
    config = GenerationConfig(max_new_tokens=max_new_tokens)
    device = next(model.parameters()).device
    for start in tqdm(range(0, len(pairs), batch_size), desc=f"{shots}-shot", unit="batch", leave=False):
        chunk = pairs[start : start + batch_size]
        batch = processor([s for s, _ in chunk], [imgs for _, imgs in chunk], padding_side="left")
        tensors = [batch[k].to(device) for k in ("images", "input_ids", "attention_mask")]
        with torch.inference_mode():
            result = generate(model, *tensors, config=config, tokenizer=processor.tokenizer)
        out.extend(t.strip() for t in result.texts)
    return out


def score(kind: str, items: list[Item], predictions: list[str], render: bool) -> tuple[dict, list[dict]]:
    from .text_metrics import caption_scores, exact_match

    per_item = [{"key": it.key, "prediction": p, "reference": it.answer} for it, p in zip(items, predictions)]
    if kind == "qa":
        hits = [exact_match(p, it.answer) for it, p in zip(items, predictions)]
        for row, hit, it in zip(per_item, hits, items):
            row["question"] = it.prompt
            row["correct"] = hit
        return {"accuracy": sum(hits) / max(len(hits), 1), "count": len(hits)}, per_item
    if kind == "caption":
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vlm-eval", description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="checkpoint folder (default: the bundled model)")
    parser.add_argument("--task", nargs="+", default=["easy-vqa"], choices=sorted(TASKS))
    parser.add_argument("--shards", help="shards for the (single) task instead of its default test shards")
    parser.add_argument("--shots", type=int, nargs="+", default=[0])
    parser.add_argument("--limit", type=int, help="evaluate only the first N samples of each task")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--render", action="store_true", help="sketch: also layout IoU and screenshot similarity")
    parser.add_argument("--out", default="eval_results.json")
    parser.add_argument("--predictions", help="also write every prediction to this JSONL file")
    parser.add_argument(
        "--breakdown", metavar="PREDICTIONS", help="only break down a --predictions file by answer type or page part"
    )
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
    try:
        model, processor = load_model(args.model, verbose=False)
    except (OSError, ValueError) as e:
        parser.exit(2, f"vlm-eval: error: cannot load the model: {e}\n")
    model.eval()
    torch.manual_seed(args.seed)
    results: dict[str, dict] = {}
    rows_out = []
    for task in args.task:
        kind, default_shards, max_new = TASKS[task]
        try:
            items = load_items(args.shards or default_shards, kind, args.limit)
        except FileNotFoundError as e:
            parser.exit(2, f"vlm-eval: error: {task}: {e}. Build the shards with scripts/build_default_data.sh\n")
        if not items:
            parser.exit(2, f"vlm-eval: error: {task}: no usable samples\n")
        results[task] = {}
        for shots in args.shots:
            start = time.perf_counter()
            predictions = predict(model, processor, items, items, shots, args.seed, args.batch_size, max_new)
            metrics, per_item = score(kind, items, predictions, args.render)
            metrics["seconds"] = round(time.perf_counter() - start, 1)
            results[task][f"{shots}-shot"] = metrics
            rows_out += [{"task": task, "shots": shots, **row} for row in per_item]
            shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
            print(f"{task} {shots}-shot: {shown}", flush=True)
    out = Path(args.out)
    out.write_text(json.dumps({"model": args.model or "bundled", "seed": args.seed, "results": results}, indent=2))
    out.with_suffix(".md").write_text(markdown(results))
    if args.predictions:
        with open(args.predictions, "w", encoding="utf-8") as f:
            for row in rows_out:
                f.write(json.dumps(row) + "\n")
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
