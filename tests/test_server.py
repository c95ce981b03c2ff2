"""`molmocap serve`: every route and error through Starlette's TestClient, the model queue, and a live server
driven by the official OpenAI client (traffic to 127.0.0.1 only)."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image
from starlette.testclient import TestClient

from conftest import SERVER_KEY, noise_image
from molmocap.runtime import Captioner, Result
from molmocap.runtime.request import Request
from molmocap.serve import create_app
from molmocap.serve.worker import ModelWorker

KEY = SERVER_KEY


def png_bytes(height: int = 64, width: int = 96, seed: int = 0) -> bytes:
    buffer = io.BytesIO()
    noise_image(height, width, seed).save(buffer, format="PNG")
    return buffer.getvalue()


PNG = png_bytes()
B64 = base64.b64encode(PNG).decode()
DATA_URI = f"data:image/png;base64,{B64}"


def chat_body(*content: dict | str, **extra) -> dict:
    parts = [{"type": "text", "text": c} if isinstance(c, str) else c for c in content]
    return {"model": "molmo-test", "messages": [{"role": "user", "content": parts}], **extra}


IMAGE_PART = {"type": "image_url", "image_url": {"url": DATA_URI}}


def sse_events(text: str) -> list:
    """The `data:` payloads of a server-sent event stream, JSON-decoded except the final [DONE]."""
    events = [line[len("data: "):] for line in text.splitlines() if line.startswith("data: ")]
    return [e if e == "[DONE]" else json.loads(e) for e in events]


def assert_error(response, status: int, pattern: str) -> dict:
    """An OpenAI-style error body with a one-line message, never a traceback."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert pattern in error["message"] and "\n" not in error["message"], error
    assert "Traceback" not in response.text
    return error


@pytest.fixture(scope="module")
def model_dir(exported) -> Path:
    return exported["qwen3_gqa"]


@pytest.fixture(scope="module")
def captioner(model_dir) -> Captioner:
    return Captioner.load(model_dir, threads=1)


@pytest.fixture(scope="module")
def client(captioner):
    with TestClient(create_app(captioner)) as test_client:
        yield test_client


def test_caption_answers_text_token_counts_and_timings(client, captioner):
    response = client.post("/v1/caption", json={"image": B64, "max_new_tokens": 5, "max_crops": 2})
    assert response.status_code == 200, response.text
    answer = response.json()
    expected = captioner.generate(PNG, max_new_tokens=5, max_crops=2)
    assert answer["text"] == expected.text
    assert answer["prompt_tokens"] == expected.prompt_tokens and answer["completion_tokens"] == 5
    assert answer["finish_reason"] == "length"
    assert set(answer["timings"]) >= {"preprocess_s", "vision_s", "prefill_s", "ttft_s", "total_s"}


def test_ask_takes_a_data_uri_and_needs_a_prompt(client, captioner):
    response = client.post("/v1/ask", json={"image": DATA_URI, "prompt": "What color is it?", "max_new_tokens": 4})
    assert response.status_code == 200, response.text
    assert response.json()["text"] == captioner.generate(PNG, "What color is it?", max_new_tokens=4).text
    assert_error(client.post("/v1/ask", json={"image": B64}), 400, "needs a prompt")
    assert_error(client.post("/v1/ask", json={"image": B64, "prompt": "  "}), 400, "prompt is empty")
    assert_error(client.post("/v1/ask", json={"image": B64, "prompt": "Why?", "style": "alt"}), 400,
                 "unknown field 'style'")


def test_caption_styles(client, captioner):
    response = client.post("/v1/caption", json={"image": B64, "style": "tags", "max_new_tokens": 6})
    assert response.status_code == 200, response.text
    answer = response.json()
    raw = captioner.generate(PNG, Request(style="tags").prompt_for(captioner.manifest), max_new_tokens=6).text
    assert answer["style"] == "tags" and answer["raw_text"] == raw
    assert isinstance(answer["data"], list) and json.loads(answer["text"]) == answer["data"]
    alt = client.post("/v1/caption", json={"image": B64, "style": "alt", "max_new_tokens": 4}).json()
    assert isinstance(alt["text"], str) and "data" not in alt
    assert_error(client.post("/v1/caption", json={"image": B64, "style": "poem"}), 400, "unknown style")
    assert_error(client.post("/v1/caption", json={"image": B64, "style": "alt", "prompt": "Hi"}), 400, "not both")


@pytest.mark.parametrize("image,status,pattern", [
    ("https://example.com/cat.png", 400, "offline"),
    ("http://127.0.0.1/cat.png", 400, "offline"),
    ("file:///etc/passwd", 400, "offline"),
    ("data:image/png,rawbytes", 400, "base64 data URIs"),
    ("not base64!", 400, "not valid base64"),
    (base64.b64encode(b"just some text").decode(), 400, "unrecognised image format"),
    (base64.b64encode(PNG[:120]).decode(), 400, "corrupt or truncated"),
    (None, 400, "must be a non-empty string"),
    (42, 400, "must be a non-empty string"),
])
def test_bad_images_are_400_with_one_line(client, image, status, pattern):
    body = {"prompt": "What is it?"} if image is None else {"image": image, "prompt": "What is it?"}
    assert_error(client.post("/v1/ask", json=body), status, pattern)


@pytest.mark.parametrize("body,pattern", [
    (b"{not json", "not valid JSON"),
    (b"[1, 2]", "must be a JSON object"),
    (json.dumps({"image": B64, "max_new_tokens": 0}).encode(), "max_new_tokens must be an integer"),
    (json.dumps({"image": B64, "max_new_tokens": True}).encode(), "max_new_tokens must be an integer"),
    (json.dumps({"image": B64, "max_crops": "4"}).encode(), "max_crops must be an integer"),
])
def test_bad_bodies_are_400(client, body, pattern):
    response = client.post("/v1/caption", content=body, headers={"Content-Type": "application/json"})
    assert_error(response, 400, pattern)


def test_unknown_routes_and_methods_answer_json_errors(client):
    assert_error(client.get("/v2/nothing"), 404, "Not Found")
    assert_error(client.get("/v1/caption"), 405, "Method Not Allowed")


def test_api_key(captioner):
    with TestClient(create_app(captioner, api_key=KEY)) as test_client:
        body = {"image": B64, "max_new_tokens": 2}
        missing = test_client.post("/v1/caption", json=body)
        assert_error(missing, 401, "API key")
        assert missing.headers["www-authenticate"] == "Bearer"
        assert_error(test_client.post("/v1/caption", json=body, headers={"Authorization": "Bearer nope"}), 401,
                     "API key")
        assert_error(test_client.get("/metrics"), 401, "API key")
        assert test_client.post("/v1/caption", json=body, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
        assert test_client.get("/health").status_code == 200


def test_request_size_limit_on_declared_and_streamed_bodies(captioner):
    with TestClient(create_app(captioner, max_request_bytes=2000)) as test_client:
        big = json.dumps({"image": B64, "prompt": "x" * 3000}).encode()
        assert_error(test_client.post("/v1/ask", content=big, headers={"Content-Type": "application/json"}),
                     413, "larger than this server's limit of 2000 bytes")

        def chunked():
            for start in range(0, len(big), 500):
                yield big[start:start + 500]

        response = test_client.post("/v1/ask", content=chunked(), headers={"Content-Type": "application/json"})
        assert "content-length" not in response.request.headers
        assert_error(response, 413, "larger than this server's limit")
        small = {"image": base64.b64encode(png_bytes(16, 16)).decode(), "prompt": "Hi?", "max_new_tokens": 2}
        assert test_client.post("/v1/ask", json=small).status_code == 200


def test_chat_completion(client, captioner):
    body = chat_body("Describe it.", IMAGE_PART, max_tokens=50, max_completion_tokens=4)
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    completion = response.json()
    expected = captioner.generate(PNG, "Describe it.", max_new_tokens=4)
    assert completion["object"] == "chat.completion" and completion["model"] == "molmo-test"
    choice = completion["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": expected.text}
    assert choice["finish_reason"] == "length"
    assert completion["usage"] == {"prompt_tokens": expected.prompt_tokens, "completion_tokens": 4,
                                   "total_tokens": expected.prompt_tokens + 4}


def test_chat_prompt_is_the_last_user_message(client, captioner):
    messages = [{"role": "system", "content": "You are terse."},
                {"role": "user", "content": [IMAGE_PART, {"type": "text", "text": "First question?"}]},
                {"role": "assistant", "content": "An answer."},
                {"role": "user", "content": "And how many squares are there?"}]
    usage = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 2}).json()["usage"]
    assert usage["prompt_tokens"] == captioner.generate(PNG, "And how many squares are there?",
                                                        max_new_tokens=1).prompt_tokens
    image_only = client.post("/v1/chat/completions", json=chat_body(IMAGE_PART, max_tokens=2)).json()
    assert image_only["usage"]["prompt_tokens"] == captioner.generate(PNG, max_new_tokens=1).prompt_tokens


def test_chat_stream_matches_the_completion(client):
    body = chat_body("Describe it.", IMAGE_PART, max_tokens=6)
    plain = client.post("/v1/chat/completions", json=body).json()
    response = client.post("/v1/chat/completions", json={**body, "stream": True,
                                                          "stream_options": {"include_usage": True}})
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == "molmo-test" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == plain["choices"][0]["message"]["content"]
    assert chunks[-2]["choices"][0]["finish_reason"] == plain["choices"][0]["finish_reason"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == plain["usage"]


@pytest.mark.parametrize("content,pattern", [
    (["Describe it."], "found none"),
    (["Describe it.", IMAGE_PART, IMAGE_PART], "found 2"),
    (["Describe it.", {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}], "offline"),
    (["Describe it.", {"type": "input_audio", "input_audio": {}}], "unsupported content part"),
])
def test_chat_errors(client, content, pattern):
    for stream in (False, True):
        error = assert_error(client.post("/v1/chat/completions", json=chat_body(*content, stream=stream)), 400,
                             pattern)
        assert error["type"] == "invalid_request_error"
    assert_error(client.post("/v1/chat/completions", json={"messages": []}), 400, "non-empty list")


def test_health_and_metrics(client, model_dir):
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["model"] == str(model_dir) and health["uptime_s"] >= 0
    client.post("/v1/caption", json={"image": B64, "max_new_tokens": 2})
    client.post("/v1/caption", json={"image": "nope"})
    metrics = client.get("/metrics").json()
    assert metrics["requests"]["/v1/caption"]["200"] >= 1 and metrics["requests"]["/v1/caption"]["400"] >= 1
    latency = metrics["latency_s"]["/v1/caption"]
    assert 0 <= latency["p50"] <= latency["p90"] <= latency["p99"]
    assert metrics["pending_generations"] == 0 and metrics["tokens"]["completion"] >= 2
    text = client.get("/metrics", headers={"Accept": "text/plain"}).text
    assert 'molmocap_requests_total{route="/v1/caption",status="200"}' in text
    assert 'molmocap_request_latency_seconds{route="/v1/caption",quantile="0.99"}' in text


def test_the_demo_model_is_named_as_such(client):
    """/health and /v1/models flag the embedded demo model (runtime.demo decides, as for the CLI) and name it
    `molmocap-demo`, which chat completions then report; a real model is not flagged."""
    from molmocap.runtime.demo import DEMO_MODEL_DIR, DEMO_MODEL_NAME, DEMO_NOTICE

    health, models = client.get("/health").json(), client.get("/v1/models").json()
    assert health["demo_model"] is False and "notice" not in health
    assert models["data"][0]["demo_model"] is False and models["data"][0]["id"] != DEMO_MODEL_NAME
    with TestClient(create_app(Captioner.load(DEMO_MODEL_DIR, threads=1))) as demo:
        health, models = demo.get("/health").json(), demo.get("/v1/models").json()
        assert health["demo_model"] is True and health["notice"] == DEMO_NOTICE
        assert health["model_name"] == DEMO_MODEL_NAME
        assert models["data"] == [{"id": DEMO_MODEL_NAME, "object": "model", "created": models["data"][0]["created"],
                                   "owned_by": "molmocap", "demo_model": True}]
        body = {"messages": [{"role": "user", "content": [IMAGE_PART]}], "max_tokens": 2}
        completion = demo.post("/v1/chat/completions", json=body).json()
        assert completion["model"] == DEMO_MODEL_NAME


def test_concurrent_requests_queue_on_the_model_and_all_are_answered(client):
    body = chat_body("Describe it.", IMAGE_PART, max_tokens=5)

    def one(i: int) -> str:
        if i % 2:
            response = client.post("/v1/chat/completions", json={**body, "stream": True})
            assert response.status_code == 200
            return "".join(c["choices"][0]["delta"].get("content", "")
                           for c in sse_events(response.text)[:-1] if c["choices"])
        response = client.post("/v1/chat/completions", json=body)
        assert response.status_code == 200
        return response.json()["choices"][0]["message"]["content"]

    with ThreadPoolExecutor(max_workers=6) as pool:
        texts = list(pool.map(one, range(6)))
    assert len(texts) == 6 and len(set(texts)) == 1 and texts[0]
    assert client.get("/metrics").json()["pending_generations"] == 0


def test_an_unexpected_failure_is_a_500_without_a_traceback(client, captioner, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("secret internals\nline two")

    for name in ("generate", "start"):  # alone (max_batch 1) or batched
        monkeypatch.setattr(captioner, name, boom)
    error = assert_error(client.post("/v1/caption", json={"image": B64}), 500, "internal error")
    assert "secret" not in error["message"]
    body = chat_body("Hi", IMAGE_PART, stream=True)
    assert_error(client.post("/v1/chat/completions", json=body), 500, "internal error")


def test_a_stopping_server_answers_503(captioner):
    with TestClient(create_app(captioner)) as test_client:
        test_client.app.state.server.worker.close()
        error = assert_error(test_client.post("/v1/caption", json={"image": B64}), 503, "shutting down")
        assert error["type"] == "server_error"


class _SlowCaptioner:
    """When streaming, emits a piece and waits until the test has closed the stream before the next one."""

    def __init__(self) -> None:
        self.closed = threading.Event()
        self.pieces = 0

    def generate(self, image, prompt, max_new_tokens, max_crops, on_text=None) -> Result:
        for _ in range(max_new_tokens):
            if on_text is not None:
                on_text("x")
                self.pieces += 1
                self.closed.wait(timeout=30)
        return Result("x" * max_new_tokens, [1] * max_new_tokens, 1)


def test_an_abandoned_stream_stops_its_generation():
    fake = _SlowCaptioner()
    worker = ModelWorker(fake, max_batch=1)  # type: ignore[arg-type]

    async def run() -> None:
        events = worker.stream(Image.new("RGB", (4, 4)), None, 100, None)
        assert await anext(events) == "x"
        await events.aclose()
        fake.closed.set()
        assert (await worker.generate(Image.new("RGB", (4, 4)), None, 3, None)).text == "xxx"

    asyncio.run(run())
    worker.close()
    assert fake.pieces == 1 + 3 and worker.pending == 0  # one streamed piece, then the 3 of the next generation
    assert worker.outcomes() == {"cancelled_client_gone": 1, "completed": 1}


def test_live_server_with_the_openai_client(live_server):
    import openai

    client = openai.OpenAI(base_url=f"{live_server}/v1", api_key=KEY, max_retries=0, timeout=120,
                           http_client=openai.DefaultHttpxClient(trust_env=False))
    messages = [{"role": "user", "content": [{"type": "text", "text": "Describe this image."},
                                             {"type": "image_url", "image_url": {"url": DATA_URI}}]}]
    completion = client.chat.completions.create(model="molmo-test", messages=messages, max_tokens=8)
    text = completion.choices[0].message.content
    assert completion.model == "molmo-test" and text
    assert completion.usage.completion_tokens == 8 and completion.choices[0].finish_reason == "length"
    stream = client.chat.completions.create(model="molmo-test", messages=messages, max_tokens=8, stream=True)
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert streamed == text
    with pytest.raises(openai.BadRequestError, match="offline"):
        client.chat.completions.create(model="molmo-test", max_tokens=2, messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}])
    wrong_key = openai.OpenAI(base_url=f"{live_server}/v1", api_key="wrong", max_retries=0,
                              http_client=openai.DefaultHttpxClient(trust_env=False))
    with pytest.raises(openai.AuthenticationError):
        wrong_key.chat.completions.create(model="molmo-test", messages=messages, max_tokens=2)
