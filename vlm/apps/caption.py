"""Caption many images with a vlm checkpoint: ``vlm-caption INPUT [...] [--model DIR] [--out captions.jsonl]``.

Inputs are folders (searched recursively), quoted glob patterns, text files listing one image path
per line, and webdataset shards (``x.tar`` or ``x-{000000..000009}.tar``). Each input gets one row
(path, caption, error) in a JSONL or CSV file. Inputs already in the file are skipped, so a killed
or interrupted run resumes when the same command is run again.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import os
import stat
import sys
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import IO, TYPE_CHECKING

from vlm.apps import add_model_arguments
from vlm.images import DEFAULT_MAX_PIXELS, IMAGE_EXTS, has_image_ext
from vlm.tario import ShardError, iter_tar_samples
from vlm.tasks import CAPTION, CAPTION_PROMPT

if TYPE_CHECKING:
    from PIL import Image

    from vlm.generate import GenerationConfig
    from vlm.model import VLM
    from vlm.processor import Processor

CSV_HEADER = ["path", "caption", "error"]


@dataclass(frozen=True)
class Failure:
    """An input known to be unusable without decoding it (e.g. a shard sample with no image)."""

    message: str


Source = str | bytes | Failure


class OutputError(Exception):
    """Writing the output failed (disk full, I/O error, a closed pipe): the run stops."""


# ---------------------------------------------------------------------- inputs


def _walk(folder: str) -> list[str]:
    found = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        found.extend(os.path.join(root, f) for f in sorted(files) if has_image_ext(f))
    return found


def collect_inputs(args: Sequence[str], lists: Sequence[str]) -> tuple[list[str], list[str], list[str]]:
    """``(image paths, shard paths, problems)``; a problem is an argument that names nothing."""
    import glob

    import braceexpand

    files: list[str] = []
    shards: list[str] = []
    problems: list[str] = []
    for arg, is_list in [*((a, a.lower().endswith(".txt")) for a in args), *((name, True) for name in lists)]:
        if is_list:
            try:
                text = Path(arg).read_text(encoding="utf-8", errors="surrogateescape")
            except OSError as e:
                problems.append(f"{arg}: cannot read the list ({e.strerror or e})")
                continue
            # Entries are kept even when missing: that is an error row, not a reason to refuse the whole run.
            files.extend(line.strip() for line in text.splitlines() if line.strip())
        elif any(c in arg for c in "*?["):
            for match in sorted(glob.glob(arg, recursive=True)):
                if os.path.isdir(match):
                    files.extend(_walk(match))
                elif match.lower().endswith(".tar"):
                    shards.append(match)
                elif has_image_ext(match):
                    files.append(match)
        elif arg.lower().endswith(".tar"):
            expanded = list(braceexpand.braceexpand(arg))
            missing = [p for p in expanded if not os.path.isfile(p)]
            if missing:
                problems.append(f"{arg}: {len(missing)} shard(s) not found, e.g. {missing[0]}")
            shards.extend(p for p in expanded if p not in missing)
        elif os.path.isdir(arg):
            files.extend(_walk(arg))
        elif os.path.isfile(arg):
            files.append(arg)  # named explicitly: kept whatever its extension, a non-image gets an error row
        else:
            problems.append(f"{arg}: no such file, folder or shard")
    unique = list(dict.fromkeys(os.path.normpath(p) for p in files))
    return unique, list(dict.fromkeys(os.path.normpath(p) for p in shards)), problems


def _shard_items(shard: str) -> Iterator[tuple[str, Source]]:
    """One item per sample of a webdataset shard (read by :mod:`vlm.tario`, which checks every
    declared size): a sample with a bad member is an error row of its own, and a shard that
    cannot be read on (truncated, not a tar) one row for the shard after the samples before."""
    try:
        for sample in iter_tar_samples(shard):
            row = f"{shard}#{sample.key}"
            if sample.problem:
                yield row, Failure(f"{sample.problem} ({sample.detail})")
                continue
            members = sample.members
            image = next((m for m in members if m.rsplit(".", 1)[-1] in IMAGE_EXTS), None)
            yield row, members[image] if image else Failure(f"no image in sample (members: {', '.join(members)})")
    except ShardError as e:
        yield shard, Failure(f"unreadable shard ({e})")


def _decode(source: Source, max_pixels: int) -> tuple[Image.Image | None, str | None]:
    from vlm.images import ImageError, load_image

    if isinstance(source, Failure):
        return None, source.message
    try:
        return load_image(source, max_pixels), None
    except ImageError as e:
        return None, e.reason


def decoded(
    items: Iterable[tuple[str, Source]], max_pixels: int, lookahead: int, workers: int = 4
) -> Iterator[tuple[str, Image.Image | None, str | None]]:
    """Items with their images decoded on worker threads, in input order, at most ``lookahead`` ahead
    so that a huge input list never holds more than a few batches of images in memory."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        queue: deque = deque()
        for item_id, source in items:
            queue.append((item_id, pool.submit(_decode, source, max_pixels)))
            if len(queue) >= lookahead:
                item_id, future = queue.popleft()
                yield item_id, *future.result()
        while queue:
            item_id, future = queue.popleft()
            yield item_id, *future.result()


# ---------------------------------------------------------------------- output


def _json_row(line: bytes) -> str | None:
    try:
        row = json.loads(line)
    except ValueError:
        return None
    return row["path"] if isinstance(row, dict) and isinstance(row.get("path"), str) else None


def _csv_record(raw: bytes) -> list[str] | None:
    try:
        records = list(csv.reader(io.StringIO(raw.decode("utf-8", "surrogateescape"), newline=""), strict=True))
    except csv.Error:
        return None
    return records[0] if len(records) == 1 and len(records[0]) == len(CSV_HEADER) else None


def scan_output(data: bytes, fmt: str) -> tuple[set[str], int]:
    """Ids already in an output file and the byte length to keep: a final record that was cut
    (no newline, or unparseable) is dropped so that its input is captioned again."""
    ids: set[str] = set()
    pos, number = 0, 0
    while pos < len(data):
        start, end = pos, data.find(b"\n", pos)
        # A quoted CSV field may hold newlines: the record ends at the first newline with balanced quotes.
        while fmt == "csv" and end >= 0 and data.count(b'"', start, end + 1) % 2:
            end = data.find(b"\n", end + 1)
        if end < 0:
            return ids, start
        pos, number = end + 1, number + 1
        raw = data[start:pos]
        if not raw.strip():
            continue
        if fmt == "jsonl":
            row_id = _json_row(raw)
        else:
            record = _csv_record(raw)
            if number == 1 and record == CSV_HEADER:
                continue
            if number == 1 and record is not None:
                raise ValueError(f"it does not start with the header {','.join(CSV_HEADER)}: not a vlm-caption CSV")
            row_id = record[0] if record is not None else None
        if row_id is None:
            # Only the last record can be a cut write; a bad first record is more likely the wrong --format.
            if data[pos:].strip() or number == 1:
                raise ValueError(f"record {number} is not a {fmt} caption row; fix or remove it, then rerun")
            return ids, start
        ids.add(row_id)
    return ids, pos


def encode_row(fmt: str, path: str, caption: str | None, error: str | None) -> bytes:
    """One complete record, so that it reaches the file in a single write."""
    if fmt == "jsonl":
        return (json.dumps({"path": path, "caption": caption, "error": error}) + "\n").encode("ascii")
    buffer = io.StringIO(newline="")
    csv.writer(buffer).writerow([path, caption or "", error or ""])
    return buffer.getvalue().encode("utf-8", "surrogateescape")


def _is_regular(file: IO[bytes]) -> bool:
    return stat.S_ISREG(os.fstat(file.fileno()).st_mode)


def write_all(file: IO[bytes], records: Iterable[bytes]) -> None:
    """Write and sync; an OSError (ENOSPC, EIO, a closed pipe) propagates: the run must stop."""
    for record in records:
        view = memoryview(record)
        while view:  # an unbuffered write may be partial
            view = view[file.write(view) :]
    file.flush()
    if _is_regular(file):  # a pipe or a device cannot be synced (EINVAL)
        os.fsync(file.fileno())


def lock_exclusive(file: IO[bytes]) -> None:
    """Lock ``file`` for this process until it is closed; BlockingIOError when another holds it."""
    if sys.platform == "win32":
        import msvcrt  # Windows has no flock; a lock on byte 0 stands for the whole file

        file.seek(0)
        try:
            msvcrt.locking(file.fileno(), msvcrt.LK_NBLCK, 1)
        except OSError as e:
            raise BlockingIOError(*e.args) from None
    else:
        import fcntl  # POSIX only: imported here so the module imports on Windows too

        fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)


def open_output(path: Path, fmt: str) -> tuple[IO[bytes], set[str]]:
    """The output opened for appending and locked, with the ids it already holds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    file = open(path, "a+b", buffering=0)  # held open, and locked, for the whole run
    try:
        # Two runs appending to one file would caption the same inputs twice.
        lock_exclusive(file)
    except BlockingIOError:
        file.close()
        raise ValueError("another vlm-caption run is writing it") from None
    ids: set[str] = set()
    keep = 0
    # Only a regular file holds earlier rows: a device or pipe (/dev/stdout, /dev/full) has
    # nothing to resume from, and reading /dev/full or /dev/zero never ends.
    if _is_regular(file):
        file.seek(0)
        data = file.read()
        try:
            ids, keep = scan_output(data, fmt)
        except ValueError:
            file.close()
            raise
        if keep < len(data):
            file.truncate(keep)
    if keep == 0 and fmt == "csv":
        try:
            write_all(file, [encode_row("csv", *CSV_HEADER)])
        except OSError:
            file.close()
            raise
    return file, ids


# ---------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    head, rest = __doc__.split("\n\n", 1)
    parser = argparse.ArgumentParser(prog="vlm-caption", description=head.split(":")[0] + ".", epilog=rest)
    add = parser.add_argument
    add("inputs", nargs="*", metavar="INPUT", help="folder, 'glob', list.txt, shard.tar or 'x-{000000..000009}.tar'")
    add("--list", action="append", default=[], metavar="FILE", help="image paths, one a line, relative to the cwd")
    add_model_arguments(parser)
    add("--out", type=Path, metavar="FILE", default=Path("captions.jsonl"), help="default: %(default)s")
    add("--format", choices=["jsonl", "csv"], help="default: from the --out extension, else jsonl")
    add("--batch_size", type=int, metavar="N", default=8, help="default: %(default)s")
    add("--prompt", metavar="TEXT", help=f"default: {CAPTION_PROMPT!r}; LMs without a chat template: none")
    add(
        "--max_new_tokens",
        type=int,
        metavar="N",
        help=f"default: the checkpoint's, else {CAPTION.decoding.max_new_tokens}",
    )
    add("--num_beams", type=int, metavar="N", default=1, help="beam search when > 1 (default: %(default)s)")
    add("--sample", action="store_true", help="sample instead of greedy decoding")
    add("--temperature", type=float, default=1.0, help="with --sample (default: %(default)s)")
    add("--top_p", type=float, default=1.0, help="with --sample (default: %(default)s)")
    add("--seed", type=int, help="with --sample: the same seed and batches give the same captions")
    add("--max_pixels", type=int, metavar="N", default=DEFAULT_MAX_PIXELS, help="larger are refused (%(default)s)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(name)s: %(message)s")  # vlm's progress notes (e.g. the first-run dequantising)
    logging.getLogger("vlm").setLevel(logging.INFO)
    if min(args.batch_size, args.max_new_tokens or 1, args.num_beams, args.max_pixels) < 1:
        parser.error("--batch_size, --max_new_tokens, --num_beams and --max_pixels must be at least 1")
    fmt = args.format or ("csv" if args.out.suffix.lower() == ".csv" else "jsonl")
    from tqdm import tqdm

    from vlm.factory import load_model
    from vlm.hub import is_repo_id
    from vlm.tasks import caption_images

    decoding = dict(
        max_new_tokens=args.max_new_tokens,
        num_beams=args.num_beams,
        do_sample=args.sample,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
    )
    try:
        CAPTION.generation_config(**decoding).validate()  # the user's settings, checked before loading
    except ValueError as e:
        parser.error(str(e))
    if args.model is not None and not (Path(args.model) / "config.json").is_file() and not is_repo_id(args.model):
        what = "no config.json" if Path(args.model).is_dir() else "no such folder, nor a Hub repo id owner/name"
        parser.error(f"--model {args.model}: not a vlm checkpoint folder ({what})")
    files, shards, problems = collect_inputs(args.inputs, args.list)
    if problems:
        parser.error("; ".join(problems))
    if not files and not shards:
        parser.error(f"no inputs found in {' '.join(args.inputs + args.list)} (images: {', '.join(IMAGE_EXTS)})")

    try:
        out, done = open_output(args.out, fmt)
    except (OSError, ValueError) as e:
        parser.exit(2, f"{parser.prog}: error: --out {args.out}: {e}\n")
    loaded: list[tuple[VLM, Processor, GenerationConfig]] = []

    def model() -> tuple[VLM, Processor, GenerationConfig]:
        # Loaded on first need: a finished job's rerun returns at once instead of loading backbones.
        if not loaded:
            try:
                vlm_model, processor = load_model(
                    args.model, verbose=False, device=args.device, dtype=args.dtype, lm_weights=args.lm_weights
                )
                config = CAPTION.generation_config(vlm_model, **decoding).validate()  # the checkpoint's defaults
                loaded.append((vlm_model.eval(), processor, config))
            except Exception as e:  # a broken checkpoint, a missing backbone, no such device: one line, no traceback
                parser.exit(2, f"{parser.prog}: error: cannot load the model on {args.device}: {e}\n")
        return loaded[0]

    skipped = captioned = failed = 0
    todo = None if shards else sum(f not in done for f in files)
    pending: list[tuple[str, Image.Image | None, str | None]] = []

    def flush() -> None:
        nonlocal captioned, failed
        images = [image for _, image, _ in pending if image is not None]
        if images:
            vlm_model, processor, config = model()
            captions = iter(caption_images(vlm_model, processor, images, args.prompt, config))
        records = [
            encode_row(fmt, item_id, None if image is None else next(captions), error)
            for item_id, image, error in pending
        ]
        try:
            write_all(out, records)
        except OSError as e:
            raise OutputError(e.strerror or str(e)) from e
        captioned += len(images)
        failed += len(pending) - len(images)
        progress.update(len(pending))
        pending.clear()

    def fresh() -> Iterator[tuple[str, Source]]:
        nonlocal skipped
        seen: set[str] = set()
        for item_id, source in chain(((f, f) for f in files), *(_shard_items(s) for s in shards)):
            if item_id in done:
                skipped += 1
            elif item_id not in seen:  # a key repeated inside a shard is captioned once
                seen.add(item_id)
                yield item_id, source

    try:
        with (
            out,
            tqdm(total=todo, unit=" images", disable=None, dynamic_ncols=True) as progress,
            closing(decoded(fresh(), args.max_pixels, lookahead=2 * args.batch_size)) as stream,
        ):
            ready = 0
            for item_id, image, error in stream:
                pending.append((item_id, image, error))
                ready += image is not None
                # Runs of failures are flushed too, so they are never held back waiting for a full batch.
                if ready == args.batch_size or len(pending) >= 4 * args.batch_size:
                    flush()
                    ready = 0
            if pending:
                flush()
    except KeyboardInterrupt:
        print(f"\ninterrupted: run the same command again to resume {args.out}", file=sys.stderr)
        return 130
    except OutputError as e:
        # Reading on would caption inputs whose rows are lost. Rows already written are whole
        # (a cut last one is dropped on resume), so the same command resumes once there is room.
        print(f"{parser.prog}: error: cannot write to {args.out} ({e}); stopped", file=sys.stderr)
        return 1
    print(f"done {captioned}, skipped {skipped} (already in {args.out}), failed {failed}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
