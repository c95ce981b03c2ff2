"""Batched decoding against one sequence at a time: aggregate decode tokens/s, a folder's images per hour, a server.

Four parts, each in the same process side by side (`--parts`, default decode,folder,server):
- decode: B = 1, 2, 4, 8 questions about one encoded image (`Captioner.start` on an `EncodedImage`, so only the
  questions are prefilled), prefilled into a `DecodeBatch` and stepped `--tokens` times; aggregate tokens/s =
  tokens decoded / the steps' wall time (prefill excluded; a row that reaches a stop token stops counting).
- pad: what batch-invariant 4-bit decoding would cost one sequence: a decode step of one row against the same row
  padded to two (MatMulNBits' pair kernel instead of its single-row one), steps interleaved, `--tokens` of each;
  beside them the embedding lookup of one token (the separate session call a step makes before the decoder's).
- folder: `--images` different pictures (640x480, as bench_cpu) captioned by `run_batch` into a fresh results file
  without the result cache, `--batch-size` 1 (today's sequential batch) against each size in `--sizes`; images per
  hour = images / wall time (preprocessing, vision, prefill and decoding included).
- server: `molmocap serve --max-batch N` on loopback, `--clients` concurrent clients against one, each asking for
  `--tokens` tokens about its own picture (server result cache off); aggregate tokens/s = tokens answered / wall time,
  and the answers compared with those of single requests.
Each figure is the median, min and max of `--runs` runs, with the load average around each run. Saves
benchmarks/results/batch-<label>-<date>.json with the conditions (command, machine, versions).

    python benchmarks/bench_batch.py MODEL_DIR --label demo [--parts decode,folder,server] [--max-crops 1]
        [--tokens 32] [--images 16] [--sizes 4] [--runs 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_cpu import bench_image
from conditions import RESULTS, conditions, load_average, save, spread
from PIL import Image, ImageDraw

from molmocap import Captioner
from molmocap.runtime.batching import DecodeBatch

QUESTIONS = ["Describe this image.", "What color is the circle?", "How many shapes are there?", "Is there a square?",
             "Where is the blue square?", "What is in the top left corner?", "Describe the background.",
             "What is the largest shape?"]
BATCH_SIZES = [1, 2, 4, 8]


def folder_image(index: int) -> Image.Image:
    """bench_cpu's picture with the shapes moved and recolored per index, so that every image differs."""
    image = bench_image()
    draw = ImageDraw.Draw(image)
    rng = np.random.default_rng(index)
    for _ in range(3):
        x, y = rng.integers(0, 560), rng.integers(0, 400)
        draw.ellipse((x, y, x + 80, y + 80), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    return image


def decode_part(captioner: Captioner, args: argparse.Namespace) -> dict:
    encoded = captioner.encode_image(bench_image(), max_crops=args.max_crops)
    figures = {}
    for size in BATCH_SIZES:
        rates, loads = [], []
        for _ in range(args.runs):
            batch = DecodeBatch(captioner, max_batch=size)
            for question in QUESTIONS[:size]:
                captioner.start(encoded, question, args.tokens + 1, batch=batch)
            before = load_average()
            decoded, start = 0, time.perf_counter()
            for _ in range(args.tokens):
                decoded += len(batch)
                batch.step()
            rates.append(decoded / (time.perf_counter() - start))
            loads.append([before, load_average()])
        figures[str(size)] = {"aggregate_tokens_per_s": spread(rates, 2), "load_average_before_after": loads}
        print(f"decode B={size}: {figures[str(size)]['aggregate_tokens_per_s']}", flush=True)
    one = figures["1"]["aggregate_tokens_per_s"]["median"]
    for size in BATCH_SIZES:
        figures[str(size)]["vs_b1"] = round(figures[str(size)]["aggregate_tokens_per_s"]["median"] / one, 2)
    return {"prompt_tokens": len(captioner.start(encoded, QUESTIONS[0], 1).state.prompt_ids),
            "tokens_per_row": args.tokens, "by_batch_size": figures}


def pad_part(captioner: Captioner, args: argparse.Namespace) -> dict:
    state = captioner.prefill(bench_image(), QUESTIONS[0], 2 * args.tokens + 2, args.max_crops)
    decoder = captioner.decoder
    cache = decoder.new_cache(state.cache.capacity, rows=2)
    runs: dict[str, list[float]] = {"embed_ms": [], "one_row_ms": [], "two_rows_ms": []}
    loads = []
    for _ in range(args.runs):
        for row in (0, 1):
            cache.copy_row(state.cache, 0, row)
        embeds = captioner.embed(np.array([[state.greedy_token]] * 2, dtype=np.int64))
        one, two, embed = [], [], []
        before = load_average()
        for _ in range(args.tokens):
            start = time.perf_counter()
            captioner.embed(np.array([[state.greedy_token]], dtype=np.int64))
            embed.append(time.perf_counter() - start)
            start = time.perf_counter()
            decoder.step_rows(embeds[:1], cache)
            one.append(time.perf_counter() - start)
            start = time.perf_counter()
            decoder.step_rows(embeds, cache, 0)
            two.append(time.perf_counter() - start)
        runs["embed_ms"].append(1e3 * float(np.median(embed)))
        runs["one_row_ms"].append(1e3 * float(np.median(one)))
        runs["two_rows_ms"].append(1e3 * float(np.median(two)))
        loads.append([before, load_average()])
    figures = {name: spread(values, 2) for name, values in runs.items()}
    figures["padding_cost"] = round(figures["two_rows_ms"]["median"] / figures["one_row_ms"]["median"] - 1, 3)
    figures["load_average_before_after"] = loads
    print(f"pad: {figures}", flush=True)
    return figures


def folder_part(args: argparse.Namespace) -> dict:
    from molmocap.runtime.batch import Runner, run_batch
    from molmocap.runtime.request import Request

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        folder.mkdir()
        paths = []
        for index in range(args.images):
            paths.append(str(folder / f"{index:03d}.png"))
            folder_image(index).save(paths[-1])
        runner = Runner(args.model, threads=args.threads)
        request = Request(max_new_tokens=args.tokens, max_crops=args.max_crops)
        runner.load().stop_ids = set()  # every image gets its full answer length, in every way
        runner.answer(paths[0], "warm-up", request)
        figures: dict = {}
        for run in range(args.runs):
            for size in [1, *args.sizes]:
                out = Path(tmp) / f"run{run}-b{size}.jsonl"
                before = load_average()
                start = time.perf_counter()
                summary = run_batch(paths, runner, request, out, "jsonl", batch_size=size)
                elapsed = time.perf_counter() - start
                assert summary.computed == len(paths), summary
                entry = figures.setdefault(str(size), {"images_per_hour": [], "load_average_before_after": []})
                entry["images_per_hour"].append(len(paths) * 3600 / elapsed)
                entry["load_average_before_after"].append([before, load_average()])
                print(f"folder run {run} batch {size}: {len(paths) * 3600 / elapsed:.0f} images/h", flush=True)
                if size != 1:
                    entry.setdefault("same_rows_as_sequential", []).append(
                        _answers(out) == _answers(Path(tmp) / f"run{run}-b1.jsonl"))
    for entry in figures.values():
        entry["images_per_hour"] = spread(entry["images_per_hour"], 1)
    one = figures["1"]["images_per_hour"]["median"]
    for entry in figures.values():
        entry["vs_sequential"] = round(entry["images_per_hour"]["median"] / one, 2)
    return {"images": args.images, "tokens": args.tokens, "by_batch_size": figures}


def server_part(args: argparse.Namespace) -> dict:
    """`molmocap serve` with --max-batch `args.max_batch` (and 1, today's one-at-a-time worker): the same requests
    from one client in turn and from `args.clients` clients at once."""
    import base64
    import io
    import socket
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    requests = []
    for index in range(args.clients * args.server_requests):
        buffer = io.BytesIO()
        folder_image(100 + index).save(buffer, format="PNG")
        requests.append({"image": base64.b64encode(buffer.getvalue()).decode(), "max_crops": args.max_crops,
                         "prompt": QUESTIONS[index % len(QUESTIONS)], "max_new_tokens": args.tokens})
    figures: dict = {}
    reference = None
    for max_batch in (args.max_batch, 1):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        command = [sys.executable, "-m", "molmocap", "--quiet", "serve", "--model", args.model, "--port", str(port),
                   "--threads", str(args.threads), "--max-batch", str(max_batch), "--max-queue", str(len(requests))]
        with tempfile.TemporaryFile() as log:
            proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
            url = f"http://127.0.0.1:{port}"
            try:
                with httpx.Client(base_url=url, timeout=3600, trust_env=False) as client:
                    _wait_for(client, proc)

                    def ask(body: dict, client: httpx.Client = client) -> dict:
                        response = client.post("/v1/ask", json=body)
                        response.raise_for_status()
                        return response.json()

                    ask(requests[0])  # warm-up
                    ways = [("1_client", 1), (f"{args.clients}_clients", args.clients)]
                    for run in range(args.runs):
                        for name, clients in ways if max_batch != 1 else ways[1:]:
                            before = load_average()
                            start = time.perf_counter()
                            with ThreadPoolExecutor(max_workers=clients) as pool:
                                answers = list(pool.map(ask, requests))
                            elapsed = time.perf_counter() - start
                            tokens = sum(answer["completion_tokens"] for answer in answers)
                            texts = [answer["text"] for answer in answers]
                            reference = reference or texts
                            entry = figures.setdefault(f"max_batch_{max_batch}", {}).setdefault(
                                name, {"aggregate_tokens_per_s": [], "requests_per_hour": [], "same_answers": [],
                                       "load_average_before_after": []})
                            entry["aggregate_tokens_per_s"].append(tokens / elapsed)
                            entry["requests_per_hour"].append(len(requests) * 3600 / elapsed)
                            entry["same_answers"].append(texts == reference)
                            entry["load_average_before_after"].append([before, load_average()])
                            print(f"server max_batch {max_batch} {name}: {tokens / elapsed:.2f} tokens/s", flush=True)
            finally:
                proc.terminate()
                proc.wait(timeout=60)
    for ways in figures.values():
        for entry in ways.values():
            entry["aggregate_tokens_per_s"] = spread(entry["aggregate_tokens_per_s"], 3)
            entry["requests_per_hour"] = spread(entry["requests_per_hour"], 1)
    batched = figures[f"max_batch_{args.max_batch}"]
    one = batched["1_client"]["aggregate_tokens_per_s"]["median"]
    ratio = batched[f"{args.clients}_clients"]["aggregate_tokens_per_s"]["median"] / one
    return {"requests": len(requests), "clients": args.clients, "tokens_per_request": args.tokens,
            "route": "/v1/ask", "by_max_batch": figures, f"{args.clients}_clients_vs_1": round(ratio, 2)}


def _wait_for(client, proc: subprocess.Popen) -> None:
    import httpx

    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}")
        try:
            if client.get("/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise SystemExit("the server did not answer /health within 600 s")


def _answers(path: Path) -> list[tuple]:
    import json

    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [(row["image"], row["token_ids"]) for row in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--label", required=True, help="Names the results file: batch-<label>-<date>.json.")
    parser.add_argument("--parts", default="decode,folder,server")
    parser.add_argument("--max-crops", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--sizes", type=lambda s: [int(v) for v in s.split(",")], default=[4],
                        help="Batch sizes to compare with sequential in the folder part (comma-separated).")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--server-requests", type=int, default=2, help="Requests per client in the server part.")
    parser.add_argument("--max-batch", type=int, default=4, help="The server's --max-batch in the server part.")
    parser.add_argument("--runs", type=int, default=3, help="Runs per figure (median, min, max).")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    args.model = os.path.abspath(args.model)
    if args.runs < 3:
        print("note: fewer than 3 runs: figures are single measurements, not medians", file=sys.stderr)
    parts = args.parts.split(",")
    data = {"conditions": conditions(), "model": os.path.abspath(args.model), "max_crops": args.max_crops,
            "threads": args.threads, "runs": args.runs}
    path = RESULTS / f"batch-{args.label}-{datetime.date.today().isoformat()}.json"
    runs = {"decode": lambda: decode_part(Captioner.load(args.model, threads=args.threads), args),
            "pad": lambda: pad_part(Captioner.load(args.model, threads=args.threads), args),
            "folder": lambda: folder_part(args), "server": lambda: server_part(args)}
    for part in parts:
        data[part] = runs[part]()
        data["load_average_at_end"] = load_average()
        save(path, data)  # after each part, so that a long run keeps what it has measured


if __name__ == "__main__":
    main()
