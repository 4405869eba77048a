"""An answer's timing as the demo reports it: time to first token, tokens, tokens/s."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass


@dataclass
class Timing:
    first_token_s: float
    """From the request to the first piece of text (the prompt's forward pass, the image's
    encoding on a conversation's first turn)."""
    seconds: float
    """From the request to the last token."""
    tokens: int
    """Tokens generated (the stop token not counted)."""

    @property
    def tokens_per_s(self) -> float | None:
        """Decoding speed after the first token; None with fewer than two tokens."""
        decoding = self.seconds - self.first_token_s
        return (self.tokens - 1) / decoding if self.tokens > 1 and decoding > 0 else None

    def line(self) -> str:
        rate = self.tokens_per_s
        speed = f" · {rate:.1f} tokens/s" if rate is not None else ""
        return f"first token {self.first_token_s:.2f} s · {self.tokens} tokens{speed} · {self.seconds:.2f} s in all"

    def to_dict(self) -> dict:
        return {**asdict(self), "tokens_per_s": self.tokens_per_s}


def timed_stream(pieces: Iterator[str], show: Callable[[str], None]) -> tuple[str, float, float]:
    """Pass each piece of a streamed answer to ``show`` (the text so far); return the text,
    the seconds to its first piece and the seconds in all."""
    start = time.perf_counter()
    first = None
    text = ""
    for piece in pieces:
        if first is None:
            first = time.perf_counter() - start
        text += piece
        show(text)
    total = time.perf_counter() - start
    return text, total if first is None else first, total
