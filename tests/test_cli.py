"""The one command, ``vlm <command>`` (vlm/cli.py): its commands, one flag style, help
without torch, and ``vlm train --help`` generated from the config dataclasses."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import typing

import pytest

from vlm.cli import COMMANDS, main, underscore_options

SUBCOMMANDS = ["chat", "caption", "sketch2html", "eval", "train", "data", "convert", "serve", "demo"]


def test_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert list(COMMANDS) == SUBCOMMANDS
    lines = out.splitlines()
    for name in SUBCOMMANDS:
        line = next((line for line in lines if line.startswith(f"  {name} ")), None)
        assert line is not None and len(line.split()) > 2, f"{name} has no line of its own in vlm --help"


def test_no_command_shows_the_help_and_fails(capsys):
    assert main([]) == 2
    assert "commands:" in capsys.readouterr().err


def test_an_unknown_command_is_a_clear_error(capsys):
    assert main(["trian", "--steps", "3"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'trian'" in err and "did you mean 'train'" in err and "sketch2html" in err


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_command_answers_help(command, capsys):
    assert main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: vlm") and len(out.splitlines()) > 3


def test_dashes_in_option_names_become_underscores():
    argv = ["--max-new-tokens", "8", "--a-b=x-y", "-h", "easy-vqa", "--optim.warmup-steps", "-1", "--", "--keep-me"]
    assert underscore_options(argv) == [
        "--max_new_tokens",
        "8",
        "--a_b=x-y",  # the name only, never the value
        "-h",
        "easy-vqa",  # a positional (a data source's name) stays
        "--optim.warmup_steps",
        "-1",
        "--",
        "--keep-me",  # after a bare --, nothing is an option
    ]


def _print_config(capsys, *args) -> dict:
    assert main(["train", *args]) == 0
    return json.loads(capsys.readouterr().out)


def test_train_takes_both_spellings(capsys):
    dashed = _print_config(capsys, "--print-config", "--preset", "default:colour", "--optim.warmup-steps", "3")
    underscored = _print_config(capsys, "--print_config", "--preset", "default:colour", "--optim.warmup_steps=3")
    assert dashed == underscored and dashed["optim"]["warmup_steps"] == 3
    budget = _print_config(capsys, "--print-config", "--time-budget-s", "60", "--checkpoint.resume", "null")
    assert budget["time_budget_s"] == 60 and budget["checkpoint"]["resume"] is None


def _config_classes():
    from vlm_train.config import TrainConfig

    def walk(cls, prefix):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            inner = [a for a in typing.get_args(hints[f.name]) if dataclasses.is_dataclass(a)]
            if dataclasses.is_dataclass(hints[f.name]):
                yield from walk(hints[f.name], f"{prefix}{f.name}.")
            else:
                yield cls, f"{prefix}{f.name}", inner

    return list(walk(TrainConfig, ""))


def test_train_help_lists_every_field_with_its_docstring(capsys):
    assert main(["train", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())  # help text wraps lines: compare with single spaces
    assert "--optim.lr LR Peak learning rate, reached after ``warmup_steps``. (type: float, default: 0.0001)" in out
    assert "--data.batch_size BATCH_SIZE Samples per batch on each rank" in out
    assert "--checkpoint.dir DIR The run's folder" in out
    assert "--time_budget_s TIME_BUDGET_S Fit the run into this many seconds" in out
    assert "--preset NAME|FILE" in out and "tiny" in out and "default:colour" in out
    for _, path, _ in _config_classes():
        assert f"--{path} " in out, f"vlm train --help does not list --{path}"
    for name in ("shards", "kind", "weight", "select", "max_tokens"):  # a data source's fields
        assert f" {name} " in out


def test_every_config_field_has_a_docstring():
    docstring_parser = pytest.importorskip("docstring_parser")
    from vlm_train.config import SourceConfig, TrainConfig

    classes = {TrainConfig, SourceConfig} | {cls for cls, _, _ in _config_classes()}
    for cls in classes:
        documented = {p.arg_name for p in docstring_parser.parse_from_object(cls).params if p.description}
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in documented]
        assert not missing, f"{cls.__name__}: fields without a docstring (a string right after the field): {missing}"


def test_a_missing_extra_names_what_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "jsonargparse", None)  # as if the train extra were not installed
    assert main(["train", "--help"]) == 1
    assert "pip install 'vlm[train]'" in capsys.readouterr().err


def test_help_does_not_import_torch():
    code = """
import sys
from vlm.cli import COMMANDS, main
for argv in [["--help"]] + [[c, "--help"] for c in COMMANDS]:
    assert main(argv) == 0, argv
heavy = sorted(m for m in ("torch", "transformers", "webdataset", "streamlit") if m in sys.modules)
assert not heavy, f"--help imported {heavy}"
import vlm
assert "torch" not in sys.modules, "import vlm imports torch"
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


def test_the_library_names_still_import_lazily():
    code = """
import sys
import vlm
assert set(vlm.__all__) <= set(dir(vlm))
from vlm import VLM, load_model
assert "torch" in sys.modules
for name in vlm.__all__:
    assert getattr(vlm, name) is not None, name
assert vlm.load_model is load_model and VLM.__name__ == "VLM"
try:
    vlm.no_such_name
except AttributeError:
    pass
else:
    raise AssertionError("vlm.no_such_name did not raise AttributeError")
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


def test_chat_answers_with_a_checkpoint(tmp_path, capsys):
    from conftest import make_checkpoint, shape_image

    folder = make_checkpoint(tmp_path, gates=0.5)
    image = tmp_path / "red.png"
    shape_image("red").save(image)
    argv = ["chat", str(image), "What colour?", "And the shape?", "--model", str(folder)]
    assert main([*argv, "--device", "cpu", "--dtype", "float32", "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert "Q: What colour?\nA: " in out and "Q: And the shape?\nA: " in out


def test_chat_reports_a_bad_image(tmp_path, capsys):
    bad = tmp_path / "x.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(SystemExit) as info:
        from vlm.chat_cli import main as chat_main

        chat_main([str(bad), "hi"])
    assert info.value.code == 2 and "cannot read it as an image" in capsys.readouterr().err
