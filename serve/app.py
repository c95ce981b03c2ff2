"""The HTTP API: Molmo-style caption and ask routes, OpenAI chat completions, Ollama's API, health and metrics.

One loaded model serves every request through a single worker thread (see `worker.py`). The app never opens a
connection of its own: images arrive inline, and remote image URLs are refused.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from molmocap.runtime import Captioner, InputError, MolmocapError, Result
from molmocap.runtime.batching import DEFAULT_MAX_BATCH
from molmocap.runtime.demo import DEMO_MODEL_NAME, DEMO_NOTICE, is_demo_model
from molmocap.runtime.request import Answer, rounded_timings
from molmocap.runtime.request import Request as ModelRequest
from molmocap.runtime.styles import StyleOutputError

from . import ollama, openai_compat
from .metrics import Metrics
from .payloads import (
    DEFAULT_MAX_REQUEST_BYTES,
    ApiError,
    decode_image,
    model_request,
    optional_int,
    optional_str,
    read_json,
)
from .worker import (
    DEFAULT_MAX_QUEUE,
    DEFAULT_REQUEST_TIMEOUT_S,
    ClientGone,
    Gone,
    ImageData,
    ImageRejected,
    ModelWorker,
    QueueFull,
    ShuttingDown,
    Stalled,
    TimedOut,
    finish_reason,
)

log = logging.getLogger("molmocap.serve")

OPEN_PATHS = frozenset({"/health", *ollama.OPEN_PATHS})
CAPTION_FIELDS = ("image", "prompt", "style", "lang", "max_new_tokens", "max_crops")
ASK_FIELDS = ("image", "prompt", "max_new_tokens", "max_crops")


def create_app(captioner: Captioner, api_key: str | None = None,
               max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES, max_queue: int = DEFAULT_MAX_QUEUE,
               request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S, max_batch: int = DEFAULT_MAX_BATCH) -> Starlette:
    """The ASGI app serving `captioner`; with `api_key`, every route but `OPEN_PATHS` (/health, and / and
    /api/version, which Ollama clients probe) wants `Authorization: Bearer`. Up to `max_batch` generations decode
    together (see `worker.py`)."""
    server = _Server(captioner, max_request_bytes, max_queue, request_timeout_s, max_batch)
    routes = [
        Route("/health", server.health, methods=["GET"]),
        Route("/metrics", server.metrics_route, methods=["GET"]),
        Route("/v1/models", server.models, methods=["GET"]),
        Route("/v1/caption", server.caption, methods=["POST"]),
        Route("/v1/ask", server.ask, methods=["POST"]),
        Route("/v1/chat/completions", server.chat_completions, methods=["POST"]),
        *ollama.OllamaRoutes(server, _runtime_error).routes(),
    ]
    middleware = [Middleware(_Observe, metrics=server.metrics, routes=frozenset(r.path for r in routes))]
    if api_key:
        middleware.append(Middleware(_BearerAuth, api_key=api_key))
    handlers = {ApiError: _api_error_response, HTTPException: _http_error_response, Exception: _internal_error}
    app = Starlette(routes=routes, middleware=middleware, exception_handlers=handlers, lifespan=server.lifespan)
    app.state.server = server
    return app


class _Server:
    """The routes, around one model worker and the metrics."""

    def __init__(self, captioner: Captioner, max_request_bytes: int, max_queue: int,
                 request_timeout_s: float, max_batch: int) -> None:
        self.captioner = captioner
        self.worker = ModelWorker(captioner, max_queue, request_timeout_s, max_batch)
        self.metrics = Metrics()
        self.max_request_bytes = max_request_bytes
        source = captioner.manifest.data.get("source")
        self.demo_model = is_demo_model(captioner.manifest)
        if self.demo_model:
            self.model_name = DEMO_MODEL_NAME
        else:
            self.model_name = Path(str(source)).name if source else captioner.manifest.root.name

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        """Stop the model worker when the server stops."""
        try:
            yield
        finally:
            self.worker.close()

    async def health(self, request: Request) -> Response:
        manifest = self.captioner.manifest
        health = {"status": "ok", "model": str(manifest.root), "model_name": self.model_name,
                  "source": manifest.data.get("source"), "demo_model": self.demo_model,
                  "uptime_s": round(time.time() - self.metrics.started, 3),
                  "pending_generations": self.worker.pending, "waiting_generations": self.worker.waiting,
                  "max_queue": self.worker.max_queue}
        if self.demo_model:
            health["notice"] = DEMO_NOTICE
        return JSONResponse(health)

    async def metrics_route(self, request: Request) -> Response:
        accept = request.headers.get("accept", "")
        if "text/plain" in accept or "openmetrics" in accept:
            return PlainTextResponse(self.metrics.prometheus(self.worker.pending, self.worker.outcomes()),
                                     media_type="text/plain; version=0.0.4; charset=utf-8")
        return JSONResponse(self.metrics.snapshot(self.worker.pending, self.worker.outcomes()))

    async def models(self, request: Request) -> Response:
        return JSONResponse(openai_compat.model_list(self.model_name, int(self.metrics.started), self.demo_model))

    async def caption(self, request: Request) -> Response:
        body = await self._body(request, CAPTION_FIELDS)
        return await self._answer(request, body, optional_str(body, "prompt"), optional_str(body, "style"),
                                  optional_str(body, "lang"))

    async def ask(self, request: Request) -> Response:
        body = await self._body(request, ASK_FIELDS)
        prompt = optional_str(body, "prompt")
        if prompt is None:
            raise ApiError(400, "/v1/ask needs a prompt: the question about the image", param="prompt")
        return await self._answer(request, body, prompt)

    async def _body(self, request: Request, fields: tuple[str, ...]) -> dict:
        body = await read_json(request, self.max_request_bytes)
        unknown = sorted(set(body) - set(fields))
        if unknown:
            raise ApiError(400, f"unknown field {', '.join(map(repr, unknown))}; this route takes "
                                f"{', '.join(fields)}", param=unknown[0])
        return body

    async def _answer(self, request: Request, body: dict, prompt: str | None, style: str | None = None,
                      lang: str | None = None) -> Response:
        """Run the model for /v1/caption and /v1/ask and answer in the hosted Molmo API's shape."""
        asked = model_request(body, prompt=prompt, style=style, lang=lang,
                              max_new_tokens=optional_int(body, "max_new_tokens"))
        image = self.image(decode_image(body.get("image")), "image")
        answer = await self.answer(image, asked, request.is_disconnected)
        result = answer.result
        return JSONResponse({**answer.fields(), "prompt_tokens": result.prompt_tokens,
                             "completion_tokens": len(result.token_ids),
                             "finish_reason": self.finish_reason(asked, result),
                             "timings": rounded_timings(result.timings)})

    async def chat_completions(self, request: Request) -> Response:
        chat = openai_compat.parse_chat_request(await read_json(request, self.max_request_bytes), self.model_name)
        image = self.image(chat.image, "image_url")
        completion_id = openai_compat.new_completion_id()
        if not chat.stream:
            answer = await self.answer(image, chat.request, request.is_disconnected)
            reason = self.finish_reason(chat.request, answer.result)
            return JSONResponse(openai_compat.completion(completion_id, chat, answer, reason))
        events = await self.stream(image, chat.request, request.is_disconnected)
        return StreamingResponse(self._sse(chat, completion_id, events), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def _sse(self, chat: openai_compat.ChatRequest, completion_id: str,
                   events: AsyncIterator[str | Result]) -> AsyncIterator[str]:
        """OpenAI's stream: a role chunk, content chunks, a finish chunk, optionally usage, then [DONE]."""

        def event(data: dict) -> str:
            return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

        try:
            yield event(openai_compat.chunk(completion_id, chat, {"role": "assistant", "content": ""}))
            async for item in events:
                if isinstance(item, str):
                    yield event(openai_compat.chunk(completion_id, chat, {"content": item}))
                    continue
                yield event(openai_compat.chunk(completion_id, chat, {}, self.finish_reason(chat.request, item)))
                if chat.include_usage:
                    yield event(openai_compat.chunk(completion_id, chat, None, result=item))
            yield "data: [DONE]\n\n"
        except Exception as exc:  # noqa: BLE001 - the status line is sent: report in the stream, as OpenAI does
            yield event(_runtime_error(exc).body())
        finally:
            await events.aclose()

    def image(self, data: bytes, param: str) -> ImageData:
        """The image, to be decoded on the model thread just before its generation: then one decoded image (up to
        `MAX_PIXELS`) is in memory however many requests wait, and decoding never runs on the event loop."""
        return ImageData(data, param)

    async def answer(self, image: ImageData, asked: ModelRequest, gone: Gone | None = None) -> Answer:
        """The whole answer to `asked`, in its shape; `gone` (the request's `is_disconnected`) lets a client that
        left cancel it. A style or JSON format the answer cannot be held to is a 500."""
        try:
            result = await self.worker.generate(image, asked.prompt_for(self.captioner.manifest),
                                                asked.max_new_tokens, asked.max_crops, gone)
        except Exception as exc:  # noqa: BLE001 - mapped to a status code and a one-line message
            raise _runtime_error(exc) from None
        self._count_tokens(result)
        try:
            return asked.answer(result)
        except StyleOutputError as exc:
            code = "format_error" if asked.json_format else "style_output_error"
            raise ApiError(500, str(exc), type="server_error", code=code) from None

    async def stream(self, image: ImageData, asked: ModelRequest, gone: Gone | None = None
                     ) -> AsyncIterator[str | Result]:
        """The text pieces of the answer to `asked` as they come, then its `Result` (counted in the metrics). An
        error before the first piece is raised here, as an `ApiError`, so that it gets its status code; a later one
        is raised by the iterator."""
        events = self.worker.stream(image, asked.prompt_for(self.captioner.manifest), asked.max_new_tokens,
                                    asked.max_crops, gone)
        try:
            first = await anext(events)
        except Exception as exc:  # noqa: BLE001 - errors before the first token get a proper status code
            await events.aclose()
            raise _runtime_error(exc) from None

        async def counted() -> AsyncIterator[str | Result]:
            try:
                item = first
                while isinstance(item, str):
                    yield item
                    item = await anext(events)
                self._count_tokens(item)
                yield item
            finally:
                await events.aclose()

        return counted()

    def finish_reason(self, asked: ModelRequest, result: Result) -> str:
        """Why the generation of `result` ended: "stop" at a stop token, "length" at a token limit."""
        return finish_reason(result, asked.max_new_tokens, self.captioner.max_positions)

    def _count_tokens(self, result: Result) -> None:
        self.metrics.add_tokens(result.prompt_tokens, len(result.token_ids))


def _runtime_error(exc: Exception) -> ApiError:
    """A failure of the model call as an `ApiError`: bad input is the client's (400), the rest the server's."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, InputError):
        return ApiError(400, str(exc))
    if isinstance(exc, ImageRejected):
        return ApiError(400, str(exc), param=exc.param)
    if isinstance(exc, QueueFull):
        return ApiError(503, f"the server is busy: {exc}; retry after {exc.retry_after_s} s", type="server_error",
                        code="queue_full", headers={"Retry-After": str(exc.retry_after_s)})
    if isinstance(exc, TimedOut):
        return ApiError(504, "the generation took longer than this server's request timeout and was cancelled "
                             "(see `molmocap serve --request-timeout`)", type="server_error", code="timeout")
    if isinstance(exc, Stalled):
        return ApiError(408, "the client stopped reading the stream; its generation was cancelled",
                        code="client_stalled")
    if isinstance(exc, ClientGone):  # nobody reads this answer: the status shows in /metrics (nginx's 499)
        return ApiError(499, "the client closed the connection; its generation was cancelled",
                        code="client_closed_request")
    if isinstance(exc, ShuttingDown):
        return ApiError(503, "the server is shutting down", type="server_error")
    if isinstance(exc, MolmocapError):
        return ApiError(500, str(exc), type="server_error")
    log.error("generation failed", exc_info=exc)
    return ApiError(500, "internal error while generating; see the server log", type="server_error")


def _error_response(path: str, error: ApiError, headers: dict[str, str] | None = None) -> JSONResponse:
    """`error` in the shape of the API `path` belongs to: Ollama's on its routes, OpenAI's elsewhere."""
    body = ollama.error_body(error) if ollama.owns(path) else error.body()
    return JSONResponse(body, status_code=error.status, headers=headers)


async def _api_error_response(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return _error_response(request.url.path, exc, exc.headers)


async def _http_error_response(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    error = ApiError(exc.status_code, exc.detail, type="invalid_request_error")
    return _error_response(request.url.path, error, exc.headers)


async def _internal_error(request: Request, exc: Exception) -> Response:
    log.error("unhandled error on %s", request.url.path, exc_info=exc)
    return _error_response(request.url.path,
                           ApiError(500, "internal server error; see the server log", type="server_error"))


class _Observe:
    """ASGI middleware recording each HTTP request's route, status and latency (to the end of its body)."""

    def __init__(self, app: ASGIApp, metrics: Metrics, routes: frozenset[str]) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def observed_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, observed_send)
        finally:
            route = scope["path"] if scope["path"] in self.routes else "other"  # bounded label set
            self.metrics.observe(route, status, time.perf_counter() - start)


class _BearerAuth:
    """ASGI middleware answering 401 unless `Authorization: Bearer <api_key>`; `OPEN_PATHS` stay open."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.api_key = api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.api_key):
            await self.app(scope, receive, send)
            return
        error = ApiError(401, "missing or wrong API key: send `Authorization: Bearer <key>`",
                         code="invalid_api_key")
        response = _error_response(scope["path"], error, {"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)
