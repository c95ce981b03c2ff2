"""OpenAI chat completions on top of the single-image runtime: request parsing, response and stream chunk shapes.

The runtime answers one prompt about one image, so a request must carry exactly one image (an `image_url` part
holding a data URI or base64) and the prompt is the text of the last user message; earlier turns and system
messages are not shown to the model. Decoding is greedy: sampling parameters (temperature, top_p, ...) are
accepted and have no effect.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

from molmocap.runtime import Result
from molmocap.runtime.request import Answer, Request

from .payloads import ApiError, decode_image, model_request, optional_int


@dataclass(frozen=True)
class ChatRequest:
    """A chat-shaped request (OpenAI's or Ollama's): the image bytes, what the model is asked, the model name the
    client sent and how it wants the answer."""

    image: bytes
    request: Request
    model: str
    stream: bool
    include_usage: bool


def parse_chat_request(body: dict, default_model: str) -> ChatRequest:
    """Check a chat completions body and pull out the one image and the last user message's text."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list", param="messages")
    images: list[str] = []
    prompt = ""
    has_user = False
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ApiError(400, f"messages[{i}] must be an object with a role", param=f"messages[{i}]")
        texts = _message_parts(message.get("content"), f"messages[{i}].content", images)
        if message["role"] == "user":
            has_user = True
            prompt = "\n".join(texts)
    if not has_user:
        raise ApiError(400, "messages has no user message", param="messages")
    if len(images) != 1:
        found = "none" if not images else f"{len(images)}"
        raise ApiError(400, f"this server answers about exactly one image per request and found {found}; add one "
                            "image_url part with a data URI (data:image/png;base64,...)", param="messages")
    if body.get("n") not in (None, 1):
        raise ApiError(400, "n must be 1: decoding is greedy, so every choice would be the same", param="n")
    max_tokens = optional_int(body, "max_completion_tokens")
    if max_tokens is None:
        max_tokens = optional_int(body, "max_tokens")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise ApiError(400, "model must be a string", param="model")
    stream = body.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        raise ApiError(400, "stream must be a boolean", param="stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError(400, "stream_options must be an object", param="stream_options")
    return chat_request(images[0], "image_url", model_request(body, max_tokens, prompt=prompt), model or default_model,
                        bool(stream), include_usage=bool(stream) and options.get("include_usage") is True)


def chat_request(image: str, image_param: str, asked: Request, model: str, stream: bool,
                 include_usage: bool = False) -> ChatRequest:
    """What every chat-shaped route (OpenAI's, Ollama's) asks, with its image decoded."""
    return ChatRequest(decode_image(image, param=image_param), asked, model, stream, include_usage)


def _message_parts(content: object, where: str, images: list[str]) -> list[str]:
    """The text pieces of one message's content, appending its image URLs to `images`."""
    if content is None:
        return []
    if isinstance(content, str):
        return [content]
    if not isinstance(content, list):
        raise ApiError(400, f"{where} must be a string or a list of parts", param=where)
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url":
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            if not isinstance(url, str):
                raise ApiError(400, f"{where}[{j}].image_url must hold a url string", param=f"{where}[{j}]")
            images.append(url)
        else:
            raise ApiError(400, f"{where}[{j}]: unsupported content part {kind!r} (text and image_url are)",
                           param=f"{where}[{j}]")
    return texts


def model_list(name: str, created: int, demo_model: bool) -> dict:
    """The /v1/models answer: the one served model, flagged when it is the embedded demo model."""
    return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": "molmocap",
                                        "demo_model": demo_model}]}


def usage(result: Result) -> dict:
    """OpenAI's token counts of one generation."""
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": len(result.token_ids),
            "total_tokens": result.prompt_tokens + len(result.token_ids)}


def new_completion_id() -> str:
    """A fresh id in OpenAI's `chatcmpl-...` form, shared by every chunk of one stream."""
    return f"chatcmpl-{uuid.uuid4().hex}"


def completion(completion_id: str, request: ChatRequest, answer: Answer, reason: str) -> dict:
    """A `chat.completion` object."""
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": request.model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": answer.text}, "logprobs": None,
                     "finish_reason": reason}],
        "usage": usage(answer.result),
    }


def chunk(completion_id: str, request: ChatRequest, delta: dict | None, reason: str | None = None,
          result: Result | None = None) -> dict:
    """A `chat.completion.chunk`: a delta of the one choice, or (delta None) the usage-only last chunk."""
    body = {"id": completion_id, "object": "chat.completion.chunk", "created": int(time.time()),
            "model": request.model,
            "choices": [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None,
                                                  "finish_reason": reason}]}
    if result is not None:
        body["usage"] = usage(result)
    return body
