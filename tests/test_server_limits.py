"""`molmocap serve` under abuse: a bounded queue (503 + Retry-After), per-request timeouts (504), clients that leave
(their generation is cancelled at the next token, or skipped if still queued), a stream reader that stops, /health
during a long generation, and the API key check. Outcomes are read from /metrics' `generations` counters."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from PIL import Image
from starlette.testclient import TestClient
from test_server import B64, IMAGE_PART, assert_error, chat_body

from conftest import SERVER_KEY
from molmocap.runtime import Captioner, Result
from molmocap.runtime.captioner import Generation
from molmocap.runtime.demo import DEMO_MODEL_DIR
from molmocap.serve import create_app
from molmocap.serve.worker import STREAM_BACKLOG, ModelWorker

LONG = 4000  # tokens: the demo model stops only at its positions, several seconds of decoding on a CPU
AUTH = {"Authorization": f"Bearer {SERVER_KEY}"}


@pytest.fixture(scope="module")
def model_dir() -> Path:
    """The demo model (for `live_server` too): it answers with long texts, so a generation can be caught running."""
    return Path(DEMO_MODEL_DIR)


@pytest.fixture(scope="module")
def captioner(model_dir) -> Captioner:
    return Captioner.load(model_dir, threads=1)


class GatedCaptioner:
    """The real captioner, whose generations each wait until the test opens the gate."""

    def __init__(self, real: Captioner) -> None:
        self.real = real
        self.gate = threading.Event()

    def __getattr__(self, name: str):
        return getattr(self.real, name)

    def generate(self, *args, **kwargs) -> Result:
        assert self.gate.wait(timeout=60), "the test never opened the gate"
        return self.real.generate(*args, **kwargs)

    def start(self, *args, **kwargs) -> Generation:
        assert self.gate.wait(timeout=60), "the test never opened the gate"
        return self.real.start(*args, **kwargs)


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting until {what}")
        time.sleep(0.02)


def running_alone(client: TestClient) -> bool:
    """One generation has left the queue for the model (held at the gate), none waits."""
    health = client.get("/health").json()
    return health["pending_generations"] == 1 and health["waiting_generations"] == 0


def test_a_full_queue_answers_503_with_retry_after_at_once(captioner):
    gated = GatedCaptioner(captioner)
    with TestClient(create_app(gated, max_queue=2)) as client, ThreadPoolExecutor(max_workers=3) as pool:
        body = {"image": B64, "max_new_tokens": 3}
        running = pool.submit(client.post, "/v1/caption", json=body)
        wait_until(lambda: running_alone(client), "one generation runs")
        queued = [pool.submit(client.post, "/v1/caption", json=body) for _ in range(2)]
        wait_until(lambda: client.get("/health").json()["waiting_generations"] == 2, "two generations wait")
        refused = client.post("/v1/caption", json=body)
        error = assert_error(refused, 503, "busy")
        assert error["code"] == "queue_full" and int(refused.headers["retry-after"]) >= 1
        stream = client.post("/v1/chat/completions", json=chat_body(IMAGE_PART, max_tokens=3, stream=True))
        assert_error(stream, 503, "busy")
        gated.gate.set()
        answers = [future.result(timeout=60) for future in [running, *queued]]
        assert [a.status_code for a in answers] == [200, 200, 200]
        assert len({a.json()["text"] for a in answers}) == 1
        assert client.get("/metrics").json()["generations"] == {"completed": 3, "rejected": 2}


def test_a_request_over_its_timeout_is_cancelled_and_answered_504(captioner):
    gated = GatedCaptioner(captioner)
    with TestClient(create_app(gated, request_timeout_s=0.5)) as client:
        error = assert_error(client.post("/v1/caption", json={"image": B64, "max_new_tokens": 3}), 504, "timeout")
        assert error["code"] == "timeout" and error["type"] == "server_error"
        stream = client.post("/v1/chat/completions", json=chat_body(IMAGE_PART, max_tokens=3, stream=True))
        assert_error(stream, 504, "timeout")
        gated.gate.set()
        wait_until(lambda: client.get("/health").json()["pending_generations"] == 0, "the model is idle")
        # the first was running (held at the gate): stopped at its first token; the second never started
        assert client.get("/metrics").json()["generations"] == {"cancelled_timeout": 1, "skipped_timeout": 1}
        text = client.get("/metrics", headers={"Accept": "text/plain"}).text
        assert 'molmocap_generations_total{outcome="cancelled_timeout"} 1' in text


def test_a_wrong_api_key_of_the_right_length_is_401(captioner):
    with TestClient(create_app(captioner, api_key=SERVER_KEY)) as client:
        wrong = "x" * len(SERVER_KEY)
        response = client.post("/v1/caption", json={"image": B64}, headers={"Authorization": f"Bearer {wrong}"})
        assert_error(response, 401, "API key")


class _Chatty:
    """Streams one piece per token, as fast as it can, counting the pieces the worker accepted."""

    def __init__(self) -> None:
        self.pieces = 0

    def generate(self, image, prompt, max_new_tokens, max_crops, on_text=None) -> Result:
        for _ in range(max_new_tokens):
            on_text("x")
            self.pieces += 1
        return Result("x" * max_new_tokens, [1] * max_new_tokens, 1)


def test_a_stream_reader_that_stops_reading_cancels_its_generation():
    fake = _Chatty()
    worker = ModelWorker(fake, max_batch=1)  # type: ignore[arg-type]

    async def run() -> None:
        events = worker.stream(Image.new("RGB", (4, 4)), None, 10 * STREAM_BACKLOG, None)
        assert await anext(events) == "x"
        while worker.pending:  # the reader takes nothing more: the model thread gives up on it
            await asyncio.sleep(0.01)
        await events.aclose()

    asyncio.run(run())
    worker.close()
    # a full backlog, plus the one piece read if it was taken before the backlog filled
    assert STREAM_BACKLOG <= fake.pieces <= STREAM_BACKLOG + 1 < 10 * STREAM_BACKLOG
    assert worker.outcomes() == {"cancelled_stalled": 1}


def open_request(url: str, path: str, body: dict) -> socket.socket:
    """Send a POST by hand and leave its answer unread, so the test decides when the client goes away."""
    parts = urlsplit(url)
    data = json.dumps(body).encode()
    sock = socket.create_connection((parts.hostname, parts.port), timeout=30)
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: application/json\r\n"
                 f"Authorization: Bearer {SERVER_KEY}\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


def server_state(url: str) -> tuple[dict, dict]:
    health = httpx.get(f"{url}/health", timeout=10, trust_env=False)
    metrics = httpx.get(f"{url}/metrics", headers=AUTH, timeout=10, trust_env=False)
    assert health.status_code == 200 and metrics.status_code == 200
    return health.json(), metrics.json()["generations"]


def idle(url: str) -> None:
    wait_until(lambda: server_state(url)[0]["pending_generations"] == 0, "the server is idle")


def test_health_answers_during_a_long_generation_and_leaving_clients_cancel_theirs(live_server):
    """A running generation whose client closes the connection stops; so does a second one, whether it still waits
    (then it is skipped without running) or has already joined the running batch (then it is cancelled)."""
    def gone(outcomes: dict) -> int:
        return outcomes.get("skipped_client_gone", 0) + outcomes.get("cancelled_client_gone", 0)

    idle(live_server)
    _, before = server_state(live_server)
    body = {"image": B64, "max_new_tokens": LONG}
    running = open_request(live_server, "/v1/caption", body)
    wait_until(lambda: server_state(live_server)[0]["pending_generations"] == 1, "a generation runs")
    health, _ = server_state(live_server)  # answered while the model is busy with a long generation
    assert health["status"] == "ok" and health["pending_generations"] == 1
    queued = open_request(live_server, "/v1/caption", body)  # as long as the first: it cannot finish on its own
    wait_until(lambda: server_state(live_server)[0]["pending_generations"] == 2, "a second one waits or joins")
    queued.close()
    wait_until(lambda: gone(server_state(live_server)[1]) > gone(before), "the second generation is dropped")
    assert server_state(live_server)[0]["pending_generations"] == 1  # the first still runs
    running.close()
    idle(live_server)
    after = server_state(live_server)[1]
    assert gone(after) == gone(before) + 2
    assert after.get("cancelled_client_gone", 0) >= before.get("cancelled_client_gone", 0) + 1
    assert after.get("completed", 0) == before.get("completed", 0)


def test_a_client_leaving_mid_stream_cancels_its_generation(live_server):
    idle(live_server)
    _, before = server_state(live_server)
    body = chat_body(IMAGE_PART, max_tokens=LONG, stream=True)  # the caption prompt: a long answer
    with httpx.Client(base_url=live_server, headers=AUTH, timeout=60, trust_env=False) as client:
        with client.stream("POST", "/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            received = [line for line, _ in zip(lines, range(6)) if line.startswith("data: ")]
            assert received and "[DONE]" not in received
    idle(live_server)
    after = server_state(live_server)[1]
    assert after.get("cancelled_client_gone", 0) == before.get("cancelled_client_gone", 0) + 1
    assert after.get("completed", 0) == before.get("completed", 0)
    # the model is free again: a short request right after is answered
    short = httpx.post(f"{live_server}/v1/caption", json={"image": B64, "max_new_tokens": 2}, headers=AUTH,
                       timeout=60, trust_env=False)
    assert short.status_code == 200



def test_a_client_leaving_mid_upload_is_a_499_not_a_server_error(live_server):
    def caption_statuses() -> dict:
        metrics = httpx.get(f"{live_server}/metrics", headers=AUTH, timeout=10, trust_env=False).json()
        return metrics["requests"].get("/v1/caption", {})

    before = caption_statuses()
    parts = urlsplit(live_server)
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as half:
        half.sendall(f"POST /v1/caption HTTP/1.1\r\nHost: {parts.netloc}\r\nAuthorization: Bearer {SERVER_KEY}\r\n"
                     "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"image\": ".encode())
    wait_until(lambda: caption_statuses().get("499", 0) == before.get("499", 0) + 1, "the server saw the client go")
    assert caption_statuses().get("500", 0) == before.get("500", 0)


def test_concurrent_requests_decode_together_and_get_the_answers_of_single_requests(captioner):
    """Four requests queue while the first is held before its prefill; released, they decode in one batch (joining
    at successive steps), one of them streamed, and each gets the answer it gets alone."""
    from test_server import PNG, sse_events

    gated = GatedCaptioner(captioner)
    questions = [("Describe this image.", 12), ("What color is the square in the corner?", 4),
                 ("Count the shapes.", 20), ("Is it day or night?", 9)]
    streamed_question = ("Describe the colors.", 16)
    with TestClient(create_app(gated, max_batch=4)) as client, ThreadPoolExecutor(max_workers=5) as pool:
        asks = [pool.submit(client.post, "/v1/ask", json={"image": B64, "prompt": q, "max_new_tokens": n})
                for q, n in questions[:1]]
        wait_until(lambda: running_alone(client), "the first is held")
        asks += [pool.submit(client.post, "/v1/ask", json={"image": B64, "prompt": q, "max_new_tokens": n})
                 for q, n in questions[1:]]
        body = chat_body(streamed_question[0], IMAGE_PART, max_tokens=streamed_question[1], stream=True)
        stream = pool.submit(client.post, "/v1/chat/completions", json=body)
        wait_until(lambda: client.get("/health").json()["waiting_generations"] == 4, "four wait")
        gated.gate.set()
        texts = [future.result(timeout=120).json()["text"] for future in asks]
        events = sse_events(stream.result(timeout=120).text)
        streamed = "".join(e["choices"][0]["delta"].get("content") or "" for e in events[:-1] if e["choices"])
        assert client.get("/metrics").json()["generations"] == {"completed": 5}
    assert texts == [captioner.generate(PNG, q, n).text for q, n in questions]
    assert streamed == captioner.generate(PNG, *streamed_question).text
