"""``vlm data``: write webdataset shards from your files, bundled data or generators.

vlm data folder photos/ --out shards/mine          # images + sidecar .txt captions
vlm data table pairs.csv --out shards/mine         # image,caption or image,question,answer
vlm data easy-vqa --split train --out shards/evqa
vlm data emoji --split train --kind caption --out shards/emoji
vlm data shapes --split train --count 20000 --out shards/shapes
vlm data sketch --split train --count 20000 --out shards/sketch
vlm data inspect 'shards/evqa/easy-vqa-train-{000000..000038}.tar' --kind qa
vlm data cache --model default --shards shards/sketch --kind sketch --precision bf16-frozen
vlm data feedback feedback/ --out data/shards/feedback  # the demo's ratings and corrections
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING

from vlm.cli import underscore_options
from vlm.tasks import KINDS as FORMATS

if TYPE_CHECKING:
    from . import builders

# The data code (webdataset, torch, the generators) is imported where it is used, so that
# `vlm data --help` answers at once.

MAX_REPORTED = 20


def write(samples: Iterator[builders.Built], out: str, prefix: str, shard_size: int, max_bytes: int) -> int:
    """Write samples to shards with a progress bar; report unusable inputs. Returns the
    number of unusable inputs."""
    from tqdm import tqdm

    from .shards import ShardWriter, shard_pattern

    errors = 0
    with ShardWriter(out, prefix, max_samples=shard_size, max_bytes=max_bytes) as writer:
        bar = tqdm(samples, desc=prefix, unit=" samples", dynamic_ncols=True)
        for sample, error in bar:
            if error is not None:
                errors += 1
                if errors <= MAX_REPORTED:
                    tqdm.write(f"skipped: {error}", file=sys.stderr)
                continue
            writer.write(sample)
            bar.set_postfix(shards=len(writer.written) + 1, skipped=errors, refresh=False)
    if errors > MAX_REPORTED:
        print(f"... and {errors - MAX_REPORTED} more unusable inputs", file=sys.stderr)
    if writer.written:
        print(f"wrote {writer.count} samples to {len(writer.written)} shards: {shard_pattern(writer.written)}")
    else:
        print("wrote nothing: no usable samples", file=sys.stderr)
    print(f"skipped {errors} unusable inputs")
    return errors


def inspect(spec: str, kind: str) -> int:
    """Read shards back and count usable samples, and the others by reason. Damage of any
    kind (a missing, truncated or non-tar shard, a forged member size, a bad sample) is
    counted and reported by name, and the count goes on."""
    from tqdm import tqdm

    from vlm.tario import ShardError, iter_tar_samples

    from .decode import SkipCounter, decode_sample, skip_reason
    from .shards import as_raw, expand_shards

    counts = SkipCounter()
    good = 0
    damaged: list[str] = []

    def report(path: str, reason: str, message: str) -> None:
        counts[reason] += 1
        damaged.append(path)
        if len(damaged) <= MAX_REPORTED:
            tqdm.write(message, file=sys.stderr)

    for path in tqdm(expand_shards(spec, must_exist=False), desc="shards", unit=" shards"):
        try:
            for sample in iter_tar_samples(path):
                if sample.problem:
                    report(path, sample.problem, f"{path}: {sample.problem} ({sample.detail})")
                    continue
                try:
                    decode_sample(as_raw(sample), kind)
                    good += 1
                except MemoryError:
                    raise
                except Exception as e:  # one sample's problem, as in the loader
                    counts[skip_reason(e)] += 1
        except ShardError as e:
            report(path, e.reason, str(e))  # names the shard
    if len(damaged) > MAX_REPORTED:
        print(f"... and {len(damaged) - MAX_REPORTED} more damaged shards or members", file=sys.stderr)
    print(f"{good} usable samples; {counts.summary()}")
    return 0


def cache(args) -> int:
    """Build the trainer's prefix cache (:mod:`vlm_train.data.prefix_cache`) for some shards,
    for the model and precision a run will use; report its size."""
    import torch

    from ..config import ModelConfig, SourceConfig, TrainConfig
    from ..train import build_model
    from .prefix_cache import ensure

    cfg = TrainConfig(model=ModelConfig(preset=args.model, init_from=args.init_from), precision=args.precision)
    model, processor = build_model(cfg)
    if model.first_cross_attn_layer == 0:
        print("cross-attention starts at layer 0: there is no text-only prefix to cache", file=sys.stderr)
        return 1
    device = torch.device(args.device)
    model.to(device)
    storage = "bf16" if args.precision.startswith("bf16") else "fp32"
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if storage == "bf16" else None
    source = SourceConfig(args.shards, args.kind, max_tokens=args.max_tokens)
    source.validate()
    ensure(model, processor, [source], storage, args.cache_dir, args.batch_size, autocast)
    return 0


def feedback(args) -> int:
    """Shards and preference pairs from the demo's feedback (:mod:`vlm_train.data.feedback`)."""
    from .feedback import build

    report = build(args.path, args.out, args.shard_size, args.max_shard_mb * 1024 * 1024, args.prefix or "feedback")
    print(report.summary())
    for kind, pattern in report.shards.items():
        print(f"{kind}: {report.used[kind]} samples in {pattern}")
    print(f"preference pairs: {args.out}/preference.jsonl; report: {args.out}/report.json")
    return 0


def main(argv: list[str] | None = None) -> int:
    from .sketch2html import STYLES

    parser = argparse.ArgumentParser(prog="vlm data", description=__doc__.split("\n")[0].split(": ", 1)[1])
    sub = parser.add_subparsers(dest="source", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", required=True, help="output folder for the shards")
    common.add_argument("--prefix", help="shard name prefix (default: from the source)")
    common.add_argument("--shard_size", type=int, default=1000, help="samples per shard")
    common.add_argument("--max_shard_mb", type=int, default=256, help="megabytes per shard")
    split = argparse.ArgumentParser(add_help=False)
    split.add_argument("--split", default="train", choices=["train", "val", "test"])
    generated = argparse.ArgumentParser(add_help=False)
    generated.add_argument("--count", type=int, default=1000, help="scenes or pages to generate")
    generated.add_argument("--seed", type=int, default=0)
    generated.add_argument("--workers", type=int, default=1, help="processes that render (same output)")

    p = sub.add_parser("folder", parents=[common], help="images with sidecar .txt captions")
    p.add_argument("path")
    p = sub.add_parser("table", parents=[common], help="CSV/JSONL: image,caption or image,question,answer")
    p.add_argument("path")
    p = sub.add_parser("easy-vqa", parents=[common], help="easy-VQA from PyPI (train or test)")
    p.add_argument("--split", default="train", choices=["train", "test"])
    p = sub.add_parser("emoji", parents=[common, split], help="Twitter emoji from npm")
    p.add_argument("--kind", default="caption", choices=["caption", "qa"])
    p = sub.add_parser("shapes", parents=[common, split, generated], help="synthetic shape scenes")
    p.add_argument("--kind", default="qa", choices=["caption", "qa"])
    p = sub.add_parser("sketch", parents=[common, split, generated], help="synthetic sketch-to-HTML pairs")
    p.add_argument(
        "--style",
        default="plain",
        choices=STYLES,
        help="how the sketches are drawn: plain (the original renderer), varied (a random pen, lettering, "
        "spacing and phone photo per page, for training) or a held-out style (for testing); default: plain",
    )
    p = sub.add_parser(
        "feedback", parents=[common], help="the demo's ratings and corrections: qa and sketch shards, preference pairs"
    )
    p.add_argument("path", help="the demo's feedback folder (feedback.jsonl and images/)")
    p = sub.add_parser("inspect", help="read shards back and count usable and skipped samples")
    p.add_argument("shards")
    p.add_argument("--kind", required=True, choices=FORMATS)
    p = sub.add_parser("cache", help="build the trainer's prefix cache of the frozen LM for shards")
    p.add_argument("--model", required=True, help="a vlm preset name or a model folder (the run's --model.preset)")
    p.add_argument("--init_from", help="the run's --model.init_from (the added rows are part of the cache's key)")
    p.add_argument("--shards", required=True, help="brace pattern, folder or file (as a data source's shards)")
    p.add_argument("--kind", required=True, choices=FORMATS)
    p.add_argument("--max_tokens", type=int, default=2048, help="the source's max_tokens")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "bf16-frozen"], help="the run's precision")
    p.add_argument("--cache_dir", help="the run's data.prefix_cache_dir (default: beside each shard)")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--device", default="cpu")
    args = parser.parse_args(underscore_options(sys.argv[1:] if argv is None else argv))

    from . import builders

    try:
        if args.source == "cache":
            return cache(args)
        if args.source == "inspect":
            return inspect(args.shards, args.kind)
        if args.source == "feedback":
            return feedback(args)
        if args.source == "folder":
            samples, prefix = builders.from_folder(args.path), "folder"
        elif args.source == "table":
            samples, prefix = builders.from_table(args.path), "table"
        elif args.source == "easy-vqa":
            samples, prefix = builders.easy_vqa(args.split), f"easy-vqa-{args.split}"
        elif args.source == "emoji":
            samples, prefix = builders.emoji(args.split, args.kind), f"emoji-{args.kind}-{args.split}"
        elif args.source == "shapes":
            samples = builders.shapes(args.split, args.count, args.seed, args.kind, args.workers)
            prefix = f"shapes-{args.kind}-{args.split}"
        else:
            samples = builders.sketches(args.split, args.count, args.seed, args.workers, args.style)
            prefix = f"sketch-{args.split}" + ("" if args.style == "plain" else f"-{args.style}")
        write(samples, args.out, args.prefix or prefix, args.shard_size, args.max_shard_mb * 1024 * 1024)
    except (FileNotFoundError, ValueError) as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
