"""`molmocap serve` under load and abuse on loopback: answers never mixed up, /health always quick, no hangs.

Starts `python -m molmocap serve` on the demo model (models/demo/onnx) on a free 127.0.0.1 port, computes one
reference answer per (route, image, prompt) with single requests, then runs `--clients` client threads for
`--seconds`, each drawing requests from a fixed mix: caption, ask, chat (plain; streamed and read fully; streamed
and abandoned midway), bad requests (corrupt image, bad JSON, max_crops past the bound, a body over the server's
limit) and dropped connections (closed while queued or generating, or in the middle of the upload). A side thread
polls /health every 0.25 s. Every request has a client timeout (`HANG_S`): one that runs past it is a hang.

Figures: requests by kind and outcome (HTTP status, `dropped` when the client closed on purpose, `hang`,
`transport_error`), latency p50/p99 per route for answered requests, /health latency (max, p99) and failures,
answers that differ from the single-request reference (mixed up), the server's generation outcomes from /metrics
(completed, rejected, cancelled_<reason>, skipped_<reason>), peak RSS of the server (VmHWM), its RSS after warm-up
and after the run, and error lines in its log. Saves benchmarks/results/load_server-<date>.json with the command,
the machine and the versions. Nothing leaves 127.0.0.1.

    python benchmarks/load_server.py [--seconds 60] [--clients 16] [--max-queue 8] [--seed 0]
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

import httpx
import numpy as np
from conditions import ROOT, conditions, load_average, results_path, save
from PIL import Image

from molmocap.serve.metrics import percentile

MODEL = ROOT / "models" / "demo" / "onnx"
HOST = "127.0.0.1"
HANG_S = 60.0  # a request unanswered after this long counts as a hang
HEALTH_EVERY_S = 0.25
MAX_NEW_TOKENS = 24
LONG_TOKENS = 2000  # for requests that are abandoned or dropped while generating
MAX_REQUEST_MB = 2
QUESTIONS = ("What color is the circle?", "How many shapes are there?")
KINDS = {  # kind: share of the requests
    "caption": 16, "ask": 14, "chat": 12, "chat_stream": 12, "chat_stream_abandoned": 8,
    "bad_image": 6, "bad_json": 6, "huge_max_crops": 5, "oversized_body": 4,
    "dropped_queued": 7, "dropped_upload": 5, "dropped_generating": 5,
}


def make_images(seed: int) -> list[str]:
    """Four small PNGs (shapes on noise, different sizes), base64."""
    rng = np.random.default_rng(seed)
    images = []
    for i, (w, h) in enumerate([(96, 64), (128, 128), (200, 120), (64, 160)]):
        pixels = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        pixels[h // 4: h // 2, w // 4: w // 2] = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)][i]
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        images.append(base64.b64encode(buffer.getvalue()).decode())
    return images


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of `pid`, in MiB."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = round(int(rest.split()[0]) / 1024, 1)
    return values


def chat_body(image: str, prompt: str | None, max_tokens: int, stream: bool) -> dict:
    content: list[dict] = [{"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}}]
    if prompt:
        content.insert(0, {"type": "text", "text": prompt})
    return {"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, "stream": stream}


def stream_text(lines) -> tuple[str, bool]:
    """The text of an OpenAI event stream and whether it ended with [DONE] (an error event counts as not)."""
    text, done = [], False
    for line in lines:
        if not line.startswith("data: "):
            continue
        data = line[len("data: "):]
        if data == "[DONE]":
            done = True
            break
        event = json.loads(data)
        if "error" in event:
            break
        text += [c["delta"].get("content", "") for c in event["choices"]]
    return "".join(text), done


class Load:
    """The server process, the reference answers and everything the clients record."""

    def __init__(self, url: str, pid: int, images: list[str], rng_seed: int) -> None:
        self.url = url
        self.pid = pid
        self.images = images
        self.seed = rng_seed
        self.reference: dict[tuple, str] = {}
        self.lock = threading.Lock()
        self.outcomes: defaultdict[str, Counter] = defaultdict(Counter)
        self.latency: defaultdict[str, list[float]] = defaultdict(list)
        self.mixed: list[dict] = []
        self.checked = 0
        self.health: list[float] = []
        self.health_failures: list[str] = []

    def record(self, kind: str, outcome: str, route: str | None = None, seconds: float | None = None) -> None:
        with self.lock:
            self.outcomes[kind][outcome] += 1
            if route and seconds is not None and outcome == "200":
                self.latency[route].append(seconds)

    def check(self, key: tuple, text: str) -> None:
        with self.lock:
            self.checked += 1
            if text != self.reference[key]:
                self.mixed.append({"key": [str(k) for k in key], "got": text[:80], "want": self.reference[key][:80]})

    # -- the answers every later request is checked against --------------------------------------------------
    def compute_references(self, client: httpx.Client) -> None:
        for i, image in enumerate(self.images):
            caption = client.post("/v1/caption", json={"image": image, "max_new_tokens": MAX_NEW_TOKENS})
            self.reference[("caption", i, None)] = caption.json()["text"]
            for question in QUESTIONS:
                body = {"image": image, "prompt": question, "max_new_tokens": MAX_NEW_TOKENS}
                ask = client.post("/v1/ask", json=body)
                self.reference[("ask", i, question)] = ask.json()["text"]
            for prompt in (None, QUESTIONS[0]):
                chat = client.post("/v1/chat/completions", json=chat_body(image, prompt, MAX_NEW_TOKENS, False))
                self.reference[("chat", i, prompt)] = chat.json()["choices"][0]["message"]["content"]

    # -- one client ---------------------------------------------------------------------------------------------
    def client_loop(self, index: int, deadline: float) -> None:
        rng = random.Random(self.seed * 1000 + index)
        kinds, weights = list(KINDS), list(KINDS.values())
        with httpx.Client(base_url=self.url, timeout=HANG_S, trust_env=False) as client:
            while time.monotonic() < deadline:
                kind = rng.choices(kinds, weights)[0]
                try:
                    getattr(self, f"do_{kind}")(client, rng)
                except httpx.TimeoutException:
                    self.record(kind, "hang")
                except httpx.TransportError as exc:
                    self.record(kind, f"transport_error:{type(exc).__name__}")

    def _post(self, client: httpx.Client, kind: str, route: str, body: dict | bytes) -> httpx.Response:
        start = time.perf_counter()
        if isinstance(body, bytes):
            response = client.post(route, content=body, headers={"Content-Type": "application/json"})
        else:
            response = client.post(route, json=body)
        self.record(kind, str(response.status_code), route, time.perf_counter() - start)
        if response.status_code == 503:
            time.sleep(min(float(response.headers.get("retry-after", 1)), 1.0))
        return response

    def do_caption(self, client: httpx.Client, rng: random.Random) -> None:
        i = rng.randrange(len(self.images))
        body = {"image": self.images[i], "max_new_tokens": MAX_NEW_TOKENS}
        response = self._post(client, "caption", "/v1/caption", body)
        if response.status_code == 200:
            self.check(("caption", i, None), response.json()["text"])

    def do_ask(self, client: httpx.Client, rng: random.Random) -> None:
        i, question = rng.randrange(len(self.images)), rng.choice(QUESTIONS)
        body = {"image": self.images[i], "prompt": question, "max_new_tokens": MAX_NEW_TOKENS}
        response = self._post(client, "ask", "/v1/ask", body)
        if response.status_code == 200:
            self.check(("ask", i, question), response.json()["text"])

    def do_chat(self, client: httpx.Client, rng: random.Random) -> None:
        i, prompt = rng.randrange(len(self.images)), rng.choice((None, QUESTIONS[0]))
        body = chat_body(self.images[i], prompt, MAX_NEW_TOKENS, False)
        response = self._post(client, "chat", "/v1/chat/completions", body)
        if response.status_code == 200:
            self.check(("chat", i, prompt), response.json()["choices"][0]["message"]["content"])

    def do_chat_stream(self, client: httpx.Client, rng: random.Random) -> None:
        i, prompt = rng.randrange(len(self.images)), rng.choice((None, QUESTIONS[0]))
        start = time.perf_counter()
        with client.stream("POST", "/v1/chat/completions", json=chat_body(self.images[i], prompt, MAX_NEW_TOKENS,
                                                                           True)) as response:
            if response.status_code != 200:
                response.read()
                self.record("chat_stream", str(response.status_code))
                return
            text, done = stream_text(response.iter_lines())
        self.record("chat_stream", "200" if done else "200_stream_error", "/v1/chat/completions (stream)",
                    time.perf_counter() - start)
        if done:
            self.check(("chat", i, prompt), text)

    def do_chat_stream_abandoned(self, client: httpx.Client, rng: random.Random) -> None:
        """Read a few events of a long stream, then close the connection."""
        body = chat_body(rng.choice(self.images), None, LONG_TOKENS, True)
        with httpx.Client(base_url=self.url, timeout=HANG_S, trust_env=False) as own:  # its own connection
            with own.stream("POST", "/v1/chat/completions", json=body) as response:
                if response.status_code != 200:
                    response.read()
                    self.record("chat_stream_abandoned", str(response.status_code))
                    return
                for n, _ in enumerate(response.iter_lines()):
                    if n >= rng.randrange(2, 12):
                        break
        self.record("chat_stream_abandoned", "dropped")

    def do_bad_image(self, client: httpx.Client, rng: random.Random) -> None:
        data = bytearray(base64.b64decode(rng.choice(self.images)))
        del data[rng.randrange(40, len(data) - 10):]  # truncated after the header: fails in the decoder
        body = {"image": base64.b64encode(bytes(data)).decode(), "prompt": "What is it?"}
        self._post(client, "bad_image", "/v1/ask", body)

    def do_bad_json(self, client: httpx.Client, rng: random.Random) -> None:
        self._post(client, "bad_json", "/v1/caption", b'{"image": "abc", "max_new_tokens": ')

    def do_huge_max_crops(self, client: httpx.Client, rng: random.Random) -> None:
        self._post(client, "huge_max_crops", "/v1/caption", {"image": rng.choice(self.images), "max_crops": 100000})

    def do_oversized_body(self, client: httpx.Client, rng: random.Random) -> None:
        body = b'{"prompt": "' + b"x" * (MAX_REQUEST_MB * 2 ** 20 + 10) + b'"}'
        self._post(client, "oversized_body", "/v1/ask", body)

    def _raw(self, body: bytes, send: int | None = None) -> socket.socket:
        sock = socket.create_connection((HOST, int(self.url.rsplit(":", 1)[1])), timeout=HANG_S)
        head = (f"POST /v1/caption HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        sock.sendall(head + body[:send])
        return sock

    def do_dropped_queued(self, client: httpx.Client, rng: random.Random) -> None:
        """A request sent whole, then the connection closed soon after: while queued or running."""
        body = json.dumps({"image": rng.choice(self.images), "max_new_tokens": MAX_NEW_TOKENS}).encode()
        sock = self._raw(body)
        time.sleep(rng.uniform(0.0, 0.5))
        sock.close()
        self.record("dropped_queued", "dropped")

    def do_dropped_generating(self, client: httpx.Client, rng: random.Random) -> None:
        """A long non-streaming generation whose client leaves after up to 2 s."""
        body = json.dumps({"image": rng.choice(self.images), "max_new_tokens": LONG_TOKENS}).encode()
        sock = self._raw(body)
        time.sleep(rng.uniform(0.5, 2.0))
        sock.close()
        self.record("dropped_generating", "dropped")

    def do_dropped_upload(self, client: httpx.Client, rng: random.Random) -> None:
        """Half a body, then the connection closed."""
        body = json.dumps({"image": rng.choice(self.images)}).encode()
        sock = self._raw(body, send=len(body) // 2)
        time.sleep(rng.uniform(0.0, 0.2))
        sock.close()
        self.record("dropped_upload", "dropped")

    # -- /health, four times a second ---------------------------------------------------------------------------
    def health_loop(self, stop: threading.Event) -> None:
        with httpx.Client(base_url=self.url, timeout=HANG_S, trust_env=False) as client:
            while not stop.is_set():
                start = time.perf_counter()
                try:
                    status = client.get("/health").status_code
                    if status != 200:
                        self.health_failures.append(str(status))
                except httpx.HTTPError as exc:
                    self.health_failures.append(type(exc).__name__)
                self.health.append(time.perf_counter() - start)
                stop.wait(HEALTH_EVERY_S)


def wait_idle(client: httpx.Client, timeout: float = 120) -> float:
    """Seconds until the server reports no pending generation."""
    start = time.monotonic()
    while client.get("/health").json()["pending_generations"]:
        if time.monotonic() - start > timeout:
            raise SystemExit("the server did not drain its queue within 120 s")
        time.sleep(0.1)
    return time.monotonic() - start


def summary(values: list[float]) -> dict:
    ordered = sorted(values)
    return {"count": len(ordered), "p50_s": round(percentile(ordered, 50), 4),
            "p99_s": round(percentile(ordered, 99), 4), "max_s": round(ordered[-1], 4)} if ordered else {"count": 0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--max-queue", type=int, default=8, help="The server's --max-queue (below --clients, so "
                        "the bound is reached).")
    parser.add_argument("--request-timeout", type=float, default=30.0, help="The server's --request-timeout.")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    meta = conditions("starlette", "uvicorn", "httpx")
    port = free_port()
    url = f"http://{HOST}:{port}"
    command = [sys.executable, "-m", "molmocap", "serve", "--host", HOST, "--port", str(port), "--model", str(MODEL),
               "--max-queue", str(args.max_queue), "--request-timeout", str(args.request_timeout),
               "--max-request-mb", str(MAX_REQUEST_MB)]
    with tempfile.TemporaryDirectory() as tmp:
        log_path = Path(tmp) / "server.log"
        with open(log_path, "w") as log:
            proc = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        try:
            report = run(args, url, proc, meta)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        lines = log_path.read_text(errors="replace").splitlines()
    report["server_log"] = {"lines": len(lines), "tracebacks": sum("Traceback" in line for line in lines),
                            "error_lines": [line for line in lines if "ERROR" in line][:20],
                            "exit_code": proc.returncode}
    report["server_command"] = [Path(command[0]).name, *command[1:]]
    save(results_path("load_server"), report)
    print(json.dumps({k: report[k] for k in ("verdict", "outcomes_total", "health", "memory_mib")}, indent=1))


def run(args: argparse.Namespace, url: str, proc: subprocess.Popen, meta: dict) -> dict:
    with httpx.Client(base_url=url, timeout=HANG_S, trust_env=False) as client:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"the server exited with {proc.returncode}")
            try:
                if client.get("/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
            if time.monotonic() > deadline:
                raise SystemExit("the server did not answer /health within 120 s")
        load = Load(url, proc.pid, make_images(args.seed), args.seed)
        started = time.perf_counter()
        load.compute_references(client)
        load.compute_references(client)  # warm-up done twice: the baseline is taken after the allocator settles
        references_s = time.perf_counter() - started
        baseline = proc_status(proc.pid)
        stop = threading.Event()
        health = threading.Thread(target=load.health_loop, args=(stop,), daemon=True)
        health.start()
        deadline = time.monotonic() + args.seconds
        clients = [threading.Thread(target=load.client_loop, args=(i, deadline), daemon=True)
                   for i in range(args.clients)]
        load_started = time.perf_counter()
        for thread in clients:
            thread.start()
        for thread in clients:
            thread.join(timeout=args.seconds + 2 * HANG_S)
        stuck_clients = sum(thread.is_alive() for thread in clients)
        load_s = time.perf_counter() - load_started
        drain_s = wait_idle(client)
        stop.set()
        health.join(timeout=HANG_S)
        time.sleep(2.0)
        after = proc_status(proc.pid)
        server_metrics = client.get("/metrics").json()
    totals: Counter = Counter()
    for counts in load.outcomes.values():
        totals.update(counts)
    hangs = totals.get("hang", 0) + stuck_clients
    health_max = max(load.health) if load.health else None
    verdict = {"mixed_answers": len(load.mixed), "hangs": hangs,
               "health_max_s": round(health_max, 4) if health_max is not None else None,
               "health_failures": len(load.health_failures),
               "ok": not load.mixed and not hangs and not load.health_failures and health_max is not None
               and health_max < 1.0}
    return {
        **meta,
        "load_average_at_end": load_average(),
        "settings": {"seconds": args.seconds, "clients": args.clients, "max_queue": args.max_queue,
                     "request_timeout_s": args.request_timeout, "max_request_mb": MAX_REQUEST_MB,
                     "max_new_tokens": MAX_NEW_TOKENS, "long_tokens": LONG_TOKENS, "mix": KINDS, "seed": args.seed,
                     "model": str(MODEL.relative_to(ROOT)), "hang_s": HANG_S},
        "verdict": verdict,
        "outcomes_total": dict(sorted(totals.items())),
        "outcomes_by_kind": {kind: dict(sorted(c.items())) for kind, c in sorted(load.outcomes.items())},
        "latency_200_by_route": {route: summary(values) for route, values in sorted(load.latency.items())},
        "answers": {"checked": load.checked, "mixed": len(load.mixed), "examples": load.mixed[:5],
                    "references": len(load.reference)},
        "health": {**summary(load.health), "failures": load.health_failures[:20], "every_s": HEALTH_EVERY_S},
        "server_generations": server_metrics.get("generations"),
        "server_requests": server_metrics.get("requests"),
        "memory_mib": {"baseline_rss_after_warmup": baseline["VmRSS"], "peak_rss_vmhwm": after["VmHWM"],
                       "rss_after_run": after["VmRSS"],
                       "rss_after_minus_baseline": round(after["VmRSS"] - baseline["VmRSS"], 1)},
        "timings_s": {"references": round(references_s, 2), "load": round(load_s, 2), "drain": round(drain_s, 2)},
    }


if __name__ == "__main__":
    main()
