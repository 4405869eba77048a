"""vlm-eval end to end on a tiny model and tiny shards."""

import json

import pytest
from conftest import make_checkpoint, shape_image

from vlm_train.data import builders
from vlm_train.data.cli import write
from vlm_train.data.shards import ShardWriter, caption_sample, image_bytes, qa_sample
from vlm_train.eval.cli import main as eval_main


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    make_checkpoint(root, gates=0.5)
    with ShardWriter(root / "qa", "qa") as w:
        for i, c in enumerate(["red", "blue", "green", "yellow", "purple"]):
            w.write(qa_sample(f"q{i}", image_bytes(shape_image(c)), [("what colour is the shape?", c)]))
    with ShardWriter(root / "caps", "caps") as w:
        for i, c in enumerate(["red", "blue", "green"]):
            w.write(caption_sample(f"c{i}", image_bytes(shape_image(c)), f"a {c} circle"))
    write(builders.sketches("test", 3), str(root / "sketch"), "sketch", 100, 1 << 26)
    return root


def test_qa_zero_and_few_shot_write_json_and_markdown(setup, tmp_path, capsys):
    out = tmp_path / "r.json"
    args = ["--model", str(setup / "ckpt"), "--task", "easy-vqa", "--shards", str(setup / "qa"), "--shots", "0", "2"]
    assert eval_main([*args, "--out", str(out), "--predictions", str(tmp_path / "p.jsonl")]) == 0
    results = json.loads(out.read_text())["results"]["easy-vqa"]
    assert set(results) == {"0-shot", "2-shot"}
    assert results["0-shot"]["count"] == 5 and 0.0 <= results["0-shot"]["accuracy"] <= 1.0
    rows = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert len(rows) == 10
    assert all(r["question"] == "what colour is the shape?" for r in rows)  # for vlm-eval --breakdown
    accuracy = sum(r["correct"] for r in rows if r["shots"] == 0) / 5
    assert accuracy == results["0-shot"]["accuracy"]  # the summary is the mean of the per-item results
    assert "| easy-vqa | 2-shot | accuracy |" in out.with_suffix(".md").read_text()
    capsys.readouterr()
    assert eval_main(["--breakdown", str(tmp_path / "p.jsonl")]) == 0  # every shot's rows, by answer type
    assert f"easy-vqa: {sum(r['correct'] for r in rows)}/10 = " in capsys.readouterr().out
    # Repeatable: the same command gives the same numbers.
    out2 = tmp_path / "r2.json"
    assert eval_main([*args, "--out", str(out2)]) == 0
    assert json.loads(out2.read_text())["results"]["easy-vqa"]["2-shot"]["accuracy"] == results["2-shot"]["accuracy"]


def test_caption_and_sketch_tasks(setup, tmp_path):
    out = tmp_path / "c.json"
    assert (
        eval_main(
            ["--model", str(setup / "ckpt"), "--task", "emoji", "--shards", str(setup / "caps"), "--out", str(out)]
        )
        == 0
    )
    metrics = json.loads(out.read_text())["results"]["emoji"]["0-shot"]
    assert {"BLEU-1", "BLEU-4", "ROUGE-L", "CIDEr-D", "exact_match"} <= set(metrics)
    out = tmp_path / "s.json"
    assert (
        eval_main(
            ["--model", str(setup / "ckpt"), "--task", "sketch", "--shards", str(setup / "sketch"), "--out", str(out)]
        )
        == 0
    )
    metrics = json.loads(out.read_text())["results"]["sketch"]["0-shot"]
    assert metrics["count"] == 3 and 0.0 <= metrics["valid"] <= 1.0 and "tree_similarity" in metrics


def test_missing_shards_is_a_clear_error(setup, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        eval_main(["--model", str(setup / "ckpt"), "--task", "shapes", "--shards", str(tmp_path / "none")])
    assert info.value.code == 2
    assert "Build the shards" in capsys.readouterr().err


def test_lm_weights_reach_the_model(setup, tmp_path, monkeypatch):
    """``--lm_weights`` is honoured (the default, float32, scores the model as stored)."""
    import vlm.factory

    seen = []
    real = vlm.factory.load_model

    def spy(*args, **kwargs):
        seen.append(kwargs.get("lm_weights"))
        return real(*args, **kwargs)

    monkeypatch.setattr(vlm.factory, "load_model", spy)
    base = ["--model", str(setup / "ckpt"), "--task", "easy-vqa", "--shards", str(setup / "qa"), "--limit", "2"]
    assert eval_main([*base, "--out", str(tmp_path / "a.json")]) == 0
    assert eval_main([*base, "--lm_weights", "float32-packed", "--out", str(tmp_path / "b.json")]) == 0
    assert seen == ["float32", "float32-packed"]
    a, b = (json.loads((tmp_path / f"{n}.json").read_text())["results"]["easy-vqa"]["0-shot"] for n in "ab")
    assert a["accuracy"] == b["accuracy"]  # the same arithmetic in float32, summed in another order
