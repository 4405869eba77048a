"""The OpenAI chat-completions protocol: checking a request, its messages as chat turns,
error bodies and response shapes. No web framework and no torch here.

What is accepted is what the model can do; a field that would change the answer in a
way the server cannot honour (``n`` > 1, tools, log-probabilities, penalties, a JSON
response format) is refused with a 400 that names it, rather than silently ignored.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any


class APIError(Exception):
    """An error answer in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def error_body(status: int, message: str) -> dict[str, Any]:
    """The body for a plain HTTP status (unknown path, wrong method, server failure)."""
    kind = {404: "not_found_error", 405: "invalid_request_error"}.get(status, "invalid_request_error")
    if status >= 500:
        kind = "server_error"
    return APIError(status, message, kind).body()


# ---------------------------------------------------------------------- the request


@dataclass
class ChatRequest:
    """A checked ``POST /v1/chat/completions`` body."""

    model: str
    conversation: Conversation
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] | None = None
    """None: the request sets none (the server's defaults apply)."""
    stream: bool = False
    include_usage: bool = False
    ignore_eos: bool = False
    """An extension (as in vLLM): decode up to ``max_tokens`` whatever the model says; for benchmarks."""


@dataclass
class Conversation:
    """Messages as the processor takes them: an optional system text, then (question,
    answer) turns whose last answer is None, with the images each question shows."""

    system: str | None = None
    turns: list[tuple[str, str | None]] = field(default_factory=list)
    images_per_turn: list[int] = field(default_factory=list)
    image_urls: list[str] = field(default_factory=list)


# Fields that change the answer in ways this server does not do: refused unless at their
# default (the value OpenAI's API gives them when they are left out).
_UNSUPPORTED = {
    "n": (None, 1),
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "tools": (None, []),
    "functions": (None, []),
    "tool_choice": (None, "none", "auto"),
    "function_call": (None, "none", "auto"),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}),
    "audio": (None,),
    "prediction": (None,),
}


def parse_chat_request(body: Any, max_images: int) -> ChatRequest:
    """Check a request body; raises :class:`APIError` (400) naming the field at fault."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    for name, allowed in _UNSUPPORTED.items():
        if name in body and body[name] not in allowed:
            what = "n > 1" if name == "n" else name
            raise APIError(400, f"{what} is not supported by this server", param=name, code="unsupported_parameter")
    response_format = body.get("response_format")
    if response_format not in (None, {"type": "text"}):
        raise APIError(400, "only the text response format is supported", param="response_format")
    modalities = body.get("modalities")
    if modalities not in (None, ["text"]):
        raise APIError(400, "only text output is supported", param="modalities")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise APIError(400, "'model' is required (see GET /v1/models)", param="model")
    max_tokens = _int(body, "max_completion_tokens", 1)
    if max_tokens is None:
        max_tokens = _int(body, "max_tokens", 1)
    temperature = _number(body, "temperature", 0.0, 2.0)
    top_p = _number(body, "top_p", 0.0, 1.0)
    if top_p is not None and top_p == 0.0:
        raise APIError(400, "top_p must be > 0", param="top_p")
    seed = _int(body, "seed", None)
    stop = body.get("stop")
    if stop is None:
        pass
    elif isinstance(stop, str):
        stop = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= 4:
        stop = tuple(stop)
    else:
        raise APIError(400, "'stop' must be a string or a list of up to 4 strings", param="stop")
    if stop is not None and any(not s for s in stop):
        raise APIError(400, "stop strings must not be empty", param="stop")
    stream = _bool(body, "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise APIError(400, "'stream_options' must be an object", param="stream_options")
    include_usage = bool(options and options.get("include_usage"))
    return ChatRequest(
        model=model,
        conversation=parse_messages(body.get("messages"), max_images),
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        stop=stop,
        stream=stream,
        include_usage=include_usage,
        ignore_eos=_bool(body, "ignore_eos"),
    )


def parse_messages(messages: Any, max_images: int) -> Conversation:
    """OpenAI messages → :class:`Conversation`. System (or developer) messages come first;
    then user and assistant alternate (consecutive ones of a role are joined) and a user
    message comes last. Images go in user messages; they are shown at the start of their
    message, in order (the processor's chat format)."""
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list", param="messages")
    conv = Conversation()
    system: list[str] = []
    question: list[str] | None = None
    answer: list[str] | None = None
    images = 0
    for i, message in enumerate(messages):
        param = f"messages[{i}]"
        if not isinstance(message, dict):
            raise APIError(400, f"{param} must be an object", param=param)
        role = message.get("role")
        content = message.get("content")
        if role in ("system", "developer"):
            if question is not None:
                raise APIError(400, f"{param}: system messages must come before the conversation", param=param)
            system.append(_text_only(content, param))
        elif role == "user":
            if answer is not None:
                conv.turns.append(("\n".join(question), "\n".join(answer)))
                conv.images_per_turn.append(images)
                question, answer, images = None, None, 0
            text, urls = _user_content(content, param)
            question = [*(question or []), text]
            images += len(urls)
            conv.image_urls += urls
        elif role == "assistant":
            if message.get("tool_calls") or message.get("function_call"):
                raise APIError(400, f"{param}: tool calls are not supported", param=param)
            if question is None:
                raise APIError(400, f"{param}: an assistant message must follow a user message", param=param)
            answer = [*(answer or []), _text_only(content, param)]
        elif role in ("tool", "function"):
            raise APIError(400, f"{param}: tool messages are not supported", param=param)
        else:
            raise APIError(400, f"{param}: unknown role {role!r}", param=f"{param}.role")
    if question is None or answer is not None:
        raise APIError(400, "the last message must be from the user", param="messages")
    conv.turns.append(("\n".join(question), None))
    conv.images_per_turn.append(images)
    conv.system = "\n".join(system) if system else None
    if len(conv.image_urls) > max_images:
        raise APIError(400, f"{len(conv.image_urls)} images; this model takes at most {max_images}", param="messages")
    return conv


def _user_content(content: Any, param: str) -> tuple[str, list[str]]:
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise APIError(400, f"{param}.content must be a string or a list of parts", param=f"{param}.content")
    texts, urls = [], []
    for j, part in enumerate(content):
        where = f"{param}.content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            if not isinstance(url, str) or not url:
                raise APIError(400, f"{where}: image_url needs a 'url'", param=where)
            urls.append(url)
        else:
            raise APIError(400, f"{where}: only 'text' and 'image_url' parts are supported", param=where)
    return "\n".join(texts), urls


def _text_only(content: Any, param: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content
    ):
        return "\n".join(p["text"] for p in content)
    raise APIError(400, f"{param}.content must be text (images go in user messages)", param=f"{param}.content")


def _int(body: dict, name: str, minimum: int | None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
        bound = f" >= {minimum}" if minimum is not None else ""
        raise APIError(400, f"'{name}' must be an integer{bound}", param=name)
    return value


def _number(body: dict, name: str, low: float, high: float) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise APIError(400, f"'{name}' must be a number from {low:g} to {high:g}", param=name)
    return float(value)


def _bool(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise APIError(400, f"'{name}' must be true or false", param=name)
    return value


# ---------------------------------------------------------------------- responses


def new_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion(cid: str, model: str, text: str, finish_reason: str, prompt_tokens: int, completion_tokens: int):
    return {
        "id": cid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish_reason,
                "logprobs": None,
            }
        ],
        "usage": usage(prompt_tokens, completion_tokens),
        "system_fingerprint": None,
    }


def chunk(cid: str, model: str, created: int, delta: dict | None, finish_reason: str | None = None, usage=None):
    """One streamed ``chat.completion.chunk``; ``delta=None`` is the usage chunk (no choices)."""
    out = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model}
    out["choices"] = (
        [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]
    )
    out["system_fingerprint"] = None
    if usage is not None or delta is None:
        out["usage"] = usage
    return out
