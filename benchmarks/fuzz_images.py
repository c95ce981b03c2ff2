"""Fuzzed images through molmocap's image loading, preprocessing, captioning, CLI and server: none may crash or hang.

Inputs come from tests/image_mutations.py: valid PNG, JPEG, WebP, GIF (animated too), TIFF, BMP, ICO and PGM files
written by Pillow in many modes, then bit flips, truncations, splices, PNG chunk edits with valid CRCs, absurd
declared dimensions and corrupted EXIF. Every input goes in-process through `load_image` + `preprocess` and is
timed; a sample also goes through full captioning on the demo model (`Captioner`, one thread), the HTTP API
(Starlette's TestClient, in-process) and the CLI (a subprocess each). Outcome classes: ok, input_error (an
`InputError` with a one-line message; 400 at the server, exit 2 at the CLI), uncaught (any other exception, with
its type and message), slow (over 5 s of wall time; its CPU time is recorded beside it, since this machine is
shared). Saves benchmarks/results/fuzz_images-<date>.json with the counts, every
uncaught exception class with an example case (remake it with `image_mutations.make_case(seed, index)`), the
slowest input, peak RSS, the command, the machine and the versions.

    python benchmarks/fuzz_images.py [--seed 0] [--count 10000] [--seconds 900] [--caption-sample 50]
"""

from __future__ import annotations

import argparse
import base64
import collections
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from conditions import ROOT, conditions, load_average, results_path, save

sys.path.insert(0, str(ROOT / "tests"))

from image_mutations import Case, make_case, seed_files  # noqa: E402
from molmocap import Captioner, InputError  # noqa: E402
from molmocap.runtime.image_io import load_image  # noqa: E402
from molmocap.runtime.preprocess import PreprocessConfig, preprocess  # noqa: E402

DEMO = ROOT / "models" / "demo" / "onnx"
SLOW_S = 5.0


def classify(run) -> tuple[str, str | None]:
    """(outcome, detail) of calling `run()`: ok, input_error, multiline_error or uncaught."""
    try:
        run()
    except InputError as exc:
        return ("input_error", None) if "\n" not in str(exc) else ("multiline_error", str(exc)[:300])
    except Exception as exc:  # noqa: BLE001 - what the fuzzer is looking for
        return "uncaught", f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
    return "ok", None


def describe(case: Case) -> dict:
    return {"index": case.index, "seed_file": case.seed, "mutations": case.mutations, "bytes": len(case.data)}


def fuzz_library(seed: int, count: int, seconds: float, config: PreprocessConfig) -> dict:
    """Every case through load_image + preprocess, each timed; stops early after `seconds`."""
    outcomes: collections.Counter = collections.Counter()
    uncaught: dict[str, dict] = {}
    slowest = {"seconds": 0.0}
    slow_inputs = []
    durations = []
    by_outcome: dict[str, list[int]] = collections.defaultdict(list)
    start = time.perf_counter()
    for index in range(count):
        if time.perf_counter() - start > seconds:
            break
        case = make_case(seed, index)
        t0, cpu0 = time.perf_counter(), time.process_time()
        outcome, detail = classify(lambda: preprocess(load_image(case.data), config))
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        durations.append(elapsed)
        if outcome == "uncaught" or outcome == "multiline_error":
            entry = uncaught.setdefault(detail, {"count": 0, "example": describe(case)})
            entry["count"] += 1
        if elapsed > SLOW_S:
            slow_inputs.append({"seconds": round(elapsed, 3), "cpu_seconds": round(cpu, 3), "outcome": outcome,
                                **describe(case), "load_average": load_average()})
            outcome = "slow" if outcome in ("ok", "input_error") else outcome
        outcomes[outcome] += 1
        by_outcome[outcome].append(index)
        if elapsed > slowest["seconds"]:
            slowest = {"seconds": round(elapsed, 3), "cpu_seconds": round(cpu, 3), "outcome": outcome,
                       **describe(case), "load_average": load_average()}
        if (index + 1) % 1000 == 0:
            print(f"{index + 1} inputs, {dict(outcomes)}, {time.perf_counter() - start:.0f} s", flush=True)
    times = np.array(durations)
    return {"inputs": len(durations), "stopped_by_time_limit": len(durations) < count,
            "wall_s": round(time.perf_counter() - start, 1), "outcomes": dict(outcomes),
            "uncaught": [{"error": k, **v} for k, v in uncaught.items()], "slowest": slowest,
            "slow_inputs": slow_inputs,
            "seconds_per_input": {"median": round(float(np.median(times)), 5),
                                  "p99": round(float(np.percentile(times, 99)), 4),
                                  "max": round(float(times.max()), 3)},
            "by_outcome": by_outcome}


def sample(by_outcome: dict[str, list[int]], size: int, rng: np.random.Generator) -> list[int]:
    """About two thirds of the sample from inputs that preprocess, the rest from refused ones."""
    ok, refused = by_outcome.get("ok", []), by_outcome.get("input_error", [])
    take_ok = min(len(ok), size - min(len(refused), size // 3))
    picked = list(rng.choice(ok, take_ok, replace=False)) + list(rng.choice(refused, size - take_ok, replace=False))
    return sorted(int(i) for i in picked)


def fuzz_captioning(seed: int, indices: list[int], library: dict[int, str]) -> dict:
    """Full captioning (Python API) and the HTTP API on the same inputs; both must agree with the library run."""
    from starlette.testclient import TestClient

    from molmocap.serve import create_app

    captioner = Captioner.load(DEMO, threads=1)
    api: collections.Counter = collections.Counter()
    http: collections.Counter = collections.Counter()
    failures = []
    slowest = 0.0
    with TestClient(create_app(captioner), raise_server_exceptions=False) as client:
        for index in indices:
            case = make_case(seed, index)
            t0 = time.perf_counter()
            outcome, detail = classify(lambda: captioner.generate(case.data, max_new_tokens=8))
            slowest = max(slowest, time.perf_counter() - t0)
            api[outcome] += 1
            response = client.post("/v1/caption", json={"image": base64.b64encode(case.data).decode(),
                                                        "max_new_tokens": 8})
            message = response.json().get("error", {}).get("message", "") if response.status_code != 200 else ""
            status = {200: "ok", 400: "input_error"}.get(response.status_code, f"http_{response.status_code}")
            if "\n" in message:
                status = "multiline_error"
            http[status] += 1
            if outcome != library[index] or status != library[index]:
                failures.append({**describe(case), "library": library[index], "api": outcome, "api_error": detail,
                                 "http": status, "http_message": message[:300]})
    return {"inputs": len(indices), "python_api": dict(api), "http": dict(http), "disagreements": failures,
            "slowest_caption_s": round(slowest, 3)}


def fuzz_cli(seed: int, indices: list[int], library: dict[int, str]) -> dict:
    """`molmocap caption FILE` per input: exit 0, or exit 2 with one line `error: ...` (the demo model's notice,
    a `note: ` line, aside); any other line on stderr counts against it."""
    outcomes: collections.Counter = collections.Counter()
    failures = []
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "MOLMOCAP_CACHE_DIR": tmp}
        for index in indices:
            case = make_case(seed, index)
            path = Path(tmp) / f"case-{index}.img"
            path.write_bytes(case.data)
            proc = subprocess.run([sys.executable, "-m", "molmocap", "caption", str(path), "--model", str(DEMO),
                                   "--threads", "1", "--max-new-tokens", "4", "--no-cache"],
                                  cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
            lines = [line for line in proc.stderr.strip().splitlines() if not line.startswith("note: ")]
            if proc.returncode == 0:
                outcome = "ok" if not lines else "ok_with_stderr"
            elif proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "):
                outcome = "input_error"
            elif proc.returncode == 2 and any(line.startswith("error: ") for line in lines):
                outcome = "input_error_with_extra_stderr"
            else:
                outcome = f"exit_{proc.returncode}"
            outcomes[outcome] += 1
            if outcome != library[index]:
                failures.append({**describe(case), "library": library[index], "cli": outcome,
                                 "stderr": proc.stderr[-600:]})
    return {"inputs": len(indices), "outcomes": dict(outcomes), "disagreements": failures}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--count", type=int, default=10_000, help="Inputs through load_image + preprocess.")
    parser.add_argument("--seconds", type=float, default=900, help="Stop making inputs after this long.")
    parser.add_argument("--caption-sample", type=int, default=50, help="Inputs also captioned and served.")
    parser.add_argument("--cli-sample", type=int, default=6, help="Inputs also run through the CLI.")
    args = parser.parse_args()
    meta = conditions("pillow")
    started = time.perf_counter()
    config = PreprocessConfig.from_dict(Captioner.load(DEMO, threads=1).manifest.preprocess)

    library = fuzz_library(args.seed, args.count, args.seconds, config)
    outcome_of = {i: outcome for outcome, indices in library["by_outcome"].items() for i in indices}
    rng = np.random.default_rng(args.seed)
    captioning = fuzz_captioning(args.seed, sample(library["by_outcome"], args.caption_sample, rng), outcome_of)
    cli = fuzz_cli(args.seed, sample(library["by_outcome"], args.cli_sample, rng), outcome_of)
    del library["by_outcome"]

    peak_self = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    failures = (sum(library["outcomes"].get(k, 0) for k in ("uncaught", "multiline_error", "slow"))
                + len(captioning["disagreements"]) + len(cli["disagreements"]))
    report = {**meta, "seed": args.seed, "seed_files": sorted(seed_files()), "slow_threshold_s": SLOW_S,
              "library": library, "captioning": captioning, "cli": cli,
              "peak_rss_mb": round(peak_self, 1),
              "failures": failures, "wall_s": round(time.perf_counter() - started, 1),
              "load_average_at_end": load_average()}
    save(results_path("fuzz_images"), report)
    print(f"{library['inputs']} inputs: {library['outcomes']}; slowest {library['slowest']['seconds']} s; "
          f"captioning {captioning['python_api']}, http {captioning['http']}, cli {cli['outcomes']}; "
          f"{failures} failures; peak RSS {peak_self:.0f} MB")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
