"""What the demo's Model panel shows: a checkpoint's model card (``README.md`` in the
Hugging Face layout, as beside the bundled model) and the facts in its ``config.json``."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

SECTIONS = ("Training data", "Results", "Limitations")
"""The card's sections the panel shows: what it was trained on, how it measures, its limits."""

_LINK = re.compile(r"\[([^\]]+)\]\(([^)\s]+)\)")


@dataclass
class Card:
    title: str
    summary: str = ""
    """The text between the title and the first section."""
    sections: dict[str, str] = field(default_factory=dict)
    """Markdown of each of :data:`SECTIONS` the card has."""
    facts: list[tuple[str, str]] = field(default_factory=list)
    """(what, value) from ``config.json``: backbones, adapter size, cross-attention layers."""
    has_card: bool = False


def _local_links_as_text(markdown: str) -> str:
    """``[text](docs/x.md)`` → ``text``: a card's relative links point into a source
    checkout, not into the demo's pages. Web links stay."""
    return _LINK.sub(lambda m: m.group(0) if re.match(r"https?://", m.group(2)) else m.group(1), markdown)


def parse_card(text: str) -> tuple[str, str, dict[str, str]]:
    """(title, summary, sections by ``## `` heading) of a model card's markdown."""
    if text.startswith("---\n"):
        end = text.find("\n---", 4)
        text = text[end + 4 :] if end >= 0 else text  # the YAML front matter is for the Hub
    title, summary, sections = "", [], {}
    current: list[str] | None = summary
    for line in text.splitlines():
        if line.startswith("# ") and not title:
            title = line[2:].strip()
            continue
        if line.startswith("## "):
            current = sections.setdefault(line[3:].strip(), [])
            continue
        current.append(line)
    joined = {name: _local_links_as_text("\n".join(lines).strip()) for name, lines in sections.items()}
    return title, _local_links_as_text("\n".join(summary).strip()), joined


def config_facts(folder: Path) -> list[tuple[str, str]]:
    try:
        meta = json.loads((folder / "config.json").read_text())
        cfg = meta["config"]
        vision, lm, resampler = cfg["vision"], cfg["lm"], cfg["resampler"]
    except (OSError, ValueError, KeyError, TypeError):
        return []
    facts = [
        ("Image encoder", f"{vision.get('name')} ({vision.get('kind')}) at {vision.get('image_size')} px"),
        ("Language model", str(lm.get("name"))),
        ("Resampler", f"{resampler.get('num_latents')} latents, {resampler.get('depth')} layers"),
    ]
    if isinstance(meta.get("cross_attn_layers"), list):
        facts.append(("Cross-attention before layers", ", ".join(map(str, meta["cross_attn_layers"]))))
    if isinstance(meta.get("trainable_parameters"), int):
        facts.append(("Trained parameters", f"{meta['trainable_parameters']:,}"))
    return facts


def read_card(folder: Path, name: str) -> Card:
    """The panel's content for the checkpoint in ``folder``, shown as ``name``."""
    facts = [("Checkpoint", f"{name} ({folder})"), *config_facts(folder)]
    try:
        text = (folder / "README.md").read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return Card(title=name, summary="This checkpoint has no model card (README.md).", facts=facts)
    title, summary, sections = parse_card(text)
    wanted = {s: sections[s] for s in SECTIONS if sections.get(s)}
    return Card(title=title or name, summary=summary, sections=wanted, facts=facts, has_card=True)
