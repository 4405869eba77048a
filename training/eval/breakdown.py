"""Where a model's answers go wrong, from ``vlm-eval --predictions`` rows
(``vlm-eval --breakdown PREDICTIONS.jsonl``).

- easy-VQA: an answer is a shape (circle, rectangle, triangle), yes/no, or a colour (read
  from the reference); yes/no questions are split by whether they name a colour. Each
  type's accuracy and, for colour answers, which colours were confused with which.
- sketch: the mean tree similarity of each page to its own sketch's reference, against
  the mean over other sketches' references (each page against the next
  ``OTHER_PER_PAGE`` pages' references, in a circle; all other pages where there are
  fewer): how far a page follows its sketch rather than being a generic page; and which
  parts of the page agree with the reference: whether it has a header, a nav and a
  footer, how many blocks its <main> holds, and their kinds in order (each block's own
  tag and class, not what is inside it).
"""

from __future__ import annotations

import json
import re
from collections import Counter

from .html_metrics import parse_tree, tree_similarity

SHAPES = {"circle", "rectangle", "triangle"}
COLOURS = re.compile(r"\b(red|green|blue|yellow|black|gray|grey|brown|teal)\b", re.IGNORECASE)
TASKS = ("easy-vqa", "sketch")
# A tree edit distance is ~0.1 s of pure Python: all n x (n - 1) pairs of 200 pages took
# minutes for a baseline that 10 others a page estimate as well.
OTHER_PER_PAGE = 10


def read_predictions(path: str) -> dict[str, list[dict]]:
    """The rows of a predictions file, by task. Raises ValueError naming a bad line."""
    rows: dict[str, list[dict]] = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not JSON: {e}") from None
            rows.setdefault(row.get("task"), []).append(row)
    if not any(task in rows for task in TASKS):
        raise ValueError(f"{path}: no easy-vqa or sketch rows")
    return rows


def breakdown(rows: dict[str, list[dict]]) -> str:
    """The report for every task that has one, as text."""
    parts = []
    if "easy-vqa" in rows:
        parts.append(easy_vqa(rows["easy-vqa"]))
    if "sketch" in rows:
        parts.append(sketch(rows["sketch"]))
    return "\n".join(parts)


def answer_type(reference: str) -> str:
    ref = reference.strip().lower()
    if ref in ("yes", "no"):
        return "yes/no"
    return "shape" if ref in SHAPES else "colour"


def easy_vqa(rows: list[dict]) -> str:
    total, right = Counter(), Counter()
    confusions = Counter()
    for r in rows:
        kind = answer_type(r["reference"])
        if kind == "yes/no" and "question" in r:
            kind += ", names a colour" if COLOURS.search(r["question"]) else ", about a shape"
        total[kind] += 1
        right[kind] += bool(r["correct"])
        if kind == "colour" and not r["correct"]:
            confusions[(r["reference"].strip().lower(), r["prediction"].strip().lower())] += 1
    lines = [f"easy-vqa: {sum(right.values())}/{len(rows)} = {100 * sum(right.values()) / len(rows):.1f} %"]
    for kind in sorted(total):
        lines.append(f"  {kind:24s} {right[kind]}/{total[kind]} = {100 * right[kind] / total[kind]:.1f} %")
    if confusions:
        lines.append("  colour misses (reference -> prediction):")
        lines += [f"    {ref} -> {pred}: {n}" for (ref, pred), n in confusions.most_common()]
    return "\n".join(lines)


def sketch(rows: list[dict]) -> str:
    n = len(rows)
    if n < 2:
        return "sketch: need at least two sketches to compare own against other"
    own = sum(tree_similarity(r["prediction"], r["reference"]) for r in rows) / n
    per_page = min(n - 1, OTHER_PER_PAGE)
    pairs = [(a, rows[(i + k) % n]) for i, a in enumerate(rows) for k in range(1, per_page + 1)]
    other = sum(tree_similarity(a["prediction"], b["reference"]) for a, b in pairs) / len(pairs)
    lines = [
        f"sketch: tree similarity to its own sketch {own:.3f}, to {len(pairs)} other pairs {other:.3f} "
        f"(each page against the next {per_page} pages' references)"
    ]
    agree, in_reference = Counter(), Counter()
    for r in rows:
        ref, pred = _page_parts(parse_tree(r["reference"])), _page_parts(parse_tree(r["prediction"]))
        for part in ("header", "nav", "footer"):
            in_reference[part] += part in ref["chrome"]
            agree[part] += pred is not None and (part in ref["chrome"]) == (part in pred["chrome"])
        agree["main block count"] += pred is not None and len(pred["main"]) == len(ref["main"])
        agree["main block kinds in order"] += pred is not None and pred["main"] == ref["main"]
    lines.append("  parts that agree with the reference (an invalid page agrees on nothing):")
    for part in ("header", "nav", "footer", "main block count", "main block kinds in order"):
        has = f" (the reference has one in {in_reference[part]})" if part in in_reference else ""
        lines.append(f"    {part:26s} {agree[part]}/{n}{has}")
    return "\n".join(lines)


def _page_parts(tree) -> dict | None:
    """A page's top-level chrome tags and the labels of its <main>'s blocks; None for no tree."""
    if tree is None:
        return None
    main = next((c for c in tree.children if c.tag == "main"), None)
    return {
        "chrome": {c.tag for c in tree.children if c.tag != "main"},
        "main": [c.label for c in main.children] if main else [],
    }
