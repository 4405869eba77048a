"""Shards, builders and the streaming loader: round trips, corrupt data, splitting."""

import io
import json
import random
import struct
import zlib
from collections import Counter

import pytest
import torch
from conftest import shape_image
from PIL import Image

from vlm.model import IGNORE_INDEX
from vlm_train.data import builders
from vlm_train.data.cli import main as data_main
from vlm_train.data.decode import SkipSample, decode_image
from vlm_train.data.loader import LoaderConfig, ShardStream, SourceConfig, is_report_only, make_loader
from vlm_train.data.shards import (
    ShardWriter,
    caption_sample,
    image_bytes,
    interleaved_sample,
    iter_tar,
    qa_sample,
    sketch_sample,
)


def _png(color="red", mode="RGB", size=24):
    image = shape_image(color, size=size)
    if mode != "RGB":
        image = image.convert(mode)
    return image_bytes(image)


def _write(folder, prefix, samples, per_shard=4):
    with ShardWriter(folder, prefix, max_samples=per_shard) as writer:
        for s in samples:
            writer.write(s)
    return writer.written


def _collect(cfg, processor, rank=0, world=1, workers=0):
    cfg.num_workers = workers
    keys, skipped, batches = [], Counter(), []
    for batch in make_loader(cfg, processor, rank, world):
        skipped.update(batch["skipped"])
        if not is_report_only(batch):
            keys.extend(batch["keys"])
            batches.append(batch)
    return keys, skipped, batches


def test_caption_shards_read_back_into_masked_batches(make_model, tmp_path):
    _, processor = make_model("gpt2")
    captions = [f"a {c} circle" for c in ("red", "blue", "green", "yellow", "purple")]
    samples = [caption_sample(f"k{i}", _png(c.split()[1]), c) for i, c in enumerate(captions)]
    paths = _write(tmp_path, "caps", samples, per_shard=2)
    assert [p.name for p in paths] == ["caps-000000.tar", "caps-000001.tar", "caps-000002.tar"]
    assert not list(tmp_path.glob(".*"))  # no temporary files left behind
    cfg = LoaderConfig([SourceConfig(str(tmp_path), "caption")], batch_size=5, shuffle_buffer=0)
    keys, skipped, batches = _collect(cfg, processor)
    assert sorted(keys) == [f"k{i}" for i in range(5)] and not skipped
    batch = batches[0]
    assert batch["pixel_values"].shape == (5, 1, 3, 32, 32)
    for i, key in enumerate(batch["keys"]):
        trained = batch["input_ids"][i][batch["labels"][i] != IGNORE_INDEX]
        assert processor.tokenizer.decode(trained) == captions[int(key[1:])] + "<|endofchunk|>"


def test_qa_and_interleaved_samples(make_model, tmp_path):
    _, processor = make_model("llama")  # chat template: only the answer trains
    _write(tmp_path / "qa", "qa", [qa_sample("q0", _png(), [("what colour?", "red")])])
    _write(
        tmp_path / "doc",
        "doc",
        [interleaved_sample("d0", [_png("red"), "a red one.", _png("blue"), "a blue one."])],
    )
    qa = _collect(LoaderConfig([SourceConfig(str(tmp_path / "qa"), "qa")], batch_size=1), processor)[2][0]
    assert processor.tokenizer.decode(qa["input_ids"][0][qa["labels"][0] != IGNORE_INDEX]) == "red<|im_end|>\n"
    doc = _collect(LoaderConfig([SourceConfig(str(tmp_path / "doc"), "interleaved")], batch_size=1), processor)[2][0]
    assert doc["pixel_values"].shape[:2] == (1, 2)
    assert processor.tokenizer.decode(doc["input_ids"][0]) == (
        "<image>a red one.<|endofchunk|><image>a blue one.<|endofchunk|>"
    )


def test_text_weight_weighs_a_pages_text_apart_from_its_markup_and_the_loss_follows(make_model, tmp_path):
    model, processor = make_model("llama")
    html = '<header><h1>Blue Sky</h1></header><main><img alt="map"><p>Lorem ipsum.</p></main>'
    _write(tmp_path, "sk", [sketch_sample("s0", _png(), html)])

    def batch_of(weight):
        cfg = LoaderConfig([SourceConfig(str(tmp_path), "sketch", text_weight=weight)], batch_size=1)
        return _collect(cfg, processor)[2][0]

    plain, weighted = batch_of(1.0), batch_of(0.25)
    assert "label_weights" not in plain
    weights, labels = weighted["label_weights"][0], weighted["labels"][0]
    assert torch.equal(weighted["labels"], plain["labels"]) and weights.shape == labels.shape
    trained = labels != IGNORE_INDEX
    text = "".join(processor.tokenizer.decode([t]) for t in labels[trained & (weights == 0.25)])
    assert text.startswith("Blue Sky") and "Lorem ipsum." in text  # the labels and the placeholder
    assert "<" not in text and ">" not in text and "map" not in text  # an attribute is markup
    assert weights[~trained].eq(1).all() and weights[trained].eq(1).any()

    ids, mask, all_labels, all_weights = (
        weighted[k] for k in ("input_ids", "attention_mask", "labels", "label_weights")
    )
    out = model(weighted["pixel_values"], ids, mask, all_labels, return_logits=True)
    nll = torch.nn.functional.cross_entropy(out.logits[0, :-1], labels[1:], ignore_index=IGNORE_INDEX, reduction="none")
    w = weights[1:] * trained[1:]
    expected = (nll * w).sum() / w.sum()
    for return_logits in (True, False):
        got = model(
            weighted["pixel_values"], ids, mask, all_labels, return_logits=return_logits, label_weights=all_weights
        )
        torch.testing.assert_close(got.loss, expected)
    torch.testing.assert_close(out.loss, nll[trained[1:]].mean())
    ones = torch.ones_like(all_weights)
    torch.testing.assert_close(
        model(weighted["pixel_values"], ids, mask, all_labels, label_weights=ones).loss, out.loss
    )
    with pytest.raises(ValueError, match="text_weight"):
        SourceConfig(str(tmp_path), "sketch", text_weight=0).validate()


def _bomb_png(width=100_000, height=100_000):
    """A tiny file whose header claims a huge image."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + header
    ihdr = struct.pack(">I", len(header)) + chunk + struct.pack(">I", zlib.crc32(chunk))
    data = zlib.compress(b"\x00" * 16)
    idat = struct.pack(">I", len(data)) + b"IDAT" + data + struct.pack(">I", zlib.crc32(b"IDAT" + data))
    end = struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND"))
    return b"\x89PNG\r\n\x1a\n" + ihdr + idat + end


def _jpeg(truncate=False):
    buf = io.BytesIO()
    shape_image("red", size=64).save(buf, format="JPEG")
    data = buf.getvalue()
    return data[: len(data) // 2] if truncate else data


def test_fuzz_corrupt_samples_are_counted_and_good_ones_all_arrive(make_model, tmp_path):
    _, processor = make_model("gpt2")
    cmyk = io.BytesIO()
    shape_image("blue").convert("CMYK").save(cmyk, format="JPEG")
    i16 = io.BytesIO()
    Image.fromarray((torch.arange(24 * 24).reshape(24, 24) * 100).numpy().astype("uint16")).save(i16, format="PNG")
    good = [
        caption_sample("good0", _png(), "plain rgb"),
        caption_sample("good1", _png(mode="P"), "palette"),
        caption_sample("good2", _png(mode="LA"), "grey with alpha"),
        caption_sample("good3", _png(mode="RGBA"), "rgba"),
        {"__key__": "good4", "jpg": cmyk.getvalue(), "txt": b"cmyk jpeg"},
        {"__key__": "good5", "png": i16.getvalue(), "txt": b"sixteen bit"},
        {"__key__": "good6", "jpg": _jpeg(), "txt": b"a jpeg"},
    ]
    bad = [
        ({"__key__": "bad0", "jpg": _jpeg(truncate=True), "txt": b"truncated"}, "corrupt image"),
        ({"__key__": "bad1", "png": b"", "txt": b"zero bytes"}, "empty image"),
        ({"__key__": "bad2", "png": b"this is text, not a png", "txt": b"wrong extension"}, "corrupt image"),
        ({"__key__": "bad3", "png": _bomb_png(), "txt": b"bomb"}, "image too large"),
        ({"__key__": "bad4", "png": _png(), "txt": b"   "}, "empty text"),
        ({"__key__": "bad5", "txt": b"no image at all"}, "missing image"),
        ({"__key__": "bad6", "png": _png()}, "missing text"),
    ]
    mixed = []
    for i, g in enumerate(good):
        mixed.append(g)
        if i < len(bad):
            mixed.append(bad[i][0])
    _write(tmp_path / "caps", "caps", mixed, per_shard=5)
    broken_json = {"__key__": "bad7", "png": _png(), "json": b"{not json"}
    _write(tmp_path / "qa", "qa", [qa_sample("goodqa", _png(), [("q?", "a")]), broken_json])
    sources = [SourceConfig(str(tmp_path / "caps"), "caption"), SourceConfig(str(tmp_path / "qa"), "qa")]
    cfg = LoaderConfig(sources, batch_size=2, drop_last=False)
    keys, skipped, batches = _collect(cfg, processor, workers=2)
    assert sorted(keys) == sorted([g["__key__"] for g in good] + ["goodqa"])
    assert skipped == Counter([reason for _, reason in bad] + ["bad json"])
    assert all(torch.isfinite(b["pixel_values"]).all() for b in batches)


def test_two_ranks_two_workers_see_every_sample_exactly_once(make_model, tmp_path):
    _, processor = make_model("gpt2")
    samples = [caption_sample(f"s{i:03d}", _png(), f"caption {i}") for i in range(40)]
    _write(tmp_path, "caps", samples, per_shard=5)  # 8 shards
    seen = []
    for rank in range(2):
        cfg = LoaderConfig([SourceConfig(str(tmp_path), "caption")], batch_size=3, drop_last=False, shuffle_buffer=8)
        keys, _, _ = _collect(cfg, processor, rank=rank, world=2, workers=2)
        seen.extend(keys)
    assert sorted(seen) == [s["__key__"] for s in samples]


def test_resampled_mixture_follows_weights_and_epoch_length(make_model, tmp_path):
    _, processor = make_model("gpt2")
    _write(tmp_path / "a", "a", [caption_sample(f"a{i}", _png(), "from a") for i in range(8)])
    _write(tmp_path / "b", "b", [caption_sample(f"b{i}", _png(), "from b") for i in range(8)])
    sources = [SourceConfig(str(tmp_path / "a"), "caption", 3.0), SourceConfig(str(tmp_path / "b"), "caption", 1.0)]
    cfg = LoaderConfig(sources, batch_size=10, resampled=True, epoch_batches=40, shuffle_buffer=4, mix="sample")
    keys, _, batches = _collect(cfg, processor, workers=2)
    assert len(batches) == 40
    share_a = sum(k.startswith("a") for k in keys) / len(keys)
    assert 0.68 < share_a < 0.82, share_a
    # Per-batch mixing: every batch from one source, sources still drawn by weight.
    cfg = LoaderConfig(sources, batch_size=4, resampled=True, epoch_batches=200, shuffle_buffer=4, mix="batch")
    _, _, batches = _collect(cfg, processor, workers=0)
    assert all(len({k[0] for k in b["keys"]}) == 1 for b in batches)
    share_a = sum(b["keys"][0].startswith("a") for b in batches) / len(batches)
    assert 0.65 < share_a < 0.85, share_a
    # Each batch names its source (the trainer's time budget weighs sources by it); a
    # batch that mixes sources says -1.
    assert all(b["source"] == "ab".index(b["keys"][0][0]) for b in batches)
    cfg = LoaderConfig(sources, batch_size=10, resampled=True, epoch_batches=20, shuffle_buffer=4, mix="sample")
    _, _, batches = _collect(cfg, processor, workers=0)
    assert all(
        b["source"] == (-1 if len({k[0] for k in b["keys"]}) > 1 else "ab".index(b["keys"][0][0])) for b in batches
    )
    assert any(b["source"] == -1 for b in batches)


def test_shuffling_changes_order_but_not_content(make_model, tmp_path):
    _, processor = make_model("gpt2")
    _write(tmp_path, "caps", [caption_sample(f"s{i:02d}", _png(), "c") for i in range(30)], per_shard=10)
    plain = LoaderConfig([SourceConfig(str(tmp_path), "caption")], batch_size=1, shuffle_buffer=0, drop_last=False)
    mixed = LoaderConfig([SourceConfig(str(tmp_path), "caption")], batch_size=1, shuffle_buffer=16, drop_last=False)
    a, b = _collect(plain, processor)[0], _collect(mixed, processor)[0]
    assert sorted(a) == sorted(b) and a != b


def test_select_keeps_only_matching_samples_without_counting_the_rest(make_model, tmp_path):
    _, processor = make_model("gpt2")
    captions = ["a red circle", "a blue square", "a Teal star", "a grey cat", "reddish"]
    _write(tmp_path, "caps", [caption_sample(f"k{i}", _png(), c) for i, c in enumerate(captions)], per_shard=2)
    select = SourceConfig(str(tmp_path), "caption", select=r"\b(red|teal)\b")
    keys, skipped, _ = _collect(LoaderConfig([select], batch_size=1, shuffle_buffer=0, drop_last=False), processor)
    assert keys == ["k0", "k2"] and not skipped  # case-insensitive, whole words only here
    with pytest.raises(ValueError, match="select is not a regular expression"):
        SourceConfig(str(tmp_path), "caption", select="(red").validate()


def test_folder_builder_reports_bad_inputs_and_writes_the_rest(tmp_path, capsys):
    src = tmp_path / "photos"
    (src / "sub").mkdir(parents=True)
    for c in ["red", "blue", "green"]:
        shape_image(c).save(src / "sub" / f"{c}.png")
        (src / "sub" / f"{c}.txt").write_text(f"a {c} circle")
    (src / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    (src / "broken.txt").write_text("never used")
    shape_image("cyan").save(src / "nocaption.png")
    assert data_main(["folder", str(src), "--out", str(tmp_path / "out"), "--shard-size", "2"]) == 0
    out = capsys.readouterr()
    assert "broken.jpg: corrupt image" in out.err and "no caption file nocaption.txt" in out.err
    assert "skipped 2 unusable inputs" in out.out
    read = [s for p in sorted((tmp_path / "out").glob("*.tar")) for s in iter_tar(p)]
    assert sorted(s["txt"].decode() for s in read) == ["a blue circle", "a green circle", "a red circle"]
    assert all(json.loads(s["json"])["source"].startswith("sub/") for s in read)


def test_table_builder_csv_and_jsonl(tmp_path):
    shape_image("red").save(tmp_path / "r.png")
    (tmp_path / "t.csv").write_text("image,caption\nr.png,a red circle\nmissing.png,nope\nr.png,\n")
    rows = list(builders.from_table(tmp_path / "t.csv"))
    assert rows[0][1] is None and rows[0][0]["txt"] == b"a red circle"
    assert "image" in rows[1][1] and "not found" in rows[1][1]
    assert "needs a caption" in rows[2][1]
    (tmp_path / "t.jsonl").write_text('{"image": "r.png", "question": "colour?", "answer": "red"}\n{broken\n')
    rows = list(builders.from_table(tmp_path / "t.jsonl"))
    assert json.loads(rows[0][0]["json"])["turns"] == [["colour?", "red"]]
    assert "bad JSON" in rows[1][1]


def test_easy_vqa_builder_keeps_its_split():
    import easy_vqa

    questions, answers, _ = easy_vqa.get_test_questions()
    rows = list(builders.easy_vqa("test"))
    assert len(rows) == len(questions) == 9673
    assert json.loads(rows[5][0]["json"])["turns"] == [[questions[5], answers[5]]]
    with pytest.raises(ValueError, match="splits train and test"):
        next(builders.easy_vqa("val"))


def test_emoji_builder_splits_by_emoji():
    names = {
        split: {json.loads(s["json"])["short_name"] for s, _ in builders.emoji(split)} for split in ("train", "test")
    }
    assert len(names["train"]) > 1000 and len(names["test"]) > 100
    assert not names["train"] & names["test"]
    sample, _ = next(builders.emoji("train"))
    assert sample["txt"].decode().startswith("a ") and sample["txt"].decode().endswith(" emoji")
    qa, _ = next(builders.emoji("train", kind="qa"))
    assert json.loads(qa["json"])["turns"][0][1] == json.loads(qa["json"])["category"].lower()


def test_decode_image_limits():
    with pytest.raises(SkipSample, match="too large"):
        decode_image(_png(size=64), max_pixels=100)
    assert decode_image(_png(mode="P")).mode == "RGB"


def test_bad_keys_and_configs_are_rejected(tmp_path, make_model):
    with pytest.raises(ValueError, match="contain no '.'"):
        with ShardWriter(tmp_path, "x") as w:
            w.write(caption_sample("a.b", _png(), "c"))
    assert not list(tmp_path.glob("*.tar")) and not list(tmp_path.glob(".*"))
    _, processor = make_model("gpt2")
    with pytest.raises(FileNotFoundError, match="no .tar shards"):
        ShardStream(LoaderConfig([SourceConfig(str(tmp_path), "caption")]), processor)
    with pytest.raises(ValueError, match="kind must be one of"):
        LoaderConfig([SourceConfig(str(tmp_path), "captions")]).validate()
    with pytest.raises(ValueError, match="resampled mode needs epoch_batches"):
        LoaderConfig([SourceConfig(str(tmp_path), "caption")], resampled=True).validate()


def test_group_by_length_cuts_padding_and_keeps_every_sample_and_each_batchs_source(make_model, tmp_path):
    _, processor = make_model("gpt2")
    rng = random.Random(0)
    words = [" ".join(["word"] * rng.randint(1, 30)) for _ in range(48)]
    _write(tmp_path / "a", "a", [caption_sample(f"a{i:02d}", _png(), w) for i, w in enumerate(words[:24])])
    _write(tmp_path / "b", "b", [caption_sample(f"b{i:02d}", _png(), w) for i, w in enumerate(words[24:])])
    sources = [SourceConfig(str(tmp_path / "a"), "caption"), SourceConfig(str(tmp_path / "b"), "caption")]

    def run(group: int):
        cfg = LoaderConfig(sources, batch_size=4, shuffle_buffer=8, group_by_length=group)
        keys, _, batches = _collect(cfg, processor)
        padded = sum(b["input_ids"].numel() for b in batches)
        return keys, batches, padded

    keys, batches, padded = run(0)
    grouped_keys, grouped, grouped_padded = run(6)  # a group holds all 24 samples of a source
    assert sorted(grouped_keys) == sorted(keys) and len(grouped) == len(batches) == 12
    # The least padding there is: each source's samples sorted by length, four to a batch.
    lengths = {k: int(n) for b in batches for k, n in zip(b["keys"], b["attention_mask"].sum(1))}
    least = 0
    for source in "ab":
        ordered = sorted(n for k, n in lengths.items() if k[0] == source)
        least += sum(4 * max(ordered[i : i + 4]) for i in range(0, 24, 4))
    assert grouped_padded == least < 0.85 * padded, (grouped_padded, least, padded)
    assert all(len({k[0] for k in b["keys"]}) == 1 for b in grouped)  # still one source a batch
    assert all(b["source"] == "ab".index(b["keys"][0][0]) for b in grouped)
    assert run(6)[0] == grouped_keys  # deterministic, so a resumed run skips to the same place
    with pytest.raises(ValueError, match="group_by_length"):
        ShardStream(LoaderConfig(sources, group_by_length=-1), processor)


@pytest.mark.parametrize("workers, group", [(0, 0), (1, 3), (2, 0), (2, 3)])
def test_a_resumed_epoch_skips_batches_without_building_them_and_then_goes_on_identically(
    make_model, tmp_path, workers, group
):
    _, processor = make_model("gpt2")
    rng = random.Random(1)
    samples = [caption_sample(f"s{i:02d}", _png(), " ".join(["word"] * rng.randint(1, 20))) for i in range(44)]
    samples[7] = {"__key__": "bad", "png": b"not a png", "txt": b"corrupt"}  # skip decisions replay too
    _write(tmp_path, "caps", samples, per_shard=6)
    cfg = LoaderConfig(
        [SourceConfig(str(tmp_path), "caption")],
        batch_size=3,
        shuffle_buffer=8,
        group_by_length=group,
        num_workers=workers,
    )

    def epoch(skip: int) -> list[dict]:
        loader = make_loader(cfg, processor)
        loader.dataset.set_epoch(0, skip_batches=skip)
        return [b for b in loader if not is_report_only(b)]

    full = epoch(0)
    assert len(full) == 14 and not any(b.get("skip_only") for b in full)
    skip = 8  # with groups of 3 batches, the samples of the 9th were read while skipping: encoded again
    resumed = epoch(skip)
    assert [b["keys"] for b in resumed] == [b["keys"] for b in full]  # the same batches in the same order
    placeholders = [i for i, b in enumerate(resumed) if b.get("skip_only")]
    # Every placeholder stands for a batch the resumed run skips; each worker sends skip // workers.
    assert placeholders and placeholders[-1] < skip and len(placeholders) == skip // max(workers, 1) * max(workers, 1)
    assert all("pixel_values" not in resumed[i] for i in placeholders)
    for before, after in zip(full[skip:], resumed[skip:]):
        assert set(before) == set(after)
        for key, value in before.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, after[key]), key
            else:
                assert value == after[key], key
    assert sum(sum(b["skipped"].values()) for b in resumed) == sum(sum(b["skipped"].values()) for b in full) == 1
