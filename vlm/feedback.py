"""Feedback on a model's outputs: 👍 / 👎 and corrections, kept as an append-only log.

A feedback folder holds ``feedback.jsonl``, one JSON record a line, and ``images/``, each
image once under its content hash (``images/<sha256>.png``). The demo appends a record
whenever a visitor rates an answer (or a generated page) or saves a correction; the latest
record of an answer is its current state (:func:`latest`), so changing one's mind never
rewrites an earlier line. ``vlm data feedback`` turns the records into training shards
(:mod:`vlm_train.data.feedback`).

Each record is written with one ``write`` call, flushed and fsynced, under an exclusive
lock: a killed writer leaves at most its own record cut short, and the next writer starts
on a fresh line. :func:`read_feedback` reads every whole record and reports the rest (a
cut last line, a line that is not a record of this format) without losing anything else.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from .fileio import write_bytes

__all__ = [
    "FORMAT",
    "LOG_NAME",
    "RATINGS",
    "FeedbackLog",
    "Problem",
    "Record",
    "image_name",
    "latest",
    "read_feedback",
]

FORMAT = "vlm-feedback/1"
LOG_NAME = "feedback.jsonl"
IMAGES = "images"
RATINGS = ("up", "down")
TASKS = ("vqa", "sketch")
"""The tasks a record can be about (:data:`vlm.tasks.TASKS` names): answers to questions
and generated pages."""

_RECORD_START = json.dumps({"format": FORMAT}).encode()[:-1]  # how every written line begins
_LOCK = threading.Lock()  # the demo serves every browser session from threads of one process


@dataclass
class Record:
    """One rating and/or correction of one output, as the visitor left it at ``time``."""

    task: str
    """``vqa`` (an answer to ``question``) or ``sketch`` (a page's body HTML)."""
    answer_id: str
    """The output rated; a later record with the same id replaces this one."""
    image: str
    """The image's file name in the folder's ``images/`` (its content hash)."""
    answer: str
    """What the model gave: the answer, or the page's body HTML as shown (after repair)."""
    question: str = ""
    """The question answered (``vqa``); for ``sketch`` the task's fixed prompt is implied."""
    turns: list[list[str]] = field(default_factory=list)
    """The conversation before ``question``: ``[question, answer]`` pairs, oldest first."""
    rating: str | None = None
    """``up``, ``down`` or None (not rated, or the rating was taken back)."""
    correction: str | None = None
    """What the output should have been, in the visitor's words (None: none given)."""
    model: dict[str, Any] = field(default_factory=dict)
    """Which checkpoint answered: ``{"name": …, "path": …}``."""
    decoding: dict[str, Any] = field(default_factory=dict)
    """The decoding settings it answered with (:class:`vlm.generate.GenerationConfig` fields)."""
    time: float = 0.0
    """Seconds since the epoch when the record was written."""
    id: str = ""
    """This record's own id."""
    format: str = FORMAT

    def validate(self) -> Record:
        """Raise ValueError naming the first field that is not as documented."""
        text = {"task": self.task, "answer_id": self.answer_id, "image": self.image, "answer": self.answer}
        for name, value in text.items():
            if not isinstance(value, str) or (name != "answer" and not value):
                raise ValueError(f"{name} must be a non-empty string, got {value!r}")
        if self.format != FORMAT:
            raise ValueError(f"format must be {FORMAT!r}, got {self.format!r}")
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {', '.join(TASKS)}, got {self.task!r}")
        if self.rating not in (*RATINGS, None):
            raise ValueError(f"rating must be up, down or null, got {self.rating!r}")
        if not isinstance(self.question, str) or (self.task == "vqa" and not self.question.strip()):
            raise ValueError("a vqa record needs its question")
        if self.correction is not None and not isinstance(self.correction, str):
            raise ValueError(f"correction must be a string or null, got {self.correction!r}")
        if not (isinstance(self.turns, list) and all(_is_turn(t) for t in self.turns)):
            raise ValueError("turns must be a list of [question, answer] string pairs")
        if Path(self.image).name != self.image or not self.image.endswith(".png"):
            raise ValueError(f"image must be a file name in {IMAGES}/, got {self.image!r}")
        if not isinstance(self.model, dict) or not isinstance(self.decoding, dict):
            raise ValueError("model and decoding must be objects")
        if not isinstance(self.time, int | float) or isinstance(self.time, bool):
            raise ValueError(f"time must be a number, got {self.time!r}")
        return self

    @classmethod
    def from_json(cls, data: Any) -> Record:
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        if data.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} record (format {data.get('format')!r})")
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown fields {sorted(unknown)}")
        try:
            return cls(**data).validate()
        except TypeError as e:  # a required field missing
            raise ValueError(str(e)) from None

    @property
    def target(self) -> str | None:
        """The text to train on: the correction, else a 👍 answer, else None."""
        if self.correction is not None and self.correction.strip():
            return self.correction.strip()
        return self.answer if self.rating == "up" and self.answer.strip() else None


def _is_turn(turn: Any) -> bool:
    return isinstance(turn, list | tuple) and len(turn) == 2 and all(isinstance(x, str) for x in turn)


@dataclass
class Problem:
    """A line of the log that is not a whole record."""

    line: int
    """1-based line number."""
    reason: str
    """``truncated`` (the last line, cut short: a writer was killed mid-record) or
    ``foreign`` (a line that is not a record of this format), with the detail after a colon."""
    excerpt: str = ""

    def __str__(self) -> str:
        return f"line {self.line}: {self.reason}" + (f" ({self.excerpt})" if self.excerpt else "")


def image_name(image: Image.Image) -> tuple[str, bytes]:
    """``(<sha256 of the PNG>.png, PNG bytes)`` of the image as the model saw it (RGB)."""
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG")
    data = buf.getvalue()
    return f"{hashlib.sha256(data).hexdigest()}.png", data


class FeedbackLog:
    """Appends records to ``folder/feedback.jsonl``; the folder is made on first use."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.path = self.folder / LOG_NAME

    def add_image(self, image: Image.Image) -> str:
        """Store the image once (by content hash) and return its name in ``images/``."""
        name, data = image_name(image)
        target = self.folder / IMAGES / name
        if not target.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            write_bytes(target, data)  # whole or absent: a reader never sees half an image
        return name

    def append(self, record: Record) -> Record:
        """Write ``record`` (given an id and a time if it has none) as one line, synced to disk."""
        record.id = record.id or uuid.uuid4().hex
        record.time = record.time or time.time()
        record.validate()
        fields = {"format": FORMAT, **asdict(record)}  # format first: a cut record is still recognisable
        line = json.dumps(fields, ensure_ascii=False).encode() + b"\n"
        self.folder.mkdir(parents=True, exist_ok=True)
        with _LOCK:
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                _lock(fd)
                size = os.fstat(fd).st_size
                if size and os.pread(fd, 1, size - 1) != b"\n":
                    line = b"\n" + line  # a killed writer's cut line stays alone, reported by the reader
                os.write(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)
        return record

    def image_path(self, name: str) -> Path:
        return self.folder / IMAGES / name


def _lock(fd: int) -> None:
    try:
        import fcntl  # POSIX: several demo processes may share one folder
    except ImportError:  # Windows: one process per folder
        return
    fcntl.flock(fd, fcntl.LOCK_EX)  # released when the descriptor is closed


def read_feedback(folder: str | os.PathLike) -> tuple[list[Record], list[Problem]]:
    """Every whole record of ``folder/feedback.jsonl`` (or of that file itself), in order,
    and a :class:`Problem` for each other non-empty line. A missing file has no records."""
    path = Path(folder)
    if path.is_dir():
        path = path / LOG_NAME
    if not path.is_file():
        return [], []
    data = path.read_bytes()
    lines = data.split(b"\n")
    records: list[Record] = []
    problems: list[Problem] = []
    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        excerpt = raw[:60].decode("utf-8", "replace")
        try:
            value = json.loads(raw)
        except ValueError:
            # Cut short: the last line without its newline (the writer stopped mid-line), or
            # an earlier one that starts as a record does (the next writer began a new line).
            cut = number == len(lines) or raw.startswith(_RECORD_START)
            problems.append(Problem(number, "truncated" if cut else "foreign: not JSON", excerpt))
            continue
        try:
            records.append(Record.from_json(value))
        except ValueError as e:
            problems.append(Problem(number, f"foreign: {e}", excerpt))
    return records, problems


def latest(records: Iterable[Record]) -> list[Record]:
    """The current state of each output: its latest record, in the order outputs were first rated."""
    current: dict[str, Record] = {}
    for record in records:
        current[record.answer_id] = record  # a dict keeps the order of first insertion
    return list(current.values())
