"""``vlm data feedback FOLDER --out DIR``: training data from the demo's feedback log.

The log (:mod:`vlm.feedback`) holds every rating and correction; the latest record of each
output is its current state. From those it writes:

- ``DIR/qa/``: ``qa`` shards, one sample per answer with a target: the visitor's correction,
  else a 👍 answer. A sample is the image and that one turn (question, target); the earlier
  turns of its conversation are left out, since their answers were not all reviewed and a
  ``qa`` sample trains every answer it holds.
- ``DIR/sketch/``: ``sketch`` shards, the sketch and the target page body (a correction is
  made well-formed and safe with :func:`vlm.html.repair_html`, as model output is).
- ``DIR/preference.jsonl``: one pair per corrected output, the correction ``chosen`` and the
  model's output ``rejected`` (the data of a reward model or of DPO), with its image in
  ``DIR/images/``.
- ``DIR/report.json``: what was used and what was skipped, and why.

A kind with no samples still gets one empty shard, so that a mixture naming both folders
(``training/presets/feedback.json``) runs: the loader drops a source that gives nothing.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
import tarfile
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from vlm.feedback import IMAGES, Record, latest, read_feedback
from vlm.fileio import write_bytes, write_text
from vlm.html import repair_html
from vlm.images import ImageError, load_image
from vlm.tasks import SKETCH_PROMPT

from .shards import ShardWriter, image_bytes, qa_sample, shard_pattern, sketch_sample

KINDS = {"vqa": "qa", "sketch": "sketch"}  # the record's task → the shard format it trains


@dataclass
class Report:
    """What :func:`build` used and skipped."""

    records: int = 0
    """Whole records read from the log."""
    outputs: int = 0
    """Outputs rated or corrected (the latest record of each counts)."""
    used: Counter = field(default_factory=Counter)
    """Samples written per shard format, and ``preference`` pairs."""
    skipped: Counter = field(default_factory=Counter)
    """Outputs not trained on, by reason."""
    bad_lines: list[str] = field(default_factory=list)
    """Lines of the log that are not whole records (truncated, foreign)."""
    shards: dict[str, str] = field(default_factory=dict)
    """The shard pattern written per format."""
    repaired: int = 0
    """Sketch corrections that :func:`vlm.html.repair_html` had to change (used as repaired)."""

    def summary(self) -> str:
        used = f"{self.used['qa']} qa samples, {self.used['sketch']} sketch samples, {self.used['preference pairs']} preference pairs"
        skipped = ", ".join(f"{n} {k}" for k, n in sorted(self.skipped.items())) or "none"
        lines = [
            f"read {self.records} records about {self.outputs} outputs",
            f"used: {used}",
            f"skipped outputs: {skipped}",
            *([f"sketch corrections made well-formed and safe: {self.repaired}"] if self.repaired else []),
            f"unreadable log lines: {len(self.bad_lines)}",
            *(f"  {line}" for line in self.bad_lines[:20]),
        ]
        if len(self.bad_lines) > 20:
            lines.append(f"  ... and {len(self.bad_lines) - 20} more")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "records": self.records,
            "outputs": self.outputs,
            "used": dict(self.used),
            "skipped": dict(self.skipped),
            "bad_lines": self.bad_lines,
            "shards": self.shards,
            "repaired": self.repaired,
        }


def sample_key(record: Record) -> str:
    # Shard keys may not hold '.' or '/'; answer ids are the demo's own, but the log is input.
    return "fb" + hashlib.sha256(record.answer_id.encode()).hexdigest()[:24]


def _skip_reason(record: Record) -> str:
    if record.rating == "down":
        return "thumbs down without a correction"
    return "not rated"


def build(
    folder: str | Path,
    out: str | Path,
    shard_size: int = 1000,
    max_bytes: int = 256 * 1024 * 1024,
    prefix: str = "feedback",
) -> Report:
    """Write the shards (``out/qa/<prefix>-qa-000000.tar``, ``out/sketch/…``), the
    preference file and the report of ``folder``'s feedback into ``out``."""
    folder, out = Path(folder), Path(out)
    if not folder.is_dir():
        raise FileNotFoundError(f"no feedback folder {folder}")
    records, problems = read_feedback(folder)
    report = Report(records=len(records), bad_lines=[str(p) for p in problems])
    outputs = latest(records)
    report.outputs = len(outputs)
    report.used.update(dict.fromkeys(("qa", "sketch", "preference pairs"), 0))  # every count shows, zero or not
    out.mkdir(parents=True, exist_ok=True)
    pairs: list[dict] = []
    images_used: set[str] = set()
    with ExitStack() as stack:  # a failure drops the shards being written, keeps the finished ones
        writers = {
            kind: stack.enter_context(ShardWriter(out / kind, f"{prefix}-{kind}", shard_size, max_bytes))
            for kind in KINDS.values()
        }
        for record in outputs:
            target = record.target
            if target is None:
                report.skipped[_skip_reason(record)] += 1
                continue
            try:
                image = load_image(folder / IMAGES / record.image)
            except (ImageError, OSError):
                report.skipped["missing or unreadable image"] += 1
                continue
            png = image_bytes(image)
            kind = KINDS[record.task]
            # "corrected": true lets a mixture weight corrections up (select, as in the tune-feedback preset).
            meta = {"feedback": record.answer_id, "rating": record.rating, "corrected": record.correction is not None}
            if kind == "sketch":
                # A correction starts from the demo's laid-out page: the whitespace between
                # tags goes, as the canonical pages have none.
                target, repairs = repair_html(re.sub(r">\s+<", "><", target.strip()))
                if not target.strip():
                    report.skipped["empty page after repair"] += 1
                    continue
                report.repaired += bool(repairs and record.correction)
                writers[kind].write(sketch_sample(sample_key(record), png, target))
            else:
                meta = {
                    "feedback": record.answer_id,
                    "rating": record.rating,
                    "corrected": record.correction is not None,
                }
                writers[kind].write(qa_sample(sample_key(record), png, [(record.question, target)], meta))
            report.used[kind] += 1
            if record.correction is not None and target.strip() != record.answer.strip():
                pairs.append(_pair(record, target))
                images_used.add(record.image)
    for kind, writer in writers.items():
        written = writer.written or [_write_empty_shard(out / kind / f"{prefix}-{kind}-000000.tar")]
        for stale in set((out / kind).glob(f"{prefix}-{kind}-*.tar")) - set(written):
            stale.unlink()  # a longer earlier build's shards would join this one's in the folder
        report.shards[kind] = shard_pattern(written)
    for name in sorted(images_used):
        target = out / IMAGES / name
        if not target.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(folder / IMAGES / name, target)
    write_text(out / "preference.jsonl", "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs))
    report.used["preference pairs"] = len(pairs)
    write_text(out / "report.json", json.dumps(report.to_dict(), indent=2) + "\n")
    return report


def _pair(record: Record, chosen: str) -> dict:
    """A preference pair: the same prompt, the corrected output preferred over the model's."""
    return {
        "task": record.task,
        "image": f"{IMAGES}/{record.image}",
        "turns": record.turns,
        "prompt": record.question if record.task == "vqa" else SKETCH_PROMPT,
        "chosen": chosen,
        "rejected": record.answer,
        "answer_id": record.answer_id,
        "model": record.model,
        "decoding": record.decoding,
    }


def _write_empty_shard(path: Path) -> Path:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT):
        pass
    write_bytes(path, buf.getvalue())
    return path
