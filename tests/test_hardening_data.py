"""Data hardening: hostile or broken shards are counted by reason and skipped, never fatal,
never unbounded in time or memory; every good sample still arrives and trains."""

import gzip
import json
import logging
import signal
import struct
import tarfile
import zlib
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import make_checkpoint, shape_image

from vlm.images import ImageError, load_image
from vlm.model import IGNORE_INDEX
from vlm_train.data import builders
from vlm_train.data.cli import main as data_main
from vlm_train.data.decode import SkipSample, decode_image
from vlm_train.data.loader import LoaderConfig, SourceConfig, is_report_only, make_loader
from vlm_train.data.shards import caption_sample, image_bytes, qa_sample

PETABYTE = 2**50


# ---------------------------------------------------------------------- helpers


@contextmanager
def deadline(seconds: float):
    """Fail instead of hanging: the defects here used to loop forever or for hours. The
    error repeats every half second, as a loop that swallows exceptions may catch one."""

    def expire(*_):
        raise TimeoutError(f"no result within {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds, 0.5)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _png(color="red", size=24) -> bytes:
    return image_bytes(shape_image(color, size=size))


def _member(name: str, data: bytes, declared: int | None = None, kind: bytes = tarfile.REGTYPE) -> bytes:
    """One tar member by hand; ``declared`` makes its header claim another size than the data."""
    info = tarfile.TarInfo(name)
    info.size = len(data) if declared is None else declared
    info.type = kind
    return info.tobuf(format=tarfile.GNU_FORMAT) + data + b"\0" * (-len(data) % 512)


def _members(sample: dict) -> bytes:
    key = sample["__key__"]
    return b"".join(_member(f"{key}.{ext}", data) for ext, data in sample.items() if ext != "__key__")


END = b"\0" * 1024  # the end-of-archive marker


def _shard(path: Path, *parts: bytes, end: bool = True) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(parts) + (END if end else b""))
    return path


def _huge_member_shard(path: Path, good: list[dict], declared: int = PETABYTE) -> Path:
    """Good samples, then a member whose header claims ``declared`` bytes that are not there."""
    return _shard(path, *map(_members, good), _member("huge.png", b"", declared), end=False)


def _truncated_shard(path: Path, good: dict, cut: dict) -> Path:
    """``good``, then ``cut`` whose image data stops halfway (a copy that was interrupted)."""
    first, second = _members(good), _members(cut)
    stop = len(first) + second.index(cut["png"]) + len(cut["png"]) // 2
    return _shard(path, (first + second)[:stop], end=False)


def _png_file(width: int, height: int, rows: bytes) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows, 9)) + chunk(b"IEND", b"")


def _wide_png(width: int, height: int = 1) -> bytes:
    """A valid PNG, tiny on disk however wide (rows of zeros compress well)."""
    return _png_file(width, height, (b"\0" + b"\0" * width) * height)


def _header_png(width: int, height: int) -> bytes:
    """A PNG whose header claims a size its pixel data does not have: a check must come before decoding."""
    return _png_file(width, height, b"\0" * 16)


def _nested_json(depth: int = 100_000) -> bytes:
    return b"[" * depth + b"]" * depth


def _collect(cfg: LoaderConfig, processor, workers: int = 0):
    cfg.num_workers = workers
    keys, skipped, batches = [], Counter(), []
    for batch in make_loader(cfg, processor, 0, 1):
        skipped.update(batch["skipped"])
        if not is_report_only(batch):
            keys.extend(batch["keys"])
            batches.append(batch)
    return keys, skipped, batches


def _good_caption(key: str, color: str = "red") -> dict:
    return caption_sample(key, _png(color), f"a {color} circle")


# ---------------------------------------------------------------------- 3: any per-sample error is counted


def test_deeply_nested_json_is_a_counted_skip_not_a_crash(make_model, tmp_path):
    _, processor = make_model("llama")
    nested = {"__key__": "nested", "png": _png(), "json": _nested_json()}
    samples = [qa_sample("q0", _png(), [("colour?", "red")]), nested, qa_sample("q1", _png(), [("shape?", "circle")])]
    _shard(tmp_path / "qa-000000.tar", *map(_members, samples))
    cfg = LoaderConfig([SourceConfig(str(tmp_path), "qa")], batch_size=1, shuffle_buffer=0, drop_last=False)
    keys, skipped, _ = _collect(cfg, processor)
    assert keys == ["q0", "q1"] and skipped == {"bad json": 1}


def test_any_exception_of_one_sample_is_counted_by_type_but_memory_errors_stop_the_run(
    make_model, tmp_path, monkeypatch
):
    from vlm_train.data import loader

    _, processor = make_model("gpt2")
    real = loader.example_segments

    def flaky(proc, example):
        if example.text == "boom":
            raise KeyError("a tokenizer quirk")
        if example.text == "oom":
            raise MemoryError
        return real(proc, example)

    monkeypatch.setattr(loader, "example_segments", flaky)
    samples = [_good_caption("a"), caption_sample("b", _png(), "boom"), _good_caption("c", "blue")]
    _shard(tmp_path / "caps" / "c-000000.tar", *map(_members, samples))
    cfg = LoaderConfig([SourceConfig(str(tmp_path / "caps"), "caption")], batch_size=1, drop_last=False)
    keys, skipped, _ = _collect(cfg, processor)
    assert sorted(keys) == ["a", "c"] and skipped == {"decode error: KeyError": 1}
    _shard(tmp_path / "oom" / "c-000000.tar", _members(caption_sample("d", _png(), "oom")))
    with pytest.raises(MemoryError):
        _collect(LoaderConfig([SourceConfig(str(tmp_path / "oom"), "caption")], batch_size=1), processor)


def test_marker_text_inside_an_interleaved_text_item_stays_text(make_model):
    from vlm_train.data.decode import decode_sample, example_segments

    _, processor = make_model("llama")
    items = [{"text": "See <image> and <|endofchunk|> here: "}, {"image": "0.png"}, {"text": "a red dot."}]
    raw = {"__key__": "doc", "json": json.dumps({"items": items}).encode(), "0.png": _png()}
    ids, _ = processor.encode(example_segments(processor, decode_sample(raw, "interleaved")))
    assert ids.count(processor.image_token_id) == 1  # the one image item, not the text's "<image>"
    assert ids.count(processor.end_of_chunk_token_id) == 1  # closing the image's chunk only
    assert "See <image> and <|endofchunk|> here" in processor.tokenizer.decode(ids)


def test_an_interleaved_image_name_refers_only_to_a_member(tmp_path):
    from vlm_train.data.decode import decode_sample

    local = tmp_path / "on-this-machine.png"
    local.write_bytes(_png())
    items = json.dumps({"items": [{"image": "__key__"}, {"text": "a red circle"}]}).encode()
    with pytest.raises(SkipSample, match="missing image"):  # not a file read from a path in the data
        decode_sample({"__key__": str(local), "json": items}, "interleaved")


# ---------------------------------------------------------------------- 4: image sides and aspect ratio


def test_extreme_image_shapes_are_refused_from_the_header():
    from vlm.images import MAX_ASPECT_RATIO, MAX_SIDE

    line = _wide_png(16_777_216)  # 16 M pixels: within the 4096² pixel limit, but a resize needs gigabytes
    assert len(line) < 100_000
    with pytest.raises(ImageError) as error:
        load_image(line)
    assert error.value.kind == "image aspect ratio"
    with pytest.raises(SkipSample, match="image aspect ratio"):
        decode_image(line)
    # A long side beyond the limit at a moderate ratio; only the header exists, so the
    # check must come before any pixel is decoded.
    assert MAX_SIDE < 16_400 and 16_400 * 400 <= 4096 * 4096 and 16_400 / 400 <= MAX_ASPECT_RATIO
    with pytest.raises(SkipSample, match="image too large"):
        decode_image(_header_png(16_400, 400))
    with pytest.raises(SkipSample, match="image aspect ratio"):
        decode_image(_header_png(MAX_ASPECT_RATIO * 10 + 1, 10))
    assert load_image(_wide_png(MAX_ASPECT_RATIO * 10, 10)).size == (MAX_ASPECT_RATIO * 10, 10)


# ---------------------------------------------------------------------- 6: length caps


def test_long_samples_are_truncated_or_skipped_and_huge_text_is_not_decoded(make_model, tmp_path):
    from vlm_train.data.decode import MAX_TEXT_BYTES

    assert SourceConfig("x", "caption").max_tokens == 2048
    _, processor = make_model("llama")  # chat template: the prompt is untrained, the caption trains
    long_caption = " ".join(f"red circle number {i}" for i in range(10_000))[:200_000]
    caps = [caption_sample("long", _png(), long_caption), _good_caption("short")]
    huge_text = {"__key__": "huge", "png": _png(), "txt": b"a" * (MAX_TEXT_BYTES + 1)}
    _shard(tmp_path / "caps" / "c-000000.tar", *map(_members, [*caps, huge_text]))
    long_question = " ".join(["what colour is the circle"] * 100)
    qa = [qa_sample("longq", _png(), [(long_question, "red")]), qa_sample("q", _png(), [("colour?", "red")])]
    _shard(tmp_path / "qa" / "q-000000.tar", *map(_members, qa))
    sources = [
        SourceConfig(str(tmp_path / "caps"), "caption", max_tokens=64),
        SourceConfig(str(tmp_path / "qa"), "qa", max_tokens=64),
    ]
    keys, skipped, batches = _collect(LoaderConfig(sources, batch_size=1, shuffle_buffer=0, drop_last=False), processor)
    assert sorted(keys) == ["long", "q", "short"]
    assert skipped == {"truncated": 1, "too long": 1, "text too large": 1}
    long = next(b for b in batches if b["keys"] == ["long"])
    assert long["input_ids"].shape[1] == 64
    labels = long["labels"][0]
    assert labels[-1] != IGNORE_INDEX  # it ends on trained text, not on a dangling prompt
    assert processor.tokenizer.decode(long["input_ids"][0][labels != IGNORE_INDEX]) in long_caption
    assert (long["input_ids"][0] == processor.image_token_id).sum() == 1


# ---------------------------------------------------------------------- 7: barren sources in resampled mixtures


def test_a_resampled_source_with_nothing_usable_is_dropped_not_waited_on(make_model, tmp_path, caplog):
    _, processor = make_model("gpt2")
    _shard(tmp_path / "good" / "g-000000.tar", *(_members(_good_caption(f"g{i}")) for i in range(4)))
    for i in range(2):
        corrupt = {"__key__": f"b{i}", "png": b"not a png", "txt": b"a caption"}
        _shard(tmp_path / "bad" / f"b-{i:06d}.tar", _members(corrupt))
    bad_pattern = str(tmp_path / "bad" / "b-{000000..000001}.tar")
    sources = [SourceConfig(str(tmp_path / "good"), "caption"), SourceConfig(bad_pattern, "caption")]
    cfg = LoaderConfig(sources, batch_size=2, resampled=True, epoch_batches=6, shuffle_buffer=4)
    with caplog.at_level(logging.WARNING), deadline(60):
        keys, skipped, batches = _collect(cfg, processor)
    assert len(batches) == 6 and all(k.startswith("g") for k in keys)
    assert skipped["corrupt image"] >= 2
    dropped = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
    assert len(dropped) == 1 and bad_pattern in dropped[0] and "corrupt image" in dropped[0]

    # A select that matches nothing, alone in the mixture: an error naming it, from the workers too.
    none = SourceConfig(str(tmp_path / "good"), "caption", select="no such word")
    cfg = LoaderConfig([none], batch_size=2, resampled=True, epoch_batches=6, shuffle_buffer=4)
    for workers in (0, 2):
        with deadline(60), pytest.raises(RuntimeError, match="no usable samples") as error:
            _collect(cfg, processor, workers=workers)
        assert str(tmp_path / "good") in str(error.value) and "select" in str(error.value)


def test_a_resampled_source_with_some_empty_shards_is_kept(make_model, tmp_path, caplog):
    _, processor = make_model("gpt2")
    _shard(tmp_path / "s-000000.tar", *(_members(_good_caption(f"g{i}")) for i in range(2)))
    _shard(tmp_path / "s-000001.tar")  # empty, drawn about half the time
    cfg = LoaderConfig([SourceConfig(str(tmp_path), "caption")], batch_size=1, resampled=True, epoch_batches=60)
    with caplog.at_level(logging.WARNING), deadline(60):
        keys, _, _ = _collect(cfg, processor)
    assert len(keys) == 60 and not [r for r in caplog.records if "dropped" in r.getMessage()]


# ---------------------------------------------------------------------- 8: declared member sizes


def test_a_member_declaring_a_petabyte_costs_nothing_in_the_loader(make_model, tmp_path):
    _, processor = make_model("gpt2")
    _huge_member_shard(tmp_path / "c-000000.tar", [_good_caption("a"), _good_caption("b", "blue")])
    cfg = LoaderConfig([SourceConfig(str(tmp_path), "caption")], batch_size=1, shuffle_buffer=0, drop_last=False)
    with deadline(20):
        keys, skipped, _ = _collect(cfg, processor)
    assert keys == ["a", "b"] and skipped == {"member too large": 1}


def test_the_safe_tar_reader(tmp_path):
    from vlm.tario import ShardError, iter_tar_samples

    a, b = _good_caption("a"), _good_caption("b", "blue")
    # A member over the cap but really in the file is stepped over; what follows still reads.
    path = _shard(tmp_path / "big.tar", _members(a), _member("big.txt", b"x" * 5000), _members(b))
    samples = list(iter_tar_samples(path, max_member_bytes=4096))
    assert [(s.key, s.problem) for s in samples] == [("a", None), ("big", "member too large"), ("b", None)]
    assert samples[2].members == {"png": b["png"], "txt": b["txt"], "json": b["json"]}
    # Header-only tricks: a GNU long name or a pax header that declares a petabyte makes
    # tarfile itself read that much in one call unless reads are bounded by the file.
    for kind in (tarfile.GNUTYPE_LONGNAME, tarfile.XHDTYPE):
        path = _shard(tmp_path / f"forged-{kind.decode()}.tar", _members(a), _member("././@x", b"", PETABYTE, kind))
        keys = []
        with deadline(20), pytest.raises(ShardError) as error:
            keys.extend(s.key for s in iter_tar_samples(path))
        assert keys == ["a"] and error.value.reason in ("truncated shard", "corrupt shard")
    # A repeated member name in one sample makes it unusable rather than silently overwritten.
    path = _shard(tmp_path / "dup.tar", _members(a), _member("a.txt", b"again"))
    assert [(s.key, s.problem) for s in iter_tar_samples(path)] == [("a", "duplicate member")]
    # A compressed shard is refused with what to do about it.
    gz = tmp_path / "c.tar.gz"
    gz.write_bytes(gzip.compress(path.read_bytes()))
    with pytest.raises(ShardError, match="gunzip"):
        list(iter_tar_samples(gz))


# ---------------------------------------------------------------------- 11: tools carry on


def test_inspect_counts_every_unreadable_shard_and_carries_on(tmp_path, capsys):
    good = [_good_caption(f"g{i}") for i in range(4)]
    _shard(tmp_path / "s-000000.tar", _members(good[0]), _members(good[1]))
    _truncated_shard(tmp_path / "s-000001.tar", good[2], _good_caption("cut"))
    (tmp_path / "s-000002.tar").write_text("this is not a tar file\n" * 50)
    # s-000003.tar is missing
    _huge_member_shard(tmp_path / "s-000004.tar", [good[3]])
    with deadline(30):
        assert data_main(["inspect", str(tmp_path / "s-{000000..000004}.tar"), "--kind", "caption"]) == 0
    out = capsys.readouterr()
    assert "4 usable samples" in out.out
    for reason in ("member too large 1", "missing shard 1", "not a tar file 1", "truncated shard 1"):
        assert reason in out.out, out.out
    assert "s-000002.tar" in out.err and "s-000003.tar" in out.err  # which shards, so they can be found


def test_builders_skip_a_folder_named_like_an_image(tmp_path, capsys):
    src = tmp_path / "photos"
    src.mkdir()
    shape_image("red").save(src / "red.png")
    (src / "red.txt").write_text("a red circle")
    (src / "x.png").mkdir()
    (src / "x.txt").write_text("a folder, not an image")
    assert data_main(["folder", str(src), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr()
    assert "x.png: not a regular file" in out.err and "wrote 1 samples" in out.out
    (tmp_path / "t.csv").write_text("image,caption\nphotos/x.png,a folder\nphotos/red.png,a red circle\n")
    rows = list(builders.from_table(tmp_path / "t.csv"))
    assert "not a regular file" in rows[0][1] and rows[1][1] is None


# ---------------------------------------------------------------------- everything at once


def _fuzz_shards(root: Path) -> tuple[list[str], Counter, list[dict]]:
    """Shards holding every bad case above among good samples: (good keys, expected counts, sources)."""
    caps, qa = root / "caps", root / "qa"
    long_caption = " ".join(f"a red circle, number {i}" for i in range(9_000))[:200_000]
    good = [_good_caption(f"cg{i}", c) for i, c in enumerate(["red", "blue", "green", "cyan"])]
    good.append(caption_sample("long", _png(), long_caption))  # kept, truncated
    good.append(caption_sample("special", _png(), "a <image> and an <|im_end|> in the text"))
    bad = [
        ({"__key__": "aspect", "png": _wide_png(16_777_216), "txt": b"a line"}, "image aspect ratio"),
        ({"__key__": "corrupt", "png": b"\x89PNG\r\n\x1a\n not really", "txt": b"broken"}, "corrupt image"),
        ({"__key__": "noimage", "txt": b"no image member"}, "missing image"),
        ({"__key__": "notext", "png": _png()}, "missing text"),
        ({"__key__": "hugetext", "png": _png(), "txt": b"a " * 600_000}, "text too large"),
    ]
    mixed = [m for pair in zip(good, [b for b, _ in bad] + [None] * len(good)) for m in pair if m is not None]
    _shard(caps / "c-000000.tar", *map(_members, mixed))
    _truncated_shard(caps / "c-000001.tar", _good_caption("cg4", "pink"), _good_caption("cut"))
    (caps / "c-000002.tar").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 3000)  # not a tar
    _huge_member_shard(caps / "c-000003.tar", [_good_caption("cg5", "grey")])
    qa_good = [qa_sample(f"qg{i}", _png(c), [("what colour?", c)]) for i, c in enumerate(["red", "blue"])]
    nested = {"__key__": "nested", "png": _png(), "json": _nested_json()}
    long_question = qa_sample("longq", _png(), [(" ".join(["what colour is the circle?"] * 60), "red")])
    _shard(qa / "q-000000.tar", *map(_members, [qa_good[0], nested, long_question, qa_good[1]]))
    keys = [g["__key__"] for g in good] + ["cg4", "cg5", "qg0", "qg1"]
    shards = ["truncated shard", "not a tar file", "member too large"]
    expected = Counter([r for _, r in bad] + shards + ["bad json", "too long"])
    expected["truncated"] += 1
    sources = [
        {"shards": str(caps / "c-{000000..000003}.tar"), "kind": "caption", "max_tokens": 96},
        {"shards": str(qa), "kind": "qa", "max_tokens": 96},
    ]
    return keys, expected, sources


def test_fuzz_every_bad_case_is_counted_and_every_good_sample_arrives_and_trains(make_model, tmp_path):
    from vlm_train.train import main as train_main

    good, expected, sources = _fuzz_shards(tmp_path / "data")
    _, processor = make_model("llama")
    for workers in (0, 2):
        cfg = LoaderConfig([SourceConfig(**s) for s in sources], batch_size=3, shuffle_buffer=4, drop_last=False)
        with deadline(120):
            keys, skipped, batches = _collect(cfg, processor, workers=workers)
        assert sorted(keys) == sorted(good), workers
        assert skipped == expected, workers
        assert all(b["input_ids"].shape[1] <= 96 for b in batches)
    batch = next(b for b in batches if "special" in b["keys"])
    row = batch["keys"].index("special")
    special = batch["input_ids"][row][batch["attention_mask"][row] == 1]  # without the padding

    ckpt = make_checkpoint(tmp_path / "model")
    run = tmp_path / "run"
    args = [
        "--model.preset", str(ckpt),
        "--data.sources", json.dumps(sources),
        "--data.num_workers", "0",
        "--data.batch_size", "4",
        "--steps", "1",
        "--log_every", "1",
        "--tensorboard", "false",
        "--checkpoint.dir", str(run),
    ]  # fmt: skip
    with deadline(300):
        assert train_main(args) == 0
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1]["step"] == 1 and logged[-1]["loss"] == logged[-1]["loss"]  # finite, not NaN

    # Text from data never becomes a special token (house rule 12): the literal "<image>"
    # is not a second image marker, nor "<|im_end|>" an end of turn.
    ids = special.tolist()
    im_end = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert ids.count(processor.image_token_id) == 1 and ids.count(im_end) == 2
