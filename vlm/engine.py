"""Continuous batching: concurrent requests share the model's decode steps.

Requests wait in a queue; one background thread runs the model. Between two decode
steps it admits waiting requests and removes finished ones, so a long answer never holds
back a short one (Orca's iteration-level scheduling, Yu et al. 2022):

- Requests admitted at the same step are prefilled together: their images encoded in
  one call (per image count), each cross-attention layer's keys/values over them computed
  once, their prompts run as one left-padded batch, and each one's first token picked.
  They then join the running batch (:meth:`Session.concat`). A prompt prefix before the
  first image that an earlier request of its kind shared (a chat template's system
  prompt) is copied from it instead of run again (``prefix_min_tokens``).
- Rows of different lengths share a step by left padding: a shorter row's LM cache gets
  masked zero slots on the left, and positions count real tokens only, so every row sees
  the positions and keys it had alone. Images are padded to the most any row holds; the
  cross-attention mask lets a token reach only images up to its own ``<image>`` count, so
  padded images are never attended to.
- Requests with and without images share one batch: a row without images gets zero
  images, and the cross-attention blocks leave a row with no ``<image>`` untouched, so it
  gets the tokens it gets alone. When the last row with images leaves, the blocks stop
  running (``Session.trim_padding``).
- A row leaves at once when it finishes (stop token, stop string, ``max_new_tokens``,
  the context limit), is cancelled (``Request.cancel``: a client that went away) or runs
  past its deadline; padding that only departed rows needed is dropped.

Each request decodes greedily or samples with its own ``torch.Generator``, so a batch
gives every request exactly the tokens it gets alone (up to floating-point rounding in
padded attention, which tests check does not change greedy tokens). Results arrive as
:class:`Output` events: through a callback run on the engine thread (a web server hands
them to its event loop) or, without one, from :meth:`Request.outputs`.
"""

from __future__ import annotations

import collections
import ctypes
import functools
import itertools
import logging
import math
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from .generate import GenerationConfig, _first_stop_string, _held_back, _pick, _stop_ids, process_logits
from .model import VLM
from .session import Session

__all__ = [
    "Engine",
    "EngineConfig",
    "EngineClosed",
    "Output",
    "QueueFull",
    "Request",
    "FINISH_REASONS",
    "release_openmp_threads",
]

log = logging.getLogger(__name__)

FINISH_REASONS = ("stop", "length", "cancelled", "timeout", "shutdown", "error")
"""``stop``: a stop token or stop string; ``length``: ``max_new_tokens`` or the model's
context; ``cancelled``: :meth:`Request.cancel`; ``timeout``: past the request's deadline;
``shutdown``: the engine stopped first; ``error``: see :attr:`Request.error`."""


class QueueFull(RuntimeError):
    """Every row is busy and the queue is full; ``retry_after`` (seconds) is an estimate."""

    def __init__(self, message: str, retry_after: float):
        super().__init__(message)
        self.retry_after = retry_after


class EngineClosed(RuntimeError):
    """The engine is shutting down (or has stopped) and takes no new requests."""


@dataclass
class EngineConfig:
    """Scheduling limits."""

    max_concurrent: int = 8
    """Sequences decoding together (rows of the running batch)."""
    max_queued: int = 64
    """Requests that may wait for a row beyond those running; one more raises :class:`QueueFull`."""
    timeout_s: float | None = None
    """Default limit per request, from submission to its last token (None: none)."""
    policy: str = "continuous"
    """``continuous``: admit between decode steps. ``static``: admit only into an empty
    batch (a baseline for ``benchmarks/serve.py``: a batch runs until its last row ends)."""
    batch_window_s: float = 0.05
    """``static`` only: how long the first waiting request waits for others to fill its batch."""
    encode_batch: int | None = None
    """Requests whose images one call of the vision tower encodes, when several are admitted
    at once (with equal image counts and sizes). None: one at a time on a CPU, all at once
    elsewhere. On a CPU a batch saves little per image, and in a server its larger
    activations kept landing in fresh memory the kernel had to zero: seven images in one
    call took 0.5–0.9 s there, seven calls of one 0.27 s (``docs/serving.md``)."""
    prefix_min_tokens: int = 16
    """Reuse the LM cache of a prompt prefix (before the first image) shared with the
    previous request of its kind when at least this many tokens long, e.g. a chat
    template's system prompt; 0: off, every prompt runs whole as in :func:`vlm.generate.generate`."""

    def validate(self) -> EngineConfig:
        if self.max_concurrent < 1 or self.max_queued < 0:
            raise ValueError("max_concurrent must be >= 1 and max_queued >= 0")
        if self.timeout_s is not None and self.timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0 or None, got {self.timeout_s}")
        if self.policy not in ("continuous", "static"):
            raise ValueError(f"policy must be 'continuous' or 'static', got {self.policy!r}")
        if self.batch_window_s < 0 or self.prefix_min_tokens < 0:
            raise ValueError("batch_window_s and prefix_min_tokens must be >= 0")
        if self.encode_batch is not None and self.encode_batch < 1:
            raise ValueError(f"encode_batch must be >= 1 or None, got {self.encode_batch}")
        return self


@dataclass
class Output:
    """One event of a request: ``text`` is new text that is final (never half a character,
    never what may still turn out to start a stop string); ``token_ids`` the new tokens.
    The last event has ``finished`` set, with ``finish_reason`` (one of :data:`FINISH_REASONS`)."""

    text: str
    token_ids: list[int]
    finished: bool = False
    finish_reason: str | None = None
    error: BaseException | None = None


class Request:
    """A submitted request: its progress, its result, and :meth:`cancel`. Made by
    :meth:`Engine.submit`; the engine thread writes it, other threads read it."""

    def __init__(self, request_id: str, prompt: list[int], config: GenerationConfig, deadline: float | None, listener):
        self.id = request_id
        self.prompt_tokens = len(prompt)
        self.config = config
        self.tokens: list[int] = []
        """New tokens so far, without the stop token."""
        self.text = ""
        """The answer so far (final once :attr:`done`): what the :class:`Output` events carried."""
        self.finish_reason: str | None = None
        self.error: BaseException | None = None
        self.decode_steps = 0
        """Batched decode steps this request took part in (its prefill not counted)."""
        self.submitted = time.monotonic()
        self.first_token_at: float | None = None
        self.finished_at: float | None = None
        self._deadline = deadline
        self._listener: Callable[[Output], None] | None = listener
        self._events: queue.SimpleQueue[Output] | None = None if listener is not None else queue.SimpleQueue()
        self._done = threading.Event()
        self._cancelled = threading.Event()
        self._engine: Engine | None = None
        self._keep_session = False
        self.session: Session | None = None
        """With ``keep_session``: a one-row copy of the prompt as prefilled (set before the first token)."""

    @property
    def done(self) -> bool:
        return self._done.is_set()

    @property
    def completion_tokens(self) -> int:
        return len(self.tokens)

    def cancel(self) -> None:
        """Stop this request: it leaves the queue or the batch before the next decode step
        (no more steps are spent on it) and finishes with ``cancelled``. Safe from any
        thread, and a no-op once it is done."""
        self._cancelled.set()
        if self._engine is not None:
            self._engine._wake()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until done (True) or ``timeout`` seconds pass (False)."""
        return self._done.wait(timeout)

    def outputs(self, timeout: float | None = None) -> Iterator[Output]:
        """The events as they come (only for requests submitted without a listener)."""
        if self._events is None:
            raise RuntimeError("this request's events go to its listener")
        while True:
            out = self._events.get(timeout=timeout)
            yield out
            if out.finished:
                return

    def _emit(self, out: Output) -> None:
        if out.finished:
            self.finish_reason, self.error = out.finish_reason, out.error
            self.finished_at = time.monotonic()
        try:
            if self._listener is not None:
                self._listener(out)
            else:
                self._events.put(out)
        except Exception:  # a listener's bug must not stop the engine
            log.exception("request %s: its listener failed", self.id)
        if out.finished:
            self._done.set()


@dataclass(eq=False)
class _Row:
    """A running request with its decoding state."""

    request: Request
    stops: set[int]
    generator: torch.Generator | None
    limit: int
    """max_new_tokens, lowered to what the model's context leaves."""
    sent: int = 0
    """Characters of ``text`` already given out."""
    text: str = ""
    prompt: torch.Tensor | None = None
    """(1, S) the prompt's ids: with a repetition penalty, what the row has seen besides its tokens."""

    def seen(self) -> torch.Tensor | None:
        """(1, S + n) the tokens fed so far, as :func:`vlm.generate.generate` penalises them."""
        if self.request.config.repetition_penalty == 1.0:
            return None
        new = torch.tensor([self.request.tokens], dtype=torch.long, device=self.prompt.device)
        return torch.cat([self.prompt, new], dim=1)


@dataclass
class _Batch:
    """Rows decoding together and the session holding them (one row each)."""

    rows: list[_Row] = field(default_factory=list)
    session: Session | None = None


_Input = tuple[torch.Tensor, torch.Tensor | None, Session | None]
"""A request's prompt ids (1, S), its images (1, T, C, H, W) or None, and the session it continues."""


def _continued(earlier: Session, ids: torch.Tensor) -> tuple[Session, int]:
    """A session for prompt ``ids`` (1, S) that starts as much of it as ``earlier`` (one row)
    holds, and how many tokens that is; at least the last token is left to run."""
    n = min(earlier.length, ids.shape[1] - 1)
    start = int((earlier.ids[0, :n] == ids[0, :n].to(earlier.ids.device)).long().cumprod(0).sum())
    if start:
        return earlier.prefix_copy(start), start
    return Session(earlier.model, None, latents=earlier.latents), 0


def release_openmp_threads() -> bool:
    """Let the calling thread's idle OpenMP worker threads go (OpenMP 5's
    ``omp_pause_resource_all``, soft); this thread makes new ones when it next runs parallel
    work. Returns whether the runtime did it (False where torch's threads are not OpenMP's
    or the runtime lacks the call).

    Why: GNU OpenMP (torch's on Linux) gives every thread that runs parallel work its own
    team of workers, and once the process holds more of them than it has CPUs, an idle
    worker stops spinning and sleeps at once. Each parallel op of the engine thread then
    waits for its workers to wake: a decode step of the bundled model took twice as long on
    a second thread as on the first, until the first let its workers go. So the thread that
    loaded the model (on :meth:`Engine.start`), and any thread that prepares inputs with
    torch ops (a server's image decoding), should call this when done."""
    ok = False
    for pause in _omp_pause_calls():
        ok |= pause(1) == 0  # 1: omp_pause_soft
    return ok


@functools.cache
def _omp_pause_calls() -> tuple:
    """``omp_pause_resource_all`` of each OpenMP runtime loaded in this process, when torch
    runs its parallel work on OpenMP."""
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return ()
    paths = []
    try:
        with open("/proc/self/maps") as maps:  # Linux: the libraries actually loaded
            for line in maps:
                fields = line.split(None, 5)
                path = fields[5].strip() if len(fields) == 6 else ""
                name = os.path.basename(path)
                if name.startswith(("libgomp", "libiomp", "libomp")) and ".so" in name and path not in paths:
                    paths.append(path)
    except OSError:
        pass
    calls = []
    for path in paths:
        try:
            call = ctypes.CDLL(path).omp_pause_resource_all
        except (OSError, AttributeError):
            continue
        call.argtypes, call.restype = [ctypes.c_int], ctypes.c_int
        calls.append(call)
    return tuple(calls)


class Engine:
    """Runs ``model`` for many requests at once in one background thread.

    Use it as a context manager, or call :meth:`start` and :meth:`shutdown`. Other threads
    may run the model meanwhile (inference only reads it), but they compete with the
    engine for the CPU: send them through the engine instead where you can (a
    :class:`vlm.chat.Chat` takes one). :meth:`start`, and the engine thread whenever it
    goes idle, let that thread's OpenMP workers go (:func:`release_openmp_threads`), so
    the workers of the thread running torch at the moment stay quick to wake.
    """

    def __init__(self, model: VLM, tokenizer, config: EngineConfig | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = (config or EngineConfig()).validate()
        self.device = next(model.parameters()).device
        lm = model.lm.config
        self.max_context: int | None = getattr(lm, "max_position_embeddings", None) or getattr(lm, "n_positions", None)
        self.pad_token_id = 0 if model.image_token_id != 0 else 1
        self.max_rows = self.config.max_concurrent
        layers = {type(layer).__name__ for layer in DynamicCache(config=lm).layers}
        if layers - {"DynamicLayer"}:
            # A sliding-window (or otherwise partial) cache cannot be left-padded: one row at a time.
            log.warning(
                "%s's KV cache (%s) cannot batch rows; serving one request at a time",
                type(model.lm).__name__,
                ", ".join(sorted(layers)),
            )
            self.max_rows = 1
        self._base_stops = _stop_ids(model, tokenizer, GenerationConfig())
        self._cond = threading.Condition()
        self._waiting: collections.deque[Request] = collections.deque()
        self._batch = _Batch()
        self._admitting: collections.deque[Request] = collections.deque()
        self._prefixes: dict[bool, Session] = {}  # by "has images": the last shared prompt prefix
        self._inputs: dict[str, _Input] = {}
        self._closing = False
        self._stop = False
        self._thread: threading.Thread | None = None
        self._ids = itertools.count()
        self._running = 0
        self.decode_steps = 0
        """Batched decode steps run so far (one per batch and step)."""
        self.finished = collections.Counter()
        """Finished requests by reason."""
        self._latency = 1.0  # running mean of seconds per request, for Retry-After

    # ------------------------------------------------------------------ public

    def start(self) -> Engine:
        with self._cond:
            if self._thread is not None:
                raise RuntimeError("the engine is already started")
            if self._closing:
                raise EngineClosed("the engine was shut down")
            self._thread = threading.Thread(target=self._loop, name="vlm-engine", daemon=True)
            self._thread.start()
        release_openmp_threads()
        return self

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def submit(
        self,
        input_ids: torch.Tensor | list[int],
        images: torch.Tensor | None = None,
        config: GenerationConfig | None = None,
        timeout_s: float | None = None,
        listener: Callable[[Output], None] | None = None,
        request_id: str | None = None,
        session: Session | None = None,
        keep_session: bool = False,
    ) -> Request:
        """Queue a request: ``input_ids`` (S,) or (1, S) as the processor makes them,
        ``images`` (T, C, H, W) or (1, T, C, H, W) for its ``<image>`` markers, or None.

        ``config``: greedy or sampling (``temperature``, ``top_k``, ``top_p``, ``seed``),
        ``repetition_penalty``, ``max_new_tokens``, ``stop_token_ids``, ``stop_strings``; not
        beams or prompt lookup. ``listener`` is called on the engine thread with each
        :class:`Output` (keep it short; hand work to another thread). Raises
        :class:`QueueFull`, :class:`EngineClosed` or ``ValueError``.

        A conversation's next turn: ``keep_session=True`` makes the engine keep a copy of
        the request's prefilled prompt as :attr:`Request.session`; pass it as ``session``
        with the next turn's whole prompt and ``images=None``. The images are then not
        encoded again, and the part of the prompt the session already holds is copied,
        not run (see :class:`vlm.chat.Chat`)."""
        cfg = GenerationConfig(**(config.__dict__ if config else {})).validate()
        if cfg.num_beams != 1 or cfg.prompt_lookup:
            raise ValueError(
                f"the engine decodes greedily or by sampling, one token a step: num_beams must be 1 (got "
                f"{cfg.num_beams}) and prompt_lookup 0 (got {cfg.prompt_lookup})"
            )
        ids = torch.as_tensor(input_ids, dtype=torch.long).reshape(-1)
        if ids.numel() == 0:
            raise ValueError("the prompt is empty")
        if images is not None:
            images = images if images.ndim == 5 else images[None]
            if images.ndim != 5 or images.shape[0] != 1:
                raise ValueError(f"images must be (T, C, H, W) or (1, T, C, H, W), got {tuple(images.shape)}")
            if images.shape[1] == 0:
                images = None
        markers = int((ids == self.model.image_token_id).sum())
        if session is not None:
            if images is not None:
                raise ValueError("a continued session already holds its images; pass images=None")
            if session.model is not self.model or session.cache is None or session.length == 0:
                raise ValueError("session must be a Request.session of this engine's model")
            count = 0 if session.latents is None else session.latents.shape[1]
            what = "the session holds "
        else:
            count = 0 if images is None else images.shape[1]
            what = ""
        if markers != count:
            raise ValueError(f"the prompt has {markers} image markers but {what}{count} images")
        if self.max_context is not None and ids.numel() >= self.max_context:
            raise ValueError(f"the prompt has {ids.numel()} tokens; the model's context is {self.max_context}")
        timeout_s = timeout_s if timeout_s is not None else self.config.timeout_s
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        request = Request(request_id or f"req-{next(self._ids)}", ids.tolist(), cfg, deadline, listener)
        with self._cond:
            if self._closing:
                raise EngineClosed("the engine is shutting down")
            busy = self._running + len(self._waiting)
            if busy >= self.config.max_concurrent + self.config.max_queued:
                waves = (len(self._waiting) + 1) / self.config.max_concurrent
                retry = min(60.0, max(1.0, math.ceil(self._latency * waves)))
                raise QueueFull(
                    f"{self._running} requests running and {len(self._waiting)} waiting (limit "
                    f"{self.config.max_concurrent} + {self.config.max_queued})",
                    retry,
                )
            request._engine = self
            request._keep_session = keep_session
            self._inputs[request.id] = (ids[None], images, session)
            self._waiting.append(request)
            self._cond.notify_all()
        return request

    def stats(self) -> dict:
        """What the engine is doing now, for health checks and tests."""
        with self._cond:
            return {
                "running": self._running,
                "waiting": len(self._waiting),
                "decode_steps": self.decode_steps,
                "finished": dict(self.finished),
                "max_concurrent": self.config.max_concurrent,
                "max_queued": self.config.max_queued,
                "accepting": not self._closing,
            }

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def shutdown(self, drain_s: float = 0.0) -> None:
        """Take no new requests; let those in flight finish for up to ``drain_s`` seconds,
        then end the rest (``shutdown``) and stop the thread. Idempotent."""
        with self._cond:
            self._closing = True
            deadline = time.monotonic() + drain_s
            while self._thread is not None and (self._waiting or self._running):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            self._stop = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join()
        else:  # never started: nothing ran, end what waits
            self._end_waiting("shutdown")

    # ------------------------------------------------------------------ the engine thread

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _loop(self) -> None:
        try:
            with torch.inference_mode():
                while True:
                    admit = self._next_admissions()
                    if admit is None:
                        break
                    self._admitting.extend(admit)
                    self._expire()
                    if self._admitting:
                        self._admit(list(self._admitting))
                        self._admitting.clear()
                    if self._batch.rows:
                        self._step(self._batch)
        except BaseException:  # noqa: B036 - logged, then every request is ended below
            log.exception("the engine thread failed")
        finally:
            for request in self._admitting:  # taken from the queue, not yet in a batch
                self._finish(_Row(request, set(), None, 0), "shutdown")
            self._admitting.clear()
            for row in list(self._batch.rows):
                self._finish(row, "shutdown")
            self._batch.rows.clear()
            self._batch.session = None
            with self._cond:
                self._closing = True
            self._end_waiting("shutdown")

    def _next_admissions(self) -> list[Request] | None:
        """Requests to prefill before the next step; None when the engine should stop."""
        with self._cond:
            while True:
                if self._stop:
                    return None
                self._drop_cancelled_waiting()
                free = self.max_rows - self._running
                if self.config.policy == "static" and self._running:
                    free = 0
                if self._waiting and free > 0 and self.config.policy == "static" and len(self._waiting) < free:
                    wait = self._waiting[0].submitted + self.config.batch_window_s - time.monotonic()
                    if wait > 0:  # a static batch waits a moment for more requests to fill it
                        self._cond.wait(wait)
                        continue
                admit = [self._waiting.popleft() for _ in range(min(free, len(self._waiting)))]
                self._running += len(admit)
                if admit or self._running:
                    return admit
                # Idle: let this thread's OpenMP workers go, so that other threads running torch
                # meanwhile (a demo's other tabs, image decoding) do not wait on sleeping workers.
                release_openmp_threads()
                self._cond.wait()

    def _drop_cancelled_waiting(self) -> None:
        now = time.monotonic()
        for request in list(self._waiting):
            reason = "cancelled" if request._cancelled.is_set() else None
            if reason is None and request._deadline is not None and now > request._deadline:
                reason = "timeout"
            if reason:
                self._waiting.remove(request)
                self._inputs.pop(request.id, None)
                self._count(request, reason)
                request._emit(Output("", [], True, reason))

    def _end_waiting(self, reason: str) -> None:
        with self._cond:
            waiting = list(self._waiting)
            self._waiting.clear()
            self._inputs.clear()
        for request in waiting:
            self._count(request, reason)
            request._emit(Output("", [], True, reason))

    def _count(self, request: Request, reason: str) -> None:
        with self._cond:
            self.finished[reason] += 1
            seconds = time.monotonic() - request.submitted
            self._latency = 0.8 * self._latency + 0.2 * seconds
            self._cond.notify_all()

    def _expire(self) -> None:
        now = time.monotonic()
        gone = []
        for row in self._batch.rows:
            request = row.request
            if request._cancelled.is_set():
                gone.append((row, "cancelled"))
            elif request._deadline is not None and now > request._deadline:
                gone.append((row, "timeout"))
        for row, reason in gone:
            self._finish(row, reason)
        if gone:
            self._drop(self._batch, [row for row, _ in gone])

    def _admit(self, requests: list[Request]) -> None:
        """Prefill ``requests`` together and add them to the running batch."""
        rows, inputs = [], []
        for request in requests:
            with self._cond:
                input_ids, images, session = self._inputs.pop(request.id)
            cfg = request.config
            row = _Row(request, self._stops(cfg), self._generator(cfg), self._limit(request))
            if request._cancelled.is_set():
                self._finish(row, "cancelled")
                continue
            row.prompt = input_ids.to(self.device)
            rows.append(row)
            inputs.append((row.prompt, images, session))
        if rows:
            self._join(rows, inputs)

    def _join(self, rows: list[_Row], inputs: list[_Input]) -> None:
        try:
            session, logits = self._prefill(inputs)  # (B, V)
            for k, row in enumerate(rows):
                if row.request._keep_session:
                    row.request.session = kept = session.prefix_copy(row.request.prompt_tokens, row=k)
                    kept.trim_padding()  # image slots that other rows of the prefill needed
            tokens = [
                int(
                    _pick(
                        process_logits(logits[k : k + 1], row.seen(), row.request.config),
                        row.request.config,
                        row.generator,
                    )[0]
                )
                for k, row in enumerate(rows)
            ]
        except Exception as e:
            if len(rows) > 1:  # one request's problem (a bad input) must not fail the others
                log.warning("a prefill of %d requests failed (%s); prefilling them one by one", len(rows), e)
                for row, one in zip(rows, inputs):
                    self._join([row], [one])
                return
            log.exception("request %s: prefill failed", rows[0].request.id)
            self._finish(rows[0], "error", e)
            return
        alive = [k for k, (row, token) in enumerate(zip(rows, tokens)) if not self._advance(row, token)]
        if not alive:
            return
        if len(alive) < len(rows):
            session.keep(torch.tensor(alive, device=self.device))
            session.trim_padding()
            rows = [rows[k] for k in alive]
        batch = self._batch
        try:
            merged = session if batch.session is None else Session.concat([batch.session, session], self.pad_token_id)
        except Exception as e:
            log.exception("requests %s: cannot join the running batch", ", ".join(row.request.id for row in rows))
            for row in rows:
                self._finish(row, "error", e)
            return
        batch.rows.extend(rows)
        batch.session = merged

    def _prefill(self, inputs: list[_Input]) -> tuple[Session, torch.Tensor]:
        """One session for the requests' prompts ``ids`` (1, S) and images, run as one batch
        (left-padded); returns it and the next-token logits (B, V). The part of a prompt
        before its first image that an earlier request of its kind shared (a system prompt)
        is copied, not run again; so is what a continued session already holds."""
        latents = self._encode([images for _, images, _ in inputs])
        sessions, rest, saves = [], [], []
        min_tokens = self.config.prefix_min_tokens
        for k, ((ids, _, earlier), lat) in enumerate(zip(inputs, latents)):
            if earlier is not None:
                session, start = _continued(earlier, ids)
                sessions.append(session)
                rest.append(ids[0, start:])
                continue
            session = Session(self.model, None, latents=lat)
            kind = lat is not None
            # Tokens whose hidden states do not depend on the images: those before the first one.
            markers = (ids[0] == self.model.image_token_id).nonzero()
            shareable = int(markers[0, 0]) if len(markers) else ids.shape[1] - 1
            start = 0
            cached = self._prefixes.get(kind)
            if min_tokens and cached is not None and shareable >= min_tokens:
                n = min(shareable, cached.length)
                start = int((cached.ids[0, :n] == ids[0, :n]).long().cumprod(0).sum())
                if start >= min_tokens:
                    session.start_from(cached, start)
                else:
                    start = 0
            if min_tokens and start < shareable and shareable >= min_tokens:
                saves.append((k, kind, shareable))
            sessions.append(session)
            rest.append(ids[0, start:])
        if len(sessions) == 1:
            session = sessions[0]
            logits = session.feed(rest[0][None])  # (1, V)
        else:
            session = Session.concat(sessions, self.pad_token_id)
            width = max(len(r) for r in rest)
            ids = torch.full((len(rest), width), self.pad_token_id, dtype=torch.long, device=self.device)
            mask = torch.zeros_like(ids)
            for k, r in enumerate(rest):  # left padding: every row's last token is the last column
                ids[k, width - len(r) :] = r
                mask[k, width - len(r) :] = 1
            logits = session.feed(ids, mask)  # (B, V)
        for k, kind, shareable in saves:  # the newest prefix wins
            self._prefixes[kind] = session.prefix_copy(shareable, row=k)
        return session, logits

    def _encode(self, images: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
        """Each request's latents (1, T, L, D) or None; requests with the same number and size
        of images are encoded together, ``encode_batch`` requests a call."""
        groups: dict[tuple[int, ...], list[int]] = {}
        for k, im in enumerate(images):
            if im is not None:
                groups.setdefault(tuple(im.shape[1:]), []).append(k)
        per_call = self.config.encode_batch or (1 if self.device.type == "cpu" else len(images))
        latents: list[torch.Tensor | None] = [None] * len(images)
        for group in groups.values():
            for start in range(0, len(group), per_call):
                members = group[start : start + per_call]
                pixels = torch.cat([images[k] for k in members]).to(self.device)
                for k, lat in zip(members, self.model.encode_images(pixels).split(1)):  # (1, T, L, D) each
                    latents[k] = lat
        return latents

    def _step(self, batch: _Batch) -> None:
        rows = batch.rows
        fed = torch.tensor([[row.request.tokens[-1]] for row in rows], device=self.device)  # (B, 1)
        try:
            logits = batch.session.feed(fed)  # (B, V)
        except Exception as e:
            log.exception("a decode step failed; ending its %d requests", len(rows))
            for row in list(rows):
                self._finish(row, "error", e)
            self._drop(batch, list(rows))
            return
        with self._cond:
            self.decode_steps += 1
        greedy = logits.float().argmax(-1).tolist()
        finished = []
        for i, row in enumerate(rows):
            row.request.decode_steps += 1
            cfg = row.request.config
            if cfg.do_sample or cfg.repetition_penalty != 1.0:
                token = int(_pick(process_logits(logits[i : i + 1], row.seen(), cfg), cfg, row.generator)[0])
            else:
                token = greedy[i]
            if self._advance(row, token):
                finished.append(row)
        if finished:
            self._drop(batch, finished)

    def _advance(self, row: _Row, token: int) -> bool:
        """Take the row's next token; returns whether the row is finished."""
        request = row.request
        if request.first_token_at is None:
            request.first_token_at = time.monotonic()
        if token in row.stops:
            self._finish(row, "stop")
            return True
        request.tokens.append(token)
        stops = request.config.stop_strings
        text = self.tokenizer.decode(request.tokens, skip_special_tokens=True)
        cut = _first_stop_string(text, stops)
        if cut >= 0:
            row.text = text[:cut]
            self._finish(row, "stop", new=[token])
            return True
        row.text = text
        if len(request.tokens) >= row.limit:
            self._finish(row, "length", new=[token])
            return True
        piece = ""
        if not text.endswith("\ufffd"):  # a multi-byte character still incomplete: wait for it
            safe = len(text) - _held_back(text, stops)
            if safe > row.sent:
                piece, row.sent = text[row.sent : safe], safe
        request.text = text[: row.sent]
        request._emit(Output(piece, [token]))
        return False

    def _finish(self, row: _Row, reason: str, error: BaseException | None = None, new: list[int] | None = None) -> None:
        request = row.request
        if request.finish_reason is not None:  # already ended (the thread failing midway)
            return
        rest = row.text[row.sent :] if reason in ("stop", "length") else ""
        request.text = row.text if reason in ("stop", "length") else row.text[: row.sent]
        row.sent = len(row.text)
        with self._cond:
            self._running -= 1
        self._count(request, reason)
        request._emit(Output(rest, new or [], True, reason, error))

    def _drop(self, batch: _Batch, rows: list[_Row]) -> None:
        leaving = {id(row) for row in rows}
        keep = [i for i, row in enumerate(batch.rows) if id(row) not in leaving]
        batch.rows = [batch.rows[i] for i in keep]
        if not keep:
            batch.session = None
        else:
            batch.session.keep(torch.tensor(keep, device=self.device))
            batch.session.trim_padding()

    # ------------------------------------------------------------------ per request settings

    def _stops(self, cfg: GenerationConfig) -> set[int]:
        return set(cfg.stop_token_ids) if cfg.stop_token_ids is not None else self._base_stops

    def _generator(self, cfg: GenerationConfig) -> torch.Generator | None:
        if not cfg.do_sample:
            return None
        seed = cfg.seed if cfg.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
        return torch.Generator(device=self.device).manual_seed(seed)

    def _limit(self, request: Request) -> int:
        limit = request.config.max_new_tokens
        if self.max_context is not None:
            limit = min(limit, self.max_context - request.prompt_tokens)
        return max(limit, 1)
