"""Sources of samples for the shard writer: the user's own files, bundled real data,
and the synthetic generators. Each builder yields ``(sample, error)`` pairs: a sample
dict ready for :class:`~vlm_train.data.shards.ShardWriter`, or ``None`` and a message
naming the input that could not be used (the CLI reports and counts those)."""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import os
from collections.abc import Iterator
from functools import partial
from pathlib import Path

from PIL import Image

from vlm.images import IMAGE_EXTS
from vlm.registry import cache_dir
from vlm.tario import DEFAULT_MAX_MEMBER_BYTES

from .decode import SkipSample, decode_image
from .shards import caption_sample, image_bytes, qa_sample, sketch_sample

Built = tuple[dict | None, str | None]
EMOJI_PACKAGE = "emoji-datasource-twitter"
EMOJI_VERSION = "16.0.0"


def _checked_image(path: Path) -> tuple[bytes, str]:
    """The file's bytes if it decodes as an image (we keep the original encoding);
    FileNotFoundError when it does not exist, SkipSample when it cannot be used."""
    if path.exists() and not path.is_file():
        raise SkipSample("not a regular file")  # a folder named x.png, a pipe: reading would fail or block
    if path.stat().st_size > DEFAULT_MAX_MEMBER_BYTES:
        raise SkipSample(f"file too large (over {DEFAULT_MAX_MEMBER_BYTES:,} bytes: shard readers refuse it)")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise
    except OSError as e:
        raise SkipSample(f"cannot read it ({e.strerror or e})") from None
    decode_image(data)  # raises SkipSample when unusable
    ext = path.suffix.lower().lstrip(".")
    if ext not in ("png", "jpg", "jpeg"):
        # Re-encode other formats (webp, bmp, …) as PNG so every reader can open them.
        return image_bytes(Image.open(io.BytesIO(data)).convert("RGB")), "png"
    return data, "jpg" if ext == "jpeg" else ext


def from_folder(folder: str | os.PathLike) -> Iterator[Built]:
    """Images under ``folder`` (recursive), each with a sidecar ``.txt`` caption."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder")
    images = sorted(p for p in folder.rglob("*") if p.suffix.lower().lstrip(".") in IMAGE_EXTS)
    for i, path in enumerate(images):
        if not path.is_file():
            yield None, f"{path}: not a regular file"
            continue
        caption_file = path.with_suffix(".txt")
        if not caption_file.is_file():
            yield None, f"{path}: no caption file {caption_file.name}"
            continue
        caption = caption_file.read_text(encoding="utf-8", errors="replace").strip()
        if not caption:
            yield None, f"{caption_file}: empty caption"
            continue
        try:
            data, ext = _checked_image(path)
        except SkipSample as e:
            yield None, f"{path}: {e.reason}"
            continue
        meta = {"source": str(path.relative_to(folder))}
        yield caption_sample(f"{i:09d}", data, caption, meta, ext), None


def _rows(table: Path) -> Iterator[tuple[int, dict]]:
    if table.suffix.lower() == ".csv":
        with open(table, newline="", encoding="utf-8") as f:
            yield from enumerate(csv.DictReader(f), start=2)
    elif table.suffix.lower() in (".jsonl", ".json"):
        with open(table, encoding="utf-8") as f:
            for n, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError as e:
                    yield n, {"__error__": f"bad JSON ({e})"}
                    continue
                yield n, row if isinstance(row, dict) else {"__error__": "not a JSON object"}
    else:
        raise ValueError(f"{table}: expected a .csv or .jsonl file")


def from_table(table: str | os.PathLike) -> Iterator[Built]:
    """A CSV or JSONL of ``image`` + ``caption``, or ``image`` + ``question`` + ``answer``.
    Relative image paths are relative to the table's folder."""
    table = Path(table)
    if not table.is_file():
        raise FileNotFoundError(f"table {table} does not exist")
    for line, row in _rows(table):
        where = f"{table}:{line}"
        if "__error__" in row:
            yield None, f"{where}: {row['__error__']}"
            continue
        image = str(row.get("image") or "").strip()
        if not image:
            yield None, f"{where}: no image column"
            continue
        path = Path(image) if os.path.isabs(image) else table.parent / image
        caption = str(row.get("caption") or "").strip()
        question, answer = str(row.get("question") or "").strip(), str(row.get("answer") or "").strip()
        if not caption and not (question and answer):
            yield None, f"{where}: needs a caption, or a question and an answer"
            continue
        try:
            data, ext = _checked_image(path)
        except FileNotFoundError:
            yield None, f"{where}: image {path} not found"
            continue
        except SkipSample as e:
            yield None, f"{where}: {path}: {e.reason}"
            continue
        key, meta = f"{line:09d}", {"source": image}
        if caption:
            yield caption_sample(key, data, caption, meta, ext), None
        else:
            yield qa_sample(key, data, [(question, answer)], meta, ext), None


def easy_vqa(split: str) -> Iterator[Built]:
    """easy-VQA (PyPI ``easy-vqa``), its own train/test split: one sample per question."""
    import easy_vqa as ev

    if split not in ("train", "test"):
        raise ValueError(f"easy-vqa has splits train and test, not {split!r}")
    questions, answers, image_ids = ev.get_train_questions() if split == "train" else ev.get_test_questions()
    paths = ev.get_train_image_paths() if split == "train" else ev.get_test_image_paths()
    cache: dict[int, bytes] = {}
    for i, (q, a, image_id) in enumerate(zip(questions, answers, image_ids)):
        if image_id not in cache:
            cache[image_id] = Path(paths[image_id]).read_bytes()
        meta = {"image_id": int(image_id), "answer": a}
        yield qa_sample(f"{split}{i:07d}", cache[image_id], [(q, a)], meta), None


def emoji_folder() -> Path:
    """The installed npm package (``scripts/setup.sh`` installs it, pinned)."""
    root = Path(os.environ.get("VLM_EMOJI_DIR") or cache_dir() / "npm" / "node_modules" / EMOJI_PACKAGE)
    if not (root / "emoji.json").is_file():
        raise FileNotFoundError(
            f"the emoji images are not installed at {root}; run `bash scripts/setup.sh` or "
            f"`npm install --prefix {cache_dir() / 'npm'} {EMOJI_PACKAGE}@{EMOJI_VERSION}`"
        )
    return root


def emoji_split(short_name: str) -> str:
    """A fixed 80/10/10 split by emoji, so held-out emoji are never seen in training."""
    import zlib

    bucket = zlib.crc32(short_name.encode()) % 10
    return "test" if bucket == 0 else "val" if bucket == 1 else "train"


def emoji(split: str, kind: str = "caption") -> Iterator[Built]:
    """Twitter emoji (npm ``emoji-datasource-twitter``, images CC-BY 4.0) as captions
    ("a dog face emoji") or question-answer pairs about their category."""
    root = emoji_folder()
    entries = json.loads((root / "emoji.json").read_text(encoding="utf-8"))
    for entry in sorted(entries, key=lambda e: e["short_name"]):
        if not entry.get("has_img_twitter") or emoji_split(entry["short_name"]) != split:
            continue
        path = root / "img" / "twitter" / "64" / entry["image"]
        name = (entry.get("name") or entry["short_name"].replace("_", " ")).lower()
        if not path.is_file():
            yield None, f"{path}: missing image for {name}"
            continue
        data = path.read_bytes()
        key = entry["image"].rsplit(".", 1)[0].replace("-", "_")
        meta = {"short_name": entry["short_name"], "category": entry["category"]}
        if kind == "caption":
            yield caption_sample(key, data, f"a {name} emoji", meta), None
        else:
            question = "Which category does this emoji belong to?"
            yield qa_sample(key, data, [(question, entry["category"].lower())], meta), None


def _in_order(make, count: int, workers: int) -> Iterator:
    """``make(0), make(1), ...`` in order, computed in ``workers`` processes when above 1
    (the synthetic items are seeded by index, so the output does not depend on it)."""
    if workers <= 1:
        yield from map(make, range(count))
        return
    import multiprocessing

    with multiprocessing.Pool(workers) as pool:
        yield from pool.imap(make, range(count), chunksize=16)


def _scene_samples(split: str, seed: int, kind: str, index: int) -> list[dict]:
    from .shapes import scene_at

    scene = scene_at(split, index, seed)
    data = image_bytes(scene.image)
    key = scene.key.replace("-", "_")
    if kind == "caption":
        return [caption_sample(key, data, scene.caption)]
    return [qa_sample(f"{key}_{j}", data, [(q, a)]) for j, (q, a) in enumerate(scene.qa)]


def _page_sample(split: str, seed: int, style: str, index: int) -> dict:
    from .sketch2html import page_at

    page = page_at(split, index, seed, style)
    return sketch_sample(page.key.replace("-", "_"), image_bytes(page.sketch), page.html)


def shapes(split: str, count: int, seed: int = 0, kind: str = "qa", workers: int = 1) -> Iterator[Built]:
    """Synthetic shape scenes: one caption sample, or one sample per question."""
    from .shapes import check_split

    check_split(split)
    for samples in _in_order(partial(_scene_samples, split, seed, kind), count, workers):
        for sample in samples:
            yield sample, None


def sketches(split: str, count: int, seed: int = 0, workers: int = 1, style: str = "plain") -> Iterator[Built]:
    """Synthetic sketch-to-HTML pairs, drawn in ``style`` (``sketch2html.STYLES``)."""
    from .sketch2html import STYLES, check_split

    check_split(split)
    if style not in STYLES:
        raise ValueError(f"unknown sketch style {style!r}; choose from {', '.join(STYLES)}")
    for sample in _in_order(partial(_page_sample, split, seed, style), count, workers):
        yield sample, None


def emoji_installed() -> bool:
    try:
        emoji_folder()
        return True
    except FileNotFoundError:
        return False


def easy_vqa_installed() -> bool:
    return importlib.util.find_spec("easy_vqa") is not None
