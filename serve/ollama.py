"""Ollama's API on the single-image runtime, for the tools that talk to local vision models through it (PhotoPrism,
Home Assistant's LLM Vision, Open WebUI).

`POST /api/generate` and `POST /api/chat` answer about exactly one image (base64 in `images`) in Ollama's shapes:
NDJSON streaming by default, a last chunk with `done_reason` and durations in nanoseconds, and errors as
`{"error": "..."}`. A `format` ("json" or a JSON schema) asks the model for JSON and holds its answer to that shape.
Whatever model name a client sends is answered by the one loaded model; `keep_alive`, `system`, `template`, `raw`,
`context` and sampling options are accepted and have no effect (decoding is greedy and the model stays loaded).
`GET /api/tags`, `POST /api/show` and `GET /api/version` describe the server, and `GET /` answers
"Ollama is running", as clients probe it.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from molmocap.runtime import Result
from molmocap.runtime.info import plan_kinds
from molmocap.runtime.manifest import MANIFEST_NAME

from .openai_compat import ChatRequest, chat_request
from .payloads import ApiError, model_request, read_json

if TYPE_CHECKING:
    from .app import _Server

# The Ollama release whose API these routes follow: clients that check the version before using a feature
# (images, JSON schemas in `format`, `capabilities`) find one that has them.
OLLAMA_VERSION = "0.12.0"
# Probed by clients before they send any credentials, and telling nothing about the model: open like /health.
OPEN_PATHS = frozenset({"/", "/api/version"})
NDJSON = "application/x-ndjson"
RUNNING = "Ollama is running"
_SIZE_IN_NAME = re.compile(r"(?<![A-Za-z0-9.])(\d+(?:\.\d+)?[BM])(?![A-Za-z0-9])", re.IGNORECASE)


def owns(path: str) -> bool:
    """Whether `path` is one of Ollama's, whose errors take Ollama's shape."""
    return path.startswith("/api/")


def error_body(error: ApiError) -> dict:
    """Ollama's error shape, which its clients raise as `ResponseError(error)`."""
    return {"error": error.message}


@dataclass(frozen=True)
class OllamaRequest:
    """A generate or chat request: what the model is asked, with the JSON `format` its answer must have (None:
    Ollama's load request, with neither prompt nor image, which only warms the model)."""

    ask: ChatRequest | None
    model: str
    image_param: str = "images"


def parse_generate(body: dict, default_model: str, max_positions: int) -> OllamaRequest:
    """Check an /api/generate body: `prompt` and exactly one base64 image in `images`."""
    prompt = _string(body.get("prompt"), "prompt")
    images = _images(body.get("images"), "images")
    if not images and not prompt.strip():
        return _request(body, default_model, max_positions, None, "", "images")
    if len(images) != 1:
        raise _image_count_error(len(images), "images")
    return _request(body, default_model, max_positions, images[0], prompt, "images")


def parse_chat(body: dict, default_model: str, max_positions: int) -> OllamaRequest:
    """Check an /api/chat body: the last user message is the prompt, its image (or else the latest image of the
    conversation) the image; earlier turns and system messages are not shown to the model."""
    messages = body.get("messages")
    if messages is None or messages == []:
        return _request(body, default_model, max_positions, None, "", "messages")
    if not isinstance(messages, list):
        raise ApiError(400, "messages must be a list", param="messages")
    prompt, user, user_images, latest = "", None, [], []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ApiError(400, f"messages[{i}] must be an object with a role", param=f"messages[{i}]")
        content = _string(message.get("content"), f"messages[{i}].content")
        images = _images(message.get("images"), f"messages[{i}].images")
        latest = images[-1:] or latest
        if message["role"] == "user":
            prompt, user, user_images = content, i, images
    if user is None:
        raise ApiError(400, "messages has no user message", param="messages")
    if len(user_images) > 1:
        raise _image_count_error(len(user_images), f"messages[{user}].images")
    chosen = user_images or latest
    if not chosen:
        raise _image_count_error(0, "messages[].images")
    return _request(body, default_model, max_positions, chosen[0], prompt, f"messages[{user}].images")


def _request(body: dict, default_model: str, max_positions: int, image: str | None, prompt: str,
             image_param: str) -> OllamaRequest:
    """The fields generate and chat share: model, stream (default true), format and options."""
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise ApiError(400, "model must be a string", param="model")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise ApiError(400, "stream must be a boolean", param="stream")
    options = body.get("options") or {}
    if not isinstance(options, dict):
        raise ApiError(400, "options must be an object", param="options")
    fmt = body.get("format")
    if fmt not in (None, "", "json") and not isinstance(fmt, dict):
        raise ApiError(400, 'format must be "json" or a JSON schema object', param="format")
    model = model or default_model
    if image is None:
        return OllamaRequest(None, model)
    asked = model_request(options, _num_predict(options, max_positions), prompt=prompt, json_format=bool(fmt),
                          schema=fmt if isinstance(fmt, dict) else None)
    return OllamaRequest(chat_request(image, image_param, asked, model, stream is not False), model, image_param)


def _num_predict(options: dict, max_positions: int) -> int | None:
    """`options.num_predict`: None for the default, -1 (no limit) and -2 (fill the context) as the model's whole
    context, which generation stops at anyway."""
    value = options.get("num_predict")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value == 0 or value < -2:
        raise ApiError(400, "options.num_predict must be a positive integer, -1 or -2", param="num_predict")
    return max_positions if value < 0 else value


def _string(value: object, param: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ApiError(400, f"{param} must be a string", param=param)
    return value


def _images(value: object, param: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ApiError(400, f"{param} must be a list of base64 images", param=param)
    return value


def _image_count_error(found: int, param: str) -> ApiError:
    return ApiError(400, f"this server answers about exactly one image per request and found "
                         f"{'none' if not found else found} in {param}; send one base64 image", param=param)


def created_at(when: datetime | None = None) -> str:
    """`when` (default: now) in the RFC 3339 form, UTC, that Ollama stamps its answers and models with."""
    return (when or datetime.now(timezone.utc)).isoformat().replace("+00:00", "Z")


def final_fields(result: Result, reason: str, total_s: float) -> dict:
    """The last chunk's statistics: token counts and durations in nanoseconds (the model is loaded at startup)."""
    timings = result.timings
    prompt_s = sum(timings.get(key, 0.0) for key in ("preprocess_s", "vision_s", "prefill_s"))
    return {"done": True, "done_reason": reason, "total_duration": _ns(total_s), "load_duration": 0,
            "prompt_eval_count": result.prompt_tokens, "prompt_eval_duration": _ns(prompt_s),
            "eval_count": len(result.token_ids), "eval_duration": _ns(timings.get("total_s", 0.0) - prompt_s)}


def _ns(seconds: float) -> int:
    return max(0, round(seconds * 1e9))


class OllamaRoutes:
    """The routes, answering through the server's model worker; `runtime_error` maps a failed generation to an
    `ApiError` as every other route does."""

    def __init__(self, server: _Server, runtime_error: Callable[[Exception], ApiError]) -> None:
        self.server = server
        self.runtime_error = runtime_error

    def routes(self) -> list[Route]:
        """The routes to register on the app."""
        return [
            Route("/", self.root, methods=["GET"]),
            Route("/api/version", self.version, methods=["GET"]),
            Route("/api/tags", self.tags, methods=["GET"]),
            Route("/api/show", self.show, methods=["POST"]),
            Route("/api/generate", self.generate, methods=["POST"]),
            Route("/api/chat", self.chat, methods=["POST"]),
        ]

    async def root(self, request: Request) -> Response:
        return PlainTextResponse(RUNNING)

    async def version(self, request: Request) -> Response:
        return JSONResponse({"version": OLLAMA_VERSION})

    async def tags(self, request: Request) -> Response:
        manifest = self.server.captioner.manifest
        name = self.server.model_name
        return JSONResponse({"models": [{
            "name": name, "model": name, "modified_at": self._modified_at(),
            "size": sum(entry["bytes"] for entry in manifest.data["files"]), "digest": manifest.model_id,
            "details": self._details()}]})

    async def show(self, request: Request) -> Response:
        await read_json(request, self.server.max_request_bytes)
        manifest = self.server.captioner.manifest
        text, vision = manifest.geometry["text"], manifest.geometry["vision"]
        model_info = {
            "general.architecture": "molmo2",
            "general.basename": self.server.model_name,
            "molmo2.context_length": text["max_position_embeddings"],
            "molmo2.embedding_length": text["hidden_size"],
            "molmo2.block_count": text["num_layers"],
            "molmo2.vision.embedding_length": vision["hidden_size"],
            "molmo2.vision.block_count": vision["num_layers"],
            **{f"molmocap.plan.{part}": kind for part, kind in plan_kinds(manifest.data.get("plan") or {}).items()},
        }
        return JSONResponse({"modelfile": "", "parameters": "", "template": manifest.prompt["template"],
                             "details": self._details(), "model_info": model_info,
                             "capabilities": ["completion", "vision"], "modified_at": self._modified_at()})

    async def generate(self, request: Request) -> Response:
        return await self._answer(request, parse_generate, lambda text: {"response": text})

    async def chat(self, request: Request) -> Response:
        return await self._answer(request, parse_chat,
                                  lambda text: {"message": {"role": "assistant", "content": text}})

    def _details(self) -> dict:
        """Ollama's `details`: ONNX, the Molmo2 family, the size named in the source (e.g. Molmo2-4B) and the
        export's quantization plan."""
        data = self.server.captioner.manifest.data
        size = _SIZE_IN_NAME.search(Path(str(data.get("source") or "")).name)
        return {"parent_model": "", "format": "onnx", "family": "molmo2", "families": ["molmo2"],
                "parameter_size": size.group(1).upper() if size else "",
                "quantization_level": str(data.get("quant") or "")}

    def _modified_at(self) -> str:
        """When the model was exported (its manifest's mtime)."""
        mtime = (self.server.captioner.manifest.root / MANIFEST_NAME).stat().st_mtime
        return created_at(datetime.fromtimestamp(mtime, timezone.utc))

    async def _answer(self, request: Request, parse: Callable[[dict, str, int], OllamaRequest],
                      piece: Callable[[str], dict]) -> Response:
        """Generate for /api/generate or /api/chat, whole or as NDJSON chunks of `piece(text)`."""
        start = time.perf_counter()
        server = self.server
        body = await read_json(request, server.max_request_bytes)
        parsed = parse(body, server.model_name, server.captioner.max_positions)
        ask = parsed.ask
        head = {"model": parsed.model, "created_at": created_at()}
        if ask is None:
            return JSONResponse({**head, **piece(""), "done": True, "done_reason": "load"})
        image = server.image(ask.image, parsed.image_param)
        if ask.stream and not ask.request.reshaped:
            events = await server.stream(image, ask.request, request.is_disconnected)
            return StreamingResponse(self._chunks(ask, start, head, piece, events), media_type=NDJSON,
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        answer = await server.answer(image, ask.request, request.is_disconnected)
        reason = server.finish_reason(ask.request, answer.result)
        final = {**head, **piece(""), **final_fields(answer.result, reason, time.perf_counter() - start)}
        if not ask.stream:
            return JSONResponse({**final, **piece(answer.text)})
        # a JSON answer is whole only once it is checked: one piece, then the statistics
        return Response(_ndjson({**head, **piece(answer.text), "done": False}) + _ndjson(final), media_type=NDJSON)

    async def _chunks(self, ask: ChatRequest, start: float, head: dict, piece: Callable[[str], dict],
                      events: AsyncIterator[str | Result]) -> AsyncIterator[str]:
        """One line per text piece (`done: false`), then the statistics (`done: true`); a failure once the status
        line is sent is an `{"error": ...}` line, as Ollama sends it."""
        try:
            async for item in events:
                if isinstance(item, str):
                    yield _ndjson({**head, "created_at": created_at(), **piece(item), "done": False})
                    continue
                reason = self.server.finish_reason(ask.request, item)
                yield _ndjson({**head, "created_at": created_at(), **piece(""),
                               **final_fields(item, reason, time.perf_counter() - start)})
        except Exception as exc:  # noqa: BLE001 - reported in the stream
            yield _ndjson(error_body(self.runtime_error(exc)))
        finally:
            await events.aclose()


def _ndjson(data: dict) -> str:
    return json.dumps(data, ensure_ascii=False) + "\n"
