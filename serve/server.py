"""The ASGI app (Starlette): routes, request limits, and the bridge to the engine thread.

Handlers run on the event loop and never touch the model: a request's images are
decoded and its prompt tokenised in a worker thread, then it is submitted to the
:class:`~vlm.engine.Engine`, whose thread hands each event back to the loop
(``call_soon_threadsafe``). A client that disconnects cancels its request, so it stops
taking decode steps at once; the lifespan starts the engine and stops it on shutdown.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from vlm.engine import Engine, EngineClosed, Output, QueueFull, release_openmp_threads
from vlm.generate import GenerationConfig
from vlm.processor import Processor, Segment

from .media import MediaPolicy, load_image_url
from .protocol import (
    APIError,
    ChatRequest,
    Conversation,
    chunk,
    completion,
    error_body,
    new_id,
    parse_chat_request,
    usage,
)

log = logging.getLogger("vlm_serve")


@dataclass
class ServerSettings:
    model_name: str
    """The id clients send as ``model`` (``GET /v1/models`` lists it); others get 404."""
    media: MediaPolicy
    max_request_bytes: int = 20 * 2**20
    """Larger request bodies are refused with 413."""
    generation: GenerationConfig | None = None
    """Decoding for what a request does not set (``max_tokens``, lowered to what the context
    leaves, ``temperature``, ``top_p``, ``seed``, ``stop``; and ``top_k``,
    ``repetition_penalty`` and stop tokens, which requests cannot set). None: the
    checkpoint's defaults for chat, :func:`generation_defaults` of the model."""
    timeout_s: float | None = 600.0
    """Per request, from arrival to its last token; then 504 (or an error event in a stream)."""
    created: int = field(default_factory=lambda: int(time.time()))


def build_app(engine: Engine, processor: Processor, settings: ServerSettings) -> Starlette:
    """The app for one model. Its lifespan starts ``engine`` (unless it runs already) and
    shuts it down, ending whatever is still in flight."""
    defaults = settings.generation if settings.generation is not None else generation_defaults(engine.model)
    model_card = {"id": settings.model_name, "object": "model", "created": settings.created, "owned_by": "vlm"}
    max_images = engine.model.config.resampler.max_images

    async def health(request: Request) -> Response:
        stats = engine.stats()
        ok = engine.running and stats["accepting"]
        return JSONResponse({"status": "ok" if ok else "unavailable", **stats}, status_code=200 if ok else 503)

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [model_card]})

    async def model(request: Request) -> Response:
        if request.path_params["model"] != settings.model_name:
            raise _unknown_model(request.path_params["model"])
        return JSONResponse(model_card)

    async def chat_completions(request: Request) -> Response:
        body = await _read_json(request, settings.max_request_bytes)
        chat = parse_chat_request(body, max_images)
        if chat.model != settings.model_name:
            raise _unknown_model(chat.model)
        input_ids, images = await asyncio.to_thread(_prepare, processor, chat.conversation, settings.media)
        config = _generation_config(chat, input_ids.shape[1], engine.max_context, defaults)
        cid = new_id()
        loop = asyncio.get_running_loop()
        if chat.stream:
            events: asyncio.Queue[Output] = asyncio.Queue()
            listener = _to_loop(loop, events.put_nowait)
        else:
            done: asyncio.Future[Output] = loop.create_future()

            def finish(out: Output) -> None:
                if out.finished and not done.done():
                    done.set_result(out)

            listener = _to_loop(loop, finish)
        try:
            handle = engine.submit(input_ids, images, config, settings.timeout_s, listener, cid)
        except QueueFull as e:
            retry = str(max(1, round(e.retry_after)))
            raise APIError(
                429, f"the server is busy: {e}", "rate_limit_error", None, "queue_full", {"Retry-After": retry}
            ) from None
        except EngineClosed:
            raise APIError(503, "the server is shutting down", "server_error", code="shutting_down") from None
        except ValueError as e:
            raise APIError(400, str(e)) from None
        if chat.stream:
            return StreamingResponse(
                _stream(handle, events, cid, settings.model_name, chat.include_usage, settings.timeout_s),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        out = await _until_done_or_gone(request, handle, done)
        if out is None:  # the client went away: nobody reads an answer
            return Response(status_code=499)
        _raise_for(out, settings)
        return JSONResponse(
            completion(
                cid, settings.model_name, handle.text, _openai_reason(out), handle.prompt_tokens, len(handle.tokens)
            )
        )

    @asynccontextmanager
    async def lifespan(app):
        if not engine.running:
            engine.start()
        try:
            yield
        finally:
            # uvicorn has waited for the open requests (up to its graceful-shutdown timeout)
            # and cancelled the rest; end anything still in the engine and join its thread.
            await asyncio.to_thread(engine.shutdown)

    async def api_error(request: Request, exc: APIError) -> Response:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    async def http_error(request: Request, exc: HTTPException) -> Response:
        return JSONResponse(error_body(exc.status_code, exc.detail), status_code=exc.status_code, headers=exc.headers)

    async def server_error(request: Request, exc: Exception) -> Response:
        log.error("request failed", exc_info=exc)
        return JSONResponse(error_body(500, "internal server error"), status_code=500)

    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/models/{model:path}", model, methods=["GET"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    ]
    handlers = {APIError: api_error, HTTPException: http_error, Exception: server_error}
    return Starlette(routes=routes, exception_handlers=handlers, lifespan=lifespan)


# ---------------------------------------------------------------------- request → engine


async def _read_json(request: Request, limit: int):
    declared = request.headers.get("content-length")
    too_large = declared is not None and declared.isdigit() and int(declared) > limit
    size = 0
    body = bytearray()
    async for piece in request.stream():
        size += len(piece)
        if size > limit:
            too_large = True
        if too_large:
            if size > 8 * limit + 2**20:  # read on a while so that the client sees the answer, then stop
                break
            continue
        body += piece
    if too_large:
        raise APIError(
            413, f"the request is larger than this server's limit of {limit} bytes", code="request_too_large"
        )
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise APIError(400, f"the body is not valid JSON ({e})") from None


def _prepare(processor: Processor, conv: Conversation, media: MediaPolicy):
    """Images fetched and decoded, the prompt rendered and tokenised (in a worker thread).
    Every piece of user text goes through the processor's chat format, which escapes it:
    no request can write a control token such as ``<image>`` or ``<|im_end|>``. The
    thread's OpenMP workers are let go afterwards, so the engine thread's stay quick to
    wake (:func:`vlm.engine.release_openmp_threads`)."""
    try:
        return _prepare_inputs(processor, conv, media)
    finally:
        release_openmp_threads()


def _prepare_inputs(processor: Processor, conv: Conversation, media: MediaPolicy):
    images = [load_image_url(url, media, f"image {k + 1}") for k, url in enumerate(conv.image_urls)]
    chat = processor
    if conv.system is not None and processor.uses_chat_template:
        chat = copy.copy(processor)  # a per-request system prompt; the shared processor stays as it is
        chat.system_prompt = conv.system
    try:
        segments = chat.chat_segments(conv.turns, images_per_turn=conv.images_per_turn)
        if conv.system is not None and not processor.uses_chat_template:
            segments = [Segment(processor.escape(conv.system) + "\n", False), *segments]
        batch = processor([segments], [images])
    except ValueError as e:
        raise APIError(400, str(e), param="messages") from None
    return batch["input_ids"], batch["pixel_values"]


def generation_defaults(model, max_tokens: int | None = None, temperature: float | None = None) -> GenerationConfig:
    """The server's decoding defaults: the checkpoint's for chat, as ``vlm chat`` decodes
    (``VQA.generation_config``: its ``generation_config.json``, top-level options then the
    ``vqa`` section, else the task's own defaults), under the server's ``max_tokens`` and
    ``temperature`` (0: greedy) where given. The engine decodes one token a step for every
    row: prompt-lookup drafts (an exact speed-up of greedy decoding) are left out, and beams
    are refused with the reason."""
    from vlm.tasks import VQA

    config = VQA.generation_config(model)
    if max_tokens is not None:
        config.max_new_tokens = max_tokens
    if temperature is not None:
        config.do_sample = temperature > 0
        config.temperature = temperature if temperature > 0 else config.temperature
    config.prompt_lookup = 0
    if config.num_beams != 1:
        raise ValueError(
            f"the checkpoint's generation defaults for chat ask for num_beams={config.num_beams}; "
            "the server decodes greedily or by sampling (set num_beams to 1 in its generation_config.json)"
        )
    return config.validate()


def _generation_config(chat: ChatRequest, prompt_tokens: int, context: int | None, defaults: GenerationConfig):
    """The request's decoding: what it sets, ``defaults`` for the rest."""
    room = None if context is None else context - prompt_tokens
    if room is not None and room < 1:
        raise APIError(
            400,
            f"the messages take {prompt_tokens} tokens; this model's context is {context}",
            param="messages",
            code="context_length_exceeded",
        )
    max_tokens = chat.max_tokens
    if max_tokens is None:
        max_tokens = defaults.max_new_tokens if room is None else min(defaults.max_new_tokens, room)
    elif room is not None and max_tokens > room:
        raise APIError(
            400,
            f"this model's context is {context} tokens; the messages take {prompt_tokens} and "
            f"max_tokens asks for {max_tokens} more",
            param="max_tokens",
            code="context_length_exceeded",
        )
    sample, temperature = defaults.do_sample, defaults.temperature
    if chat.temperature is not None:
        sample = chat.temperature > 0
        temperature = chat.temperature if sample else temperature
    return defaults.replace(
        max_new_tokens=max_tokens,
        do_sample=sample,
        temperature=temperature,
        top_p=chat.top_p if chat.top_p is not None else defaults.top_p,
        seed=chat.seed if chat.seed is not None else defaults.seed,
        stop_strings=chat.stop if chat.stop is not None else defaults.stop_strings,
        stop_token_ids=() if chat.ignore_eos else defaults.stop_token_ids,
    )


def _to_loop(loop: asyncio.AbstractEventLoop, callback):
    """An engine listener that runs ``callback(output)`` on the event loop."""

    def listener(out: Output) -> None:
        try:
            loop.call_soon_threadsafe(callback, out)
        except RuntimeError:  # the loop has closed: the server is gone, nobody waits
            pass

    return listener


async def _until_done_or_gone(request: Request, handle, done: asyncio.Future) -> Output | None:
    """The final event, or None when the client disconnects first (the request is then cancelled)."""
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({done, gone}, return_when=asyncio.FIRST_COMPLETED)
        return done.result() if done.done() else None
    finally:
        gone.cancel()
        handle.cancel()  # a no-op when it has finished; otherwise the client left or we were cancelled


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _openai_reason(out: Output) -> str:
    return "length" if out.finish_reason == "length" else "stop"


def _failure(out: Output, timeout_s: float | None) -> APIError | None:
    if out.finish_reason in ("stop", "length"):
        return None
    if out.finish_reason == "timeout":
        return APIError(504, f"the request took longer than {timeout_s:g} s", "timeout_error", code="timeout")
    if out.finish_reason in ("shutdown", "cancelled"):
        return APIError(503, "the server is shutting down", "server_error", code="shutting_down")
    log.error("request failed: %r", out.error)
    return APIError(500, "the model failed on this request", "server_error")


def _raise_for(out: Output, settings: ServerSettings) -> None:
    error = _failure(out, settings.timeout_s)
    if error is not None:
        raise error


async def _stream(
    handle, events: asyncio.Queue, cid: str, model: str, include_usage: bool, timeout_s: float | None
) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk format. Starlette cancels this generator when
    the client disconnects; ``finally`` then cancels the request."""
    created = int(time.time())

    def sse(data) -> str:
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

    try:
        yield sse(chunk(cid, model, created, {"role": "assistant", "content": ""}))
        while True:
            out: Output = await events.get()
            if out.text:
                yield sse(chunk(cid, model, created, {"content": out.text}))
            if not out.finished:
                continue
            error = _failure(out, timeout_s)
            if error is not None:
                yield sse(error.body())
            else:
                yield sse(chunk(cid, model, created, {}, _openai_reason(out)))
                if include_usage:
                    yield sse(chunk(cid, model, created, None, usage=usage(handle.prompt_tokens, len(handle.tokens))))
            yield "data: [DONE]\n\n"
            return
    finally:
        handle.cancel()


def _unknown_model(name: str) -> APIError:
    return APIError(
        404, f"the model '{name}' does not exist (see GET /v1/models)", param="model", code="model_not_found"
    )
