"""Several questions about one image: fresh runs against one image encoding and a reused image-prefix KV cache.

Both ways answer the same questions in the same process, side by side: each fresh run preprocesses, encodes and
prefills the whole prompt; the reused way encodes once (`Captioner.encode_image`) and, after the first question,
prefills only each question's own tokens. Tokens must agree; the time per question is compared. Saves
benchmarks/results/reuse-<date>.json.

    python benchmarks/bench_reuse.py MODEL_DIR [--max-crops 1] [--tokens 16] [--threads 2]
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_cpu import bench_image  # noqa: E402

from molmocap.runtime import Captioner  # noqa: E402

QUESTIONS = ["What color is the circle?", "How many shapes are there?", "Is there a square?",
             "Where is the blue square?", "What is in the top left corner?"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--max-crops", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    captioner = Captioner.load(args.model, threads=args.threads)
    captioner.stop_ids = set()  # the same number of tokens for every answer
    image = bench_image()
    captioner.generate(image, QUESTIONS[0], max_new_tokens=2, max_crops=args.max_crops)

    start = time.perf_counter()
    fresh = [captioner.generate(image, q, max_new_tokens=args.tokens, max_crops=args.max_crops) for q in QUESTIONS]
    fresh_s = time.perf_counter() - start
    start = time.perf_counter()
    encoded = captioner.encode_image(image, max_crops=args.max_crops)
    reused = [captioner.generate(encoded, q, max_new_tokens=args.tokens) for q in QUESTIONS]
    reused_s = time.perf_counter() - start

    row = {
        "model": args.model, "quant": captioner.manifest.data["quant"], "max_crops": args.max_crops,
        "questions": len(QUESTIONS), "tokens_per_answer": args.tokens, "threads": args.threads,
        "prompt_tokens": fresh[0].prompt_tokens,
        "fresh_s": round(fresh_s, 3), "reused_s": round(reused_s, 3), "speedup": round(fresh_s / reused_s, 2),
        "fresh_ttft_s": [round(r.timings["ttft_s"], 3) for r in fresh],
        "reused_ttft_s": [round(r.timings["ttft_s"], 3) for r in reused],
        "same_tokens": all(a.token_ids == b.token_ids for a, b in zip(fresh, reused)),
    }
    print(json.dumps(row, indent=2))
    out = ROOT / "benchmarks" / "results" / f"reuse-{datetime.date.today()}.json"
    out.write_text(json.dumps(row, indent=2) + "\n")
    print(f"saved {out}")


if __name__ == "__main__":
    main()
