"""Several questions about one image: fresh runs against one image encoding and a reused image-prefix KV cache.

Both ways answer the same questions in the same process, side by side: each fresh run preprocesses, encodes and
prefills the whole prompt; the reused way encodes once (`Captioner.encode_image`) and, after the first question,
prefills only each question's own tokens. Tokens must agree; the time per question is compared. The two ways
alternate `--runs` times, and each figure is the median, min and max over the runs, with the load average around
each run. Saves benchmarks/results/reuse-<date>.json with the conditions (command, machine, versions).

    python benchmarks/bench_reuse.py MODEL_DIR [--max-crops 1] [--tokens 16] [--threads 2] [--runs 3] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from bench_cpu import bench_image, greedy
from conditions import conditions, load_average, results_path, save, spread

from molmocap import Captioner

QUESTIONS = ["What color is the circle?", "How many shapes are there?", "Is there a square?",
             "Where is the blue square?", "What is in the top left corner?"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--max-crops", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3, help="Times to run both ways (median, min, max).")
    parser.add_argument("--out", type=Path, help="Results file (default benchmarks/results/reuse-<date>.json).")
    args = parser.parse_args()
    if args.runs < 3:
        parser.error("--runs must be at least 3: a speed figure is a median of at least 3 runs")
    meta = conditions()

    captioner = Captioner.load(args.model, threads=args.threads)
    image = bench_image()
    greedy(captioner, image, QUESTIONS[0], 2, args.max_crops)  # warm-up

    runs = []
    for i in range(args.runs):
        before = load_average()
        start = time.perf_counter()
        fresh = [greedy(captioner, image, q, args.tokens, args.max_crops) for q in QUESTIONS]
        fresh_s = time.perf_counter() - start
        start = time.perf_counter()
        encoded = captioner.encode_image(image, max_crops=args.max_crops)
        reused = [greedy(captioner, encoded, q, args.tokens) for q in QUESTIONS]
        reused_s = time.perf_counter() - start
        runs.append({"fresh_s": fresh_s, "reused_s": reused_s,
                     "fresh_ttft_s": [timings["ttft_s"] for _, timings in fresh],
                     "reused_ttft_s": [timings["ttft_s"] for _, timings in reused],
                     "same_tokens": all(a == b for (a, _), (b, _) in zip(fresh, reused)),
                     "load_average_before": before, "load_average_after": load_average()})
        print(f"run {i + 1}/{args.runs}: fresh {fresh_s:.2f} s, reused {reused_s:.2f} s, "
              f"same tokens {runs[-1]['same_tokens']}", flush=True)

    row = {
        "model": args.model, "quant": captioner.manifest.data["quant"], "max_crops": args.max_crops,
        "questions": len(QUESTIONS), "tokens_per_answer": args.tokens, "threads": args.threads, "runs": args.runs,
        "prompt_tokens": fresh[0][1]["prompt_tokens"],
        "fresh_s": spread([r["fresh_s"] for r in runs], 3), "reused_s": spread([r["reused_s"] for r in runs], 3),
        "speedup": spread([r["fresh_s"] / r["reused_s"] for r in runs], 2),
        "fresh_ttft_s": spread([statistics.mean(r["fresh_ttft_s"]) for r in runs], 3),
        "reused_first_ttft_s": spread([r["reused_ttft_s"][0] for r in runs], 3),
        "reused_followup_ttft_s": spread([statistics.mean(r["reused_ttft_s"][1:]) for r in runs], 3),
        "same_tokens": all(r["same_tokens"] for r in runs),
        "per_run": [{k: [round(t, 3) for t in v] if k.endswith("ttft_s") else round(v, 3) if isinstance(v, float)
                     else v for k, v in r.items()} for r in runs],
    }
    print(json.dumps({k: v for k, v in row.items() if k != "per_run"}, indent=2))
    meta["load_average_at_end"] = load_average()
    save(args.out or results_path("reuse"), {"meta": meta, "rows": [row]})


if __name__ == "__main__":
    main()
