"""The README's Python examples run as written, and the documentation's links lead somewhere.

Each ```python block of README.md runs on its own in a fresh interpreter, with the
repository root as working directory (the examples open ``demo/examples/*.png`` by that
path) and no model hub. Blocks that load a model use the real bundled backbones, so they
are marked ``slow``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = [README, *sorted((ROOT / "docs").glob("*.md")), ROOT / "vlm" / "weights" / "default" / "README.md"]
MAX_README_LINES = 200

FENCE = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)
# [text](target) and ![alt](target); a target ends at whitespace or the closing parenthesis.
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
# Text a decoded answer must never show: a control token leaking out of generation.
SPECIAL = ("<image>", "<|endofchunk|>", "<|im_start|>", "<|im_end|>", "<|endoftext|>")


def python_blocks() -> list[str]:
    return FENCE.findall(README.read_text(encoding="utf-8"))


def _block_params() -> list:
    params = []
    for i, code in enumerate(python_blocks()):
        slow = "load_model" in code or "from_pretrained" in code or "create_model_and_transforms" in code
        params.append(pytest.param(code, id=f"block{i + 1}", marks=[pytest.mark.slow] if slow else []))
    return params


def relative_links(path: Path) -> list[str]:
    """Link targets in a markdown file that point into the repository (not URLs or anchors),
    outside fenced code blocks."""
    text = re.sub(r"^```.*?^```", "", path.read_text(encoding="utf-8"), flags=re.DOTALL | re.MULTILINE)
    targets = []
    for target in LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE) or target.startswith("#"):
            continue  # http:, https:, mailto: ... and links within the page
        targets.append(target.split("#", 1)[0])
    return targets


def test_readme_is_short():
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines <= MAX_README_LINES, f"README.md has {lines} lines; keep it at most {MAX_README_LINES}"


def test_readme_has_python_examples():
    blocks = python_blocks()
    assert blocks, "README.md has no ```python block"
    assert any("vlm.load_model" in b for b in blocks), "the quick start should load the bundled model"


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_exist(path):
    assert path.is_file(), f"{path.relative_to(ROOT)} is missing"
    missing = [t for t in relative_links(path) if not (path.parent / t).exists()]
    assert not missing, f"{path.relative_to(ROOT)} links to files that do not exist: {missing}"


def test_link_check_sees_links(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "[a](docs/a.md) [b](https://example.com) [c](#top) ![d](img.png) [e](x.md#part)\n"
        "```bash\n[not a link](nowhere.md)\n```\n",
        encoding="utf-8",
    )
    assert relative_links(page) == ["docs/a.md", "img.png", "x.md"]


@pytest.mark.parametrize("code", _block_params())
def test_readme_python_block_runs(code, tmp_path):
    script = tmp_path / "example.py"
    script.write_text(code, encoding="utf-8")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TQDM_DISABLE": "1"}
    result = subprocess.run(
        [sys.executable, str(script)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, f"the README example failed:\n{code}\n--- stderr ---\n{result.stderr[-4000:]}"
    if "print(" in code:
        out = result.stdout.strip()
        assert out, f"the README example printed nothing:\n{code}"
        for token in SPECIAL:
            assert token not in out, f"a control token leaked into the output: {out!r}"
        # Each print gives a line, so an empty answer shows as an empty line (or as '' in a list).
        lines = result.stdout.splitlines()
        assert all(line.strip() for line in lines), f"an empty answer: {result.stdout!r}"
        assert "''" not in out, f"an empty answer: {out!r}"
