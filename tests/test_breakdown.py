"""``vlm-eval --breakdown`` (training/eval/breakdown.py) on hand-made prediction rows."""

import json

import pytest

from vlm_train.data.sketch2html import page_at
from vlm_train.eval.cli import main as eval_main


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_easy_vqa_by_answer_type_and_colour_confusions(tmp_path, capsys):
    def row(q, ref, pred):
        return {
            "task": "easy-vqa",
            "shots": 0,
            "question": q,
            "reference": ref,
            "prediction": pred,
            "correct": ref == pred,
        }

    rows = [
        row("what shape is it?", "circle", "circle"),
        row("what color is the shape?", "red", "brown"),
        row("what color is the shape?", "blue", "blue"),
        row("what color is the circle?", "red", "brown"),
        row("is there a red shape?", "yes", "no"),
        row("is there a triangle?", "no", "no"),
    ]
    assert eval_main(["--breakdown", _write(tmp_path / "p.jsonl", rows)]) == 0
    out = capsys.readouterr().out
    assert "easy-vqa: 3/6 = 50.0 %" in out
    assert "shape                    1/1 = 100.0 %" in out
    assert "colour                   1/3 = 33.3 %" in out
    assert "yes/no, names a colour   0/1 = 0.0 %" in out
    assert "yes/no, about a shape    1/1 = 100.0 %" in out
    assert "red -> brown: 2" in out


def test_sketch_own_against_other(tmp_path, capsys):
    # Every page predicted exactly: own similarity is 1, other pairs less.
    refs = [page_at("test", i).html for i in range(3)]
    rows = [{"task": "sketch", "shots": 0, "reference": r, "prediction": r} for r in refs]
    assert eval_main(["--breakdown", _write(tmp_path / "s.jsonl", rows)]) == 0
    out = capsys.readouterr().out
    assert "own sketch 1.000" in out
    other = float(out.split("other pairs ")[1].split()[0])
    assert other < 1.0
    assert "to 6 other pairs" in out  # 3 pages: each against both others
    assert "main block kinds in order  3/3" in out


def test_sketch_other_pairs_are_the_next_pages_in_a_circle(monkeypatch):
    from vlm_train.eval import breakdown

    seen = []
    monkeypatch.setattr(breakdown, "tree_similarity", lambda p, r: seen.append((p, r)) or 0.5)
    monkeypatch.setattr(breakdown, "OTHER_PER_PAGE", 2)
    rows = [{"prediction": f"<p>{i}</p>", "reference": f"<h1>{i}</h1>"} for i in range(4)]
    assert "to 8 other pairs 0.500 (each page against the next 2" in breakdown.sketch(rows)
    others = [(p[3], r[4]) for p, r in seen[4:]]  # after the 4 own pairs
    assert others == [("0", "1"), ("0", "2"), ("1", "2"), ("1", "3"), ("2", "3"), ("2", "0"), ("3", "0"), ("3", "1")]


def test_sketch_parts_that_agree(tmp_path, capsys):
    ref = "<header><h1>A</h1></header><main><h2>B</h2><p>C</p></main><footer>D</footer>"
    rows = [
        # no footer, a nav that is not there, and the same main blocks
        {
            "reference": ref,
            "prediction": "<header><h1>A</h1></header><nav><a>x</a></nav><main><h2>B</h2><p>C</p></main>",
        },
        # header and footer right, main has as many blocks but of other kinds
        {
            "reference": ref,
            "prediction": "<header><h1>A</h1></header><main><p>B</p><h2>C</h2></main><footer>D</footer>",
        },
        # not well-formed: agrees on nothing
        {"reference": ref, "prediction": "<header><h1>A</h1><main>"},
    ]
    for r in rows:
        r.update(task="sketch", shots=0)
    assert eval_main(["--breakdown", _write(tmp_path / "s.jsonl", rows)]) == 0
    out = capsys.readouterr().out
    assert "header                     2/3 (the reference has one in 3)" in out
    assert "nav                        1/3 (the reference has one in 0)" in out
    assert "footer                     1/3 (the reference has one in 3)" in out
    assert "main block count           2/3" in out
    assert "main block kinds in order  1/3" in out


@pytest.mark.parametrize(
    ("text", "message"),
    [("{not json\n", "bad.jsonl:1: not JSON"), ('{"task": "emoji"}\n', "bad.jsonl: no easy-vqa or sketch rows")],
)
def test_unusable_file_is_a_clear_error(tmp_path, capsys, text, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(text)
    with pytest.raises(SystemExit) as info:
        eval_main(["--breakdown", str(path)])
    assert info.value.code == 2 and message in capsys.readouterr().err
