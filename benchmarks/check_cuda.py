"""Check the CUDA path: each model must give on the GPU what it gives on the CPU, and say how fast.

For every exported model directory: caption one drawn image on CPU and on CUDA (greedy tokens compared), then
compare teacher-forced next-token logits over `--positions` positions (top-1 agreement, cosine), CPU as the
reference. Needs onnxruntime-gpu. Prints one JSON line per model and saves them with `--out`, beside the conditions
(command, machine, GPU, versions).

    python benchmarks/check_cuda.py MODEL_DIR... [--tokens 24] [--positions 64] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from conditions import conditions, save  # noqa: E402

from molmocap.export.fidelity import compare, teacher_forced_logits  # noqa: E402
from molmocap.runtime import Captioner  # noqa: E402

PROMPT = "Describe this image."


def drawn_image() -> Image.Image:
    image = Image.new("RGB", (520, 380), (240, 240, 230))
    draw = ImageDraw.Draw(image)
    draw.ellipse((40, 60, 200, 220), fill=(200, 30, 30))
    draw.rectangle((280, 150, 470, 340), fill=(30, 70, 200))
    noise = np.random.default_rng(0).integers(0, 40, (380, 520, 3), dtype=np.uint8)
    return Image.fromarray(np.asarray(image) - noise)


def check(model_dir: str, tokens: int, positions: int) -> dict:
    image = drawn_image()
    cpu = Captioner.load(model_dir, device="cpu")
    gpu = Captioner.load(model_dir, device="cuda")
    cpu_result = cpu.generate(image, PROMPT, max_new_tokens=tokens, max_crops=4)
    gpu.generate(image, PROMPT, max_new_tokens=2, max_crops=4)
    gpu_result = gpu.generate(image, PROMPT, max_new_tokens=tokens, max_crops=4)
    reference, fed = teacher_forced_logits(cpu, image, PROMPT, None, positions, max_crops=4)
    candidate, _ = teacher_forced_logits(gpu, image, PROMPT, fed, positions, max_crops=4)
    return {
        "model": model_dir,
        "quant": cpu.manifest.data["quant"],
        "providers": gpu.decoder.session.get_providers(),
        "same_tokens": cpu_result.token_ids == gpu_result.token_ids,
        "logits": compare(reference, candidate),
        "cpu_timings": cpu_result.timings,
        "cuda_timings": gpu_result.timings,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--tokens", type=int, default=24)
    parser.add_argument("--positions", type=int, default=64)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    rows = []
    for model in args.models:
        rows.append(check(model, args.tokens, args.positions))
        print(json.dumps(rows[-1]), flush=True)
    if args.out:
        gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True).stdout.strip()
        save(args.out, {"meta": {**conditions("onnxruntime-gpu"), "gpu": gpu}, "rows": rows})


if __name__ == "__main__":
    main()
