"""vlm-caption: inputs of every kind, bad files as error rows, resuming after a kill, CSV output."""

import csv
import fcntl
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from conftest import make_checkpoint
from PIL import Image

from vlm.apps.caption import main

REPO = Path(__file__).resolve().parents[1]
NOT_AN_IMAGE = "not a readable image"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    # Open gates make the captions depend on the image; at their initial zero every image reads the same.
    return make_checkpoint(tmp_path_factory.mktemp("caption_model"), gates=1.0)


def noise(seed: int, size: int = 24) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def save(path: Path, seed: int, fmt: str | None = None) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    noise(seed).save(path, fmt)
    return str(path)


def png_bytes(seed: int) -> bytes:
    buffer = io.BytesIO()
    noise(seed).save(buffer, "PNG")
    return buffer.getvalue()


def caption(ckpt: Path, *args: str) -> int:
    return main([*args, "--model", str(ckpt), "--max_new_tokens", "4"])


def read_jsonl(path: Path) -> dict[str, dict]:
    text = path.read_text()
    assert text.endswith("\n")
    rows = [json.loads(line) for line in text.splitlines()]
    paths = [row["path"] for row in rows]
    assert len(paths) == len(set(paths)), "duplicate rows"
    return {row["path"]: row for row in rows}


@pytest.fixture
def folder(tmp_path: Path) -> tuple[Path, list[str], list[str]]:
    """A folder with a subfolder: good images of several formats, plus a corrupt and a truncated JPEG."""
    root = tmp_path / "photos"
    good = [
        save(root / "a.png", 1),
        save(root / "b.jpg", 2, "JPEG"),
        save(root / "sub" / "c.PNG", 3),
        save(root / "sub" / "deeper" / "d.webp", 4, "WEBP"),
    ]
    (root / "bad.jpg").write_bytes(b"not an image")
    buffer = io.BytesIO()
    noise(5, 64).save(buffer, "JPEG")
    (root / "sub" / "cut.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    (root / "notes.md").write_text("not an image extension: not an input")
    return root, good, [str(root / "bad.jpg"), str(root / "sub" / "cut.jpg")]


def test_folder_good_and_bad_files(ckpt, folder, tmp_path, capsys):
    root, good, bad = folder
    out = tmp_path / "captions.jsonl"
    assert caption(ckpt, str(root), "--out", str(out), "--batch_size", "3") == 0
    assert f"done 4, skipped 0 (already in {out}), failed 2" in capsys.readouterr().out
    rows = read_jsonl(out)
    assert sorted(rows) == sorted(good + bad)
    for path in good:
        assert rows[path]["error"] is None
        assert isinstance(rows[path]["caption"], str) and rows[path]["caption"].strip()
        assert rows[path]["caption"] == rows[path]["caption"].strip()
    for path in bad:
        assert rows[path]["caption"] is None
        assert NOT_AN_IMAGE in rows[path]["error"]

    # A rerun finds everything done, errors included, and leaves the file as it was.
    before = out.read_bytes()
    assert caption(ckpt, str(root), "--out", str(out)) == 0
    assert f"done 0, skipped 6 (already in {out}), failed 0" in capsys.readouterr().out
    assert out.read_bytes() == before


def test_too_large_image_is_an_error_row(ckpt, tmp_path):
    big, small = str(tmp_path / "big.png"), save(tmp_path / "small" / "s.png", 2)
    Image.new("RGB", (100, 100)).save(big)
    out = tmp_path / "out.jsonl"
    assert caption(ckpt, big, str(tmp_path / "small"), "--out", str(out), "--max_pixels", "5000") == 0
    rows = read_jsonl(out)
    assert "too large" in rows[big]["error"] and rows[big]["caption"] is None
    assert rows[small]["error"] is None and rows[small]["caption"]


def test_batching_does_not_change_captions(ckpt, tmp_path):
    paths = [save(tmp_path / "imgs" / f"{i}.png", 10 + i) for i in range(4)]
    together, alone = tmp_path / "together.jsonl", tmp_path / "alone.jsonl"
    assert caption(ckpt, str(tmp_path / "imgs"), "--out", str(together), "--batch_size", "4") == 0
    assert caption(ckpt, str(tmp_path / "imgs"), "--out", str(alone), "--batch_size", "1") == 0
    batched, single = read_jsonl(together), read_jsonl(alone)
    assert {p: batched[p]["caption"] for p in paths} == {p: single[p]["caption"] for p in paths}
    assert len({batched[p]["caption"] for p in paths}) > 1, "captions should depend on the image"


def test_killed_midway_then_rerun(ckpt, tmp_path, capsys):
    root = tmp_path / "imgs"
    paths = [save(root / f"im{i:02d}.png", 20 + i) for i in range(12)]
    # im06 starts as a named pipe: reading it blocks until the test is done with the first run, so the kill
    # lands mid-run however fast this machine captions (the rows before it are written in batches of 2).
    os.unlink(paths[6])
    os.mkfifo(paths[6])
    out = tmp_path / "captions.jsonl"
    command = [sys.executable, "-m", "vlm.apps.caption", str(root), "--out", str(out), "--batch_size", "2"]
    command += ["--model", str(ckpt), "--max_new_tokens", "4"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not (out.exists() and out.read_bytes().count(b"\n") >= 2):
            assert proc.poll() is None, f"exited early: {proc.communicate()[1].decode()[-2000:]}"
            assert time.monotonic() < deadline, "no rows written within 120 s"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL

    complete = read_jsonl(out)
    assert 2 <= len(complete) < 12 and set(complete) <= set(paths)
    for row in complete.values():
        assert row["error"] is None and row["caption"]
    # A write cut short by a crash: half a row, no newline, for an image that has no row yet.
    with open(out, "a") as f:
        f.write(json.dumps({"path": paths[11], "caption": "half a capt"})[:30])
    os.unlink(paths[6])
    save(Path(paths[6]), 26)

    capsys.readouterr()
    assert caption(ckpt, str(root), "--out", str(out), "--batch_size", "2") == 0
    assert f"skipped {len(complete)} (already in {out})" in capsys.readouterr().out
    rows = read_jsonl(out)
    assert sorted(rows) == paths
    assert all(row["error"] is None and row["caption"] for row in rows.values())
    # The rows written before the kill are the ones an uninterrupted run writes.
    reference = tmp_path / "reference.jsonl"
    assert caption(ckpt, str(root), "--out", str(reference), "--batch_size", "2") == 0
    assert {p: r["caption"] for p, r in rows.items()} == {p: r["caption"] for p, r in read_jsonl(reference).items()}


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames == ["path", "caption", "error"]
    return rows


def test_csv_output_and_resume(ckpt, folder, tmp_path):
    root, good, bad = folder
    jsonl, out = tmp_path / "c.jsonl", tmp_path / "c.csv"
    assert caption(ckpt, str(root), "--out", str(jsonl)) == 0
    assert caption(ckpt, str(root), "--out", str(out)) == 0  # CSV from the extension
    rows = {row["path"]: row for row in read_csv(out)}
    assert sorted(rows) == sorted(good + bad)
    expected = read_jsonl(jsonl)
    for path in good:
        assert rows[path]["caption"] == expected[path]["caption"] and rows[path]["error"] == ""
    for path in bad:
        assert rows[path]["caption"] == "" and NOT_AN_IMAGE in rows[path]["error"]

    # --format wins over the extension; a cut final record (open quote, no newline) is rewritten.
    other = tmp_path / "c.out"
    assert caption(ckpt, good[0], good[1], "--out", str(other), "--format", "csv") == 0
    with open(other, "a", encoding="utf-8") as f:
        f.write(f'{good[2]},"a caption, cut')
    assert caption(ckpt, str(root), "--out", str(other), "--format", "csv") == 0
    resumed = read_csv(other)
    assert sorted(row["path"] for row in resumed) == sorted(good + bad)
    assert {row["path"]: row["caption"] for row in resumed} == {p: row["caption"] for p, row in rows.items()}


def test_list_glob_and_shards(ckpt, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    # b.png is listed relative to the working folder, and its id stays as the list writes it.
    a, _ = save(tmp_path / "imgs" / "a.png", 1), save(tmp_path / "imgs" / "b.png", 2)
    c = save(tmp_path / "imgs" / "c.jpg", 3, "JPEG")
    save(tmp_path / "other" / "d.jpg", 4, "JPEG")
    (tmp_path / "pick.txt").write_text(f"{a}\n\nimgs/b.png\n{tmp_path / 'gone.png'}\n")
    for i in range(2):
        with wds.TarWriter(str(tmp_path / f"shard-{i:06d}.tar")) as writer:
            writer.write({"__key__": f"s{i}a", "png": png_bytes(30 + i), "txt": "a caption"})
            writer.write({"__key__": f"s{i}b", "jpg": b"corrupt", "txt": "a caption"})
            writer.write({"__key__": f"s{i}c", "txt": "no image here"})
    shards = str(tmp_path / "shard-{000000..000001}.tar")
    out = tmp_path / "out.jsonl"
    assert caption(ckpt, "pick.txt", str(tmp_path / "imgs" / "*.jpg"), shards, "--out", str(out)) == 0
    rows = read_jsonl(out)
    keys = [f"{tmp_path / f'shard-{i:06d}.tar'}#s{i}{k}" for i in range(2) for k in "abc"]
    assert sorted(rows) == sorted([a, "imgs/b.png", str(tmp_path / "gone.png"), c, *keys])
    for path in (a, "imgs/b.png", c, keys[0], keys[3]):
        assert rows[path]["caption"] and rows[path]["error"] is None
    assert rows[str(tmp_path / "gone.png")]["error"] == "file not found"
    assert NOT_AN_IMAGE in rows[keys[1]]["error"]
    assert rows[keys[2]]["error"] == "no image in sample (members: txt)"
    # --list is the same as naming a .txt file; what is done is skipped.
    capsys.readouterr()
    assert caption(ckpt, "--list", "pick.txt", "--out", str(out)) == 0
    assert f"done 0, skipped 3 (already in {out}), failed 0" in capsys.readouterr().out
    assert len(read_jsonl(out)) == len(rows)


def test_bad_arguments(ckpt, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.md").write_text("no images")
    cases = [
        ([str(tmp_path / "empty")], "no inputs found"),
        ([str(tmp_path / "nowhere")], "no such file, folder or shard"),
        ([str(tmp_path / "x-{000000..000001}.tar")], "2 shard(s) not found"),
        ([str(tmp_path / "empty"), "--format", "xml"], "invalid choice: 'xml'"),
        ([str(tmp_path / "empty"), "--batch_size", "0"], "must be at least 1"),
        ([str(tmp_path / "empty"), "--sample", "--num_beams", "2"], "beam search with sampling"),
    ]
    for args, message in cases:
        with pytest.raises(SystemExit) as exc:
            caption(ckpt, *args)
        assert exc.value.code == 2, args
        assert message in capsys.readouterr().err, args
    save(tmp_path / "imgs" / "a.png", 1)
    with pytest.raises(SystemExit) as exc:
        main([str(tmp_path / "imgs"), "--model", str(tmp_path / "no-model")])
    assert exc.value.code == 2 and "not a vlm checkpoint folder" in capsys.readouterr().err
    # An output with a broken row that is not the last one is not guessed at.
    out = tmp_path / "broken.jsonl"
    out.write_text(
        '{"path": "x", "caption": "c", "error": null}\n{"path": \n{"path": "y", "caption": "c", "error": null}\n'
    )
    with pytest.raises(SystemExit) as exc:
        caption(ckpt, str(tmp_path / "imgs"), "--out", str(out))
    assert exc.value.code == 2 and "record 2 is not a jsonl caption row" in capsys.readouterr().err
    # Two runs on one output would caption the same inputs twice: the second is refused.
    with open(tmp_path / "busy.jsonl", "ab") as busy:
        fcntl.flock(busy.fileno(), fcntl.LOCK_EX)
        with pytest.raises(SystemExit) as exc:
            caption(ckpt, str(tmp_path / "imgs"), "--out", busy.name)
    assert exc.value.code == 2 and "another vlm-caption run is writing it" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.startswith("usage: vlm-caption")


def _tar_member(name: str, data: bytes, declared: int | None = None) -> bytes:
    import tarfile

    info = tarfile.TarInfo(name)
    info.size = len(data) if declared is None else declared
    return info.tobuf(format=tarfile.GNU_FORMAT) + data + b"\0" * (-len(data) % 512)


def test_a_member_declaring_a_petabyte_is_one_error_row(ckpt, tmp_path):
    # A header may claim any size; the data is not there. Reading it used to die (MemoryError, 0 rows).
    shard = tmp_path / "shard-000000.tar"
    good = [_tar_member(f"s{i}.png", png_bytes(40 + i)) + _tar_member(f"s{i}.txt", b"a caption") for i in range(2)]
    shard.write_bytes(b"".join(good) + _tar_member("huge.png", b"", declared=2**50))
    out = tmp_path / "out.jsonl"
    assert caption(ckpt, str(shard), "--out", str(out)) == 0
    rows = read_jsonl(out)
    assert sorted(rows) == [f"{shard}#huge", f"{shard}#s0", f"{shard}#s1"]
    assert rows[f"{shard}#s0"]["caption"] and rows[f"{shard}#s1"]["caption"]
    assert rows[f"{shard}#huge"]["caption"] is None and "member too large" in rows[f"{shard}#huge"]["error"]


def test_a_write_error_on_the_output_stops_the_run(ckpt, tmp_path, monkeypatch, capsys):
    import resource

    image = save(tmp_path / "imgs" / "a.png", 1)

    def limit_memory():
        # /dev/full reads as endless zeros: a run that reads its output first must hit this limit
        # and fail, not take the machine's memory.
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        resource.setrlimit(resource.RLIMIT_AS, (5 * 2**30, hard))

    command = [sys.executable, "-m", "vlm.apps.caption", image, "--out", "/dev/full"]
    command += ["--model", str(ckpt), "--max_new_tokens", "4"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180, preexec_fn=limit_memory)
    assert done.returncode != 0
    assert "No space left on device" in done.stderr and "Traceback" not in done.stderr, done.stderr[-2000:]

    # A failure after some rows: the run stops at once, and the rows written stay valid for a resume.
    paths = [save(tmp_path / "many" / f"{i}.png", 50 + i) for i in range(6)]
    from vlm.apps import caption as app

    writes = []
    real_write_all = app.write_all

    def failing_write_all(file, records):
        writes.append(len(records))
        if len(writes) == 2:
            raise OSError(5, "Input/output error")
        real_write_all(file, records)

    monkeypatch.setattr(app, "write_all", failing_write_all)
    out = tmp_path / "out.jsonl"
    assert caption(ckpt, str(tmp_path / "many"), "--out", str(out), "--batch_size", "2") != 0
    assert "Input/output error" in capsys.readouterr().err and len(writes) == 2
    assert len(read_jsonl(out)) == 2
    monkeypatch.setattr(app, "write_all", real_write_all)
    assert caption(ckpt, str(tmp_path / "many"), "--out", str(out), "--batch_size", "2") == 0
    assert sorted(read_jsonl(out)) == sorted(paths)
