"""Loader throughput: decode + transform + tokenise, per worker, for caption shards.

    python benchmarks/data.py                    # 224 px default transform, 0/1/2 workers
    python benchmarks/data.py --workers 0 2 --samples 2000

It writes a caption shard set of drawn 256 px JPEG scenes into a temporary folder,
then streams it with the default model's processor (EfficientNet-Lite0 transform at
224 px, SmolLM2 tokenizer) and prints samples/s in total and per worker, and the rate at
which a resumed run passes the batches it already trained on (read, decoded and tokenised,
but not transformed or sent: ``ShardStream.set_epoch(epoch, skip_batches=n)``).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from vlm.factory import create_model_and_transforms
from vlm_train.data.loader import LoaderConfig, SourceConfig, is_report_only, make_loader
from vlm_train.data.shapes import generate_scenes
from vlm_train.data.shards import ShardWriter, caption_sample, image_bytes


def write_shards(folder: Path, count: int) -> None:
    with ShardWriter(folder, "bench", max_samples=250) as writer:
        for scene in generate_scenes("train", count, image_size=256):
            writer.write(
                caption_sample(scene.key.replace("-", "_"), image_bytes(scene.image, "jpg"), scene.caption, ext="jpg")
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args(argv)
    _, processor = create_model_and_transforms(verbose=False)
    with tempfile.TemporaryDirectory() as tmp:
        write_shards(Path(tmp), args.samples)
        print(f"{args.samples} caption samples (256 px JPEG) -> 224 px tensors, batch {args.batch_size}")
        print("| workers | samples/s | samples/s per worker | skipped on resume: samples/s | x built |")
        print("| --- | --- | --- | --- | --- |")
        for workers in args.workers:
            cfg = LoaderConfig([SourceConfig(tmp, "caption")], batch_size=args.batch_size, num_workers=workers)
            rates = []
            for skip in (0, args.samples):  # built in full, then every batch a resume's placeholder
                loader = make_loader(cfg, processor)
                loader.dataset.set_epoch(0, skip_batches=skip)
                start, seen = time.perf_counter(), 0
                for batch in loader:
                    if not is_report_only(batch):
                        seen += len(batch["keys"])
                rates.append(seen / (time.perf_counter() - start))
            rate, skipping = rates
            print(
                f"| {workers} | {rate:.0f} | {rate / max(workers, 1):.0f} | {skipping:.0f} | {skipping / rate:.2f} |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
