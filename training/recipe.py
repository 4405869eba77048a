"""Recipes: one preset file per bundled model, listing its training stages.

A recipe (``training/presets/default.json``) holds named data ``selections`` and a list of
``stages``; each stage gives only what differs from the stage before it, and sets its
length as an input (``time_budget_s``, or ``steps``), not as one machine's step count::

    {"selections": {"colour-questions": "color|red|teal"},
     "stages": [{"name": "first", "time_budget_s": 600, "data": {...}, ...},
                {"name": "second", "data": {"sources": [
                    {"shards": "data/shards/easy-vqa-train", "kind": "qa", "select": "@colour-questions"}]}}]}

``vlm train --preset default:second`` trains one stage; its checkpoint folder is
``runs/<recipe>-<stage>`` unless the stage sets one. ``"select": "@name"`` in any preset's
sources (or on the command line) names an entry of ``selections``; it is replaced by the
regular expression when the config is built. ``python -m vlm_train.recipe default`` prints
the stage names in order (``scripts/train_default.sh`` loops over them).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .config import PRESET_DIR, _merge

STAGE_KEYS = ("name", "note")
"""A stage's own keys, not config fields: its name and a free-text note (what it is for,
what the bundled run of it gave)."""


def is_recipe(data: dict) -> bool:
    return isinstance(data, dict) and "stages" in data


def stage_names(recipe: dict, where: str) -> list[str]:
    stages = recipe.get("stages")
    if not isinstance(stages, list) or not stages:
        raise ValueError(f"recipe {where}: 'stages' must be a non-empty list")
    names = []
    for i, stage in enumerate(stages):
        name = stage.get("name") if isinstance(stage, dict) else None
        if not isinstance(name, str) or not name:
            raise ValueError(f"recipe {where}: stage {i + 1} needs a 'name'")
        if name in names:
            raise ValueError(f"recipe {where}: two stages are named {name!r}")
        names.append(name)
    return names


def recipe_stage(recipe: dict, path: Path, stage: str | None) -> dict:
    """The preset dict of ``stage``: every stage up to it, merged in order (sections merge
    key by key, lists and values replace), with the recipe's ``selections``."""
    names = stage_names(recipe, str(path))
    unknown = set(recipe) - {"selections", "stages", "note"}
    if unknown:
        raise ValueError(f"recipe {path}: unknown keys {sorted(unknown)}; a recipe holds selections and stages")
    if stage is None or stage not in names:
        choices = ", ".join(f"{path.stem}:{n}" for n in names)
        what = "is a recipe: name one of its stages" if stage is None else f"has no stage {stage!r}"
        raise ValueError(f"training preset {path.stem} {what}; stages: {choices}")
    out: dict = {}
    for data in recipe["stages"][: names.index(stage) + 1]:
        if "extends" in data:
            raise ValueError(
                f"recipe {path}: stage {data['name']!r}: a stage extends the stage before it, not a preset"
            )
        own = {k: v for k, v in data.items() if k not in STAGE_KEYS}
        out = _merge(out, own)
        if "dir" not in own.get("checkpoint", {}):
            out = _merge(out, {"checkpoint": {"dir": f"runs/{path.stem}-{data['name']}"}})
    if "selections" in recipe:
        out["selections"] = recipe["selections"]
    return out


def apply_selections(data: dict) -> dict:
    """Pop ``selections`` from a config dict and replace each source's ``"select": "@name"``
    with the named regular expression."""
    selections = data.pop("selections", None) or {}
    if not isinstance(selections, dict) or not all(isinstance(v, str) for v in selections.values()):
        raise ValueError("'selections' must map names to regular expressions")
    loaders = [("data", data.get("data"))]
    if isinstance(data.get("eval"), dict):
        loaders.append(("eval.data", data["eval"].get("data")))
    for where, loader in loaders:
        if not isinstance(loader, dict) or not isinstance(loader.get("sources"), list):
            continue
        for i, source in enumerate(loader["sources"]):
            select = source.get("select") if isinstance(source, dict) else None
            if isinstance(select, str) and select.startswith("@"):
                if select[1:] not in selections:
                    known = ", ".join(f"@{n}" for n in sorted(selections)) or "none"
                    raise ValueError(f"{where}.sources[{i}].select: unknown selection {select!r}; selections: {known}")
                source["select"] = selections[select[1:]]
    return data


def known_presets(folder: Path) -> list[str]:
    """Every name ``--preset`` takes from ``folder``: plain presets, and ``recipe:stage``."""
    out = []
    for path in sorted(folder.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except ValueError:
            continue
        if is_recipe(data):
            out += [f"{path.stem}:{n}" for n in stage_names(data, str(path))]
        else:
            out.append(path.stem)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vlm_train.recipe", description="Print a recipe's stage names.")
    parser.add_argument("recipe", help="a recipe name (training/presets/<name>.json) or a JSON file")
    args = parser.parse_args(argv)
    path = Path(args.recipe) if Path(args.recipe).suffix else PRESET_DIR / f"{args.recipe}.json"
    try:
        data = json.loads(path.read_text())
        if not is_recipe(data):
            raise ValueError(f"{path} is a preset, not a recipe (it has no 'stages')")
        names = stage_names(data, str(path))
    except (OSError, ValueError) as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    print("\n".join(names))
    return 0


if __name__ == "__main__":
    sys.exit(main())
