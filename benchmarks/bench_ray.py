"""Images per hour: the local batch against `caption --ray` with 1 and 2 workers, on this machine.

Pillow-drawn 640x480 images are captioned by `molmocap caption img -o OUT --no-cache` in a fresh process per run:
the local batch at --threads 1 and 2, and --ray with --workers 1 and 2 at --threads 1 (plus one worker of each
--ray-threads given), joining one local Ray of all cores that this script starts once (its start is timed apart).
Each configuration runs on N and on 2N images (--images N; the N twice, under other names: the same work again
with --no-cache), interleaved round by round:
- end to end: 2N images over the wall seconds of the 2N run (model load, Ray connection and worker start included);
- marginal: N over the difference of the two runs' wall seconds, the rate once everything has started, which is
  what a long run over an archive gets; startup: the N run's wall seconds less N at the marginal rate.
Median (min-max) over --runs rounds. Scaling, from the marginal rates: 2 workers over twice 1 worker (what adding a
worker loses here), and Ray's 1 and 2 workers over the local batch at 1 and 2 threads (what Ray costs).

Saves benchmarks/results/ray-<label>-<date>.json and .md with the command, the machine, the versions and the load.

    python benchmarks/bench_ray.py [MODEL_DIR] --label demo [--images 24] [--runs 3] [--max-crops 8]
    python benchmarks/bench_ray.py /work/bench-data/onnx-engine/int4 --label 4b-int4 --images 2 --max-crops 1
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from conditions import ROOT, conditions, load_average, results_path, save, spread

sys.path[:0] = [str(ROOT / "tests")]

from batch_invariants import draw_images  # noqa: E402

from molmocap.runtime.files import replace_atomically  # noqa: E402

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # before Ray starts: its usage statistics go to the internet


def count_rows(out: Path) -> int:
    """Whole rows written so far: a results file, or the part files of a --ray directory."""
    files = sorted(out.glob("part-*.jsonl")) if out.is_dir() else [out] if out.exists() else []
    return sum(file.read_bytes().count(b"\n") for file in files)


def one_run(work: Path, args: list[str], images: int, out: Path) -> dict:
    """One command, timed: wall seconds, and seconds to its first row."""
    command = [sys.executable, "-m", "molmocap", "--quiet", "caption", "img", "-o", str(out), "--no-cache", *args]
    load = load_average()
    t0 = time.perf_counter()
    proc = subprocess.Popen(command, cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    first = None
    while proc.poll() is None:
        if first is None and count_rows(out):
            first = time.perf_counter() - t0
        time.sleep(0.02)
    wall = time.perf_counter() - t0
    stderr = proc.stderr.read()
    rows = count_rows(out)
    if proc.returncode != 0 or rows != images:
        raise SystemExit(f"{' '.join(command)} failed ({proc.returncode}, {rows} rows): {stderr[-2000:]}")
    return {"images": images, "wall_s": round(wall, 3), "first_row_s": round(first or wall, 3), "load_average": load}


def per_hour(count: int, seconds: float | None) -> float | None:
    return None if not seconds else count * 3600 / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", default=str(ROOT / "models" / "demo" / "onnx"))
    parser.add_argument("--label", default="demo")
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--max-crops", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--ray-threads", type=int, nargs="*", default=[],
                        help="also Ray with one worker of this many threads (e.g. 2)")
    options = parser.parse_args()

    import ray

    setup = ["--model", options.model, "--max-crops", str(options.max_crops),
             "--max-new-tokens", str(options.max_new_tokens)]
    t0 = time.perf_counter()
    ray.init(include_dashboard=False, logging_level="warning")
    ray_start = time.perf_counter() - t0
    address = ray.get_runtime_context().gcs_address
    cpus = int(ray.cluster_resources()["CPU"])
    configs = {"local threads 1": ["--threads", "1"], "local threads 2": ["--threads", "2"],
               "ray 1 worker x 1 thread": ["--ray", "--ray-address", address, "--workers", "1", "--threads", "1"],
               "ray 2 workers x 1 thread": ["--ray", "--ray-address", address, "--workers", "2", "--threads", "1"]}
    for threads in options.ray_threads:
        configs[f"ray 1 worker x {threads} threads"] = ["--ray", "--ray-address", address, "--workers", "1",
                                                         "--threads", str(threads)]
    count = options.images
    try:
        with tempfile.TemporaryDirectory(prefix="bench-ray-") as tmp:
            work = Path(tmp)
            draw_images(work / "small" / "img", count, seed=7, size=(640, 480))
            shutil.copytree(work / "small" / "img", work / "large" / "img")
            for image in sorted((work / "small" / "img").iterdir()):  # the same work again (--no-cache)
                shutil.copy(image, work / "large" / "img" / f"copy-{image.name}")
            runs: dict[str, list[dict]] = {name: [] for name in configs}
            for run in range(options.runs):  # interleaved, so that a change of load hits every configuration
                for name, args in configs.items():
                    pair = {}
                    for size, images in (("small", count), ("large", 2 * count)):
                        out = work / size / f"out-{run}-{name.replace(' ', '-')}{'' if '--ray' in args else '.jsonl'}"
                        pair[size] = one_run(work / size, setup + args, images, out)
                    runs[name].append(pair)
                    print(f"run {run} {name}: {pair}", flush=True)
    finally:
        ray.shutdown()
    results = {}
    for name, pairs in runs.items():
        marginal = [count * 3600 / max(p["large"]["wall_s"] - p["small"]["wall_s"], 1e-3) for p in pairs]
        results[name] = {
            "args": configs[name],
            "images_per_hour_end_to_end": spread([2 * count * 3600 / p["large"]["wall_s"] for p in pairs], 1),
            "images_per_hour_marginal": spread(marginal, 1),
            "startup_s": spread([p["small"]["wall_s"] - count * 3600 / m for p, m in zip(pairs, marginal)], 2),
            "first_row_s": spread([p["large"]["first_row_s"] for p in pairs], 2), "runs": pairs}

    def rate(name: str) -> float:
        return results[name]["images_per_hour_marginal"]["median"]

    one, two = rate("ray 1 worker x 1 thread"), rate("ray 2 workers x 1 thread")
    scaling = {"two_workers_over_twice_one": round(two / (2 * one), 3),
               "ray_one_worker_over_local_threads_1": round(one / rate("local threads 1"), 3),
               "ray_two_workers_over_local_threads_2": round(two / rate("local threads 2"), 3)}
    data = {"conditions": conditions("ray", "pyarrow"), "model": options.model, "images": options.images,
            "image_size": [640, 480], "max_crops": options.max_crops, "max_new_tokens": options.max_new_tokens,
            "runs": options.runs, "ray_cluster": {"cpus": cpus, "start_s": round(ray_start, 2)},
            "configs": results, "scaling_marginal": scaling}
    path = results_path(f"ray-{options.label}")
    save(path, data)
    lines = [f"# caption --ray vs the local batch: {options.label}", "",
             f"{count} and {2 * count} images of 640x480, max_crops {options.max_crops}, max_new_tokens "
             f"{options.max_new_tokens}, --no-cache, median (min-max) of {options.runs} rounds; local Ray of {cpus} "
             f"CPUs started once in {ray_start:.1f} s (not in the figures). `{data['conditions']['command']}`", "",
             "| configuration | images/hour, marginal | images/hour, end to end | startup s | first row s |",
             "|---|---|---|---|---|"]

    def cell(figure: dict, digits: int) -> str:
        return f"{figure['median']:.{digits}f} ({figure['min']:.{digits}f}-{figure['max']:.{digits}f})"

    for name, result in results.items():
        lines.append(f"| {name} | {cell(result['images_per_hour_marginal'], 0)} | "
                     f"{cell(result['images_per_hour_end_to_end'], 0)} | {cell(result['startup_s'], 1)} | "
                     f"{cell(result['first_row_s'], 1)} |")
    lines += ["", f"Marginal-rate ratios: {json.dumps(scaling)}"]
    replace_atomically(path.with_suffix(".md"), ("\n".join(lines) + "\n").encode())
    print(f"saved {path.with_suffix('.md')}")


if __name__ == "__main__":
    main()
