"""Request bodies: the size-limited JSON read, inline images (base64 or data URIs) and field checks.

Every problem becomes an `ApiError`, which the app renders as an OpenAI-style error body with its status code.
"""

from __future__ import annotations

import base64
import binascii
import json
import re

from starlette.requests import ClientDisconnect, Request

from molmocap.runtime.preprocess import MAX_CROPS
from molmocap.runtime.request import Request as ModelRequest
from molmocap.runtime.request import RequestError

DEFAULT_MAX_REQUEST_BYTES = 20 * 1024 * 1024

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")


class ApiError(Exception):
    """An error answered to the client: HTTP status, one-line message, OpenAI error type and code, extra headers."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers = headers

    def body(self) -> dict:
        """The OpenAI error shape, which the official clients parse into their exceptions."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


async def read_json(request: Request, max_bytes: int) -> dict:
    """The request body as a JSON object, refused with 413 past `max_bytes` (499 when the client leaves mid-body).

    The declared Content-Length is checked first, then the bytes are counted as they arrive, so a chunked or
    lying client cannot make the server buffer more than the limit.
    """
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise ApiError(400, "invalid Content-Length header")
        if int(declared) > max_bytes:
            raise _too_large(max_bytes)
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_bytes:
                raise _too_large(max_bytes)
            chunks.append(chunk)
    except ClientDisconnect:  # nobody reads the answer; it shows in /metrics as nginx's 499, not as a server error
        raise ApiError(499, "the client closed the connection before sending the whole body",
                       code="client_closed_request") from None
    try:
        data = json.loads(b"".join(chunks))
    except (UnicodeDecodeError, ValueError):
        raise ApiError(400, "the request body is not valid JSON") from None
    except RecursionError:  # json's own depth limit (about 1,000 levels), which a 20 MiB body can pass
        raise ApiError(400, "the request body's JSON is nested too deeply") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return data


def _too_large(max_bytes: int) -> ApiError:
    return ApiError(413, f"the request body is larger than this server's limit of {max_bytes} bytes "
                         "(see `molmocap serve --max-request-mb`)", code="request_too_large")


def decode_image(value: object, param: str = "image") -> bytes:
    """Image bytes from base64 text or a `data:` URI; remote and file URLs are refused: the server is offline."""
    if not isinstance(value, str) or not value.strip():
        raise ApiError(400, f"{param} must be a non-empty string: base64 image data or a data URI", param=param)
    text = value.strip()
    scheme = _SCHEME.match(text)
    if scheme and scheme.group(1).lower() != "data":
        raise ApiError(400, f"{param}: this server is offline and does not fetch {scheme.group(1).lower()}: URLs; "
                            "send the image inline as a data URI (data:image/png;base64,...) or as base64",
                       code="remote_image_refused", param=param)
    if scheme:
        header, sep, text = text.partition(",")
        if not sep or not header.lower().endswith(";base64"):
            raise ApiError(400, f"{param}: only base64 data URIs are accepted (data:image/...;base64,...)",
                           param=param)
    try:
        data = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, f"{param} is not valid base64", param=param) from None
    if not data:
        raise ApiError(400, f"{param} holds no image data", param=param)
    return data


def optional_int(data: dict, name: str, minimum: int = 1, maximum: int | None = None) -> int | None:
    """An optional integer field (null or absent -> None) in minimum..maximum; booleans and floats are refused."""
    value = data.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ApiError(400, f"{name} must be an integer of at least {minimum}", param=name)
    if maximum is not None and value > maximum:
        raise ApiError(400, f"{name} must be at most {maximum}, got {value}", param=name)
    return value


def optional_max_crops(data: dict) -> int | None:
    """The optional `max_crops` field, bounded by `MAX_CROPS` as in the CLI and the Python API."""
    return optional_int(data, "max_crops", maximum=MAX_CROPS)


def optional_str(data: dict, name: str) -> str | None:
    """An optional string field (null or absent -> None); an empty or blank one is refused."""
    value = data.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ApiError(400, f"{name} must be a string", param=name)
    if not value.strip():
        raise ApiError(400, f"{name} is empty", param=name)
    return value


def model_request(limits: dict, max_new_tokens: int | None = None, **asked: object) -> ModelRequest:
    """What a route asks the model (see `molmocap.runtime.request`), with `max_crops` read from `limits` (the body,
    or Ollama's options) within its bound and a blank chat prompt meaning the model's caption prompt; a request the
    runtime refuses is a 400 naming its field."""
    if isinstance(asked.get("prompt"), str) and not asked["prompt"].strip():
        asked["prompt"] = None
    try:
        return ModelRequest(max_new_tokens=max_new_tokens, max_crops=optional_max_crops(limits), **asked)
    except RequestError as exc:
        raise ApiError(400, str(exc), param=exc.param) from None
