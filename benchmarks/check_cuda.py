"""Check the CUDA path: each model must give on the GPU what it gives on the CPU, and say how fast.

For every exported model directory: caption one drawn image on the CPU and on `--device` (greedy tokens compared),
compare teacher-forced next-token logits over `--positions` positions (top-1 agreement, cosine), CPU as the
reference, and decode three questions together in one batch on the device against each alone there (the device's
batched path). Needs onnxruntime-gpu; `--device cpu` runs the same checks CPU against CPU (the tests do). Prints one
JSON line per model and saves them with the conditions (command, machine, GPU, versions) to
benchmarks/results/cuda-check-<date>.json or `--out`.

    python benchmarks/check_cuda.py MODEL_DIR... [--tokens 24] [--positions 64] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_gpu import gpu  # noqa: E402
from conditions import conditions, failure, results_path, save  # noqa: E402

from molmocap.export.fidelity import compare, teacher_forced_logits  # noqa: E402
from molmocap.runtime import Captioner  # noqa: E402
from molmocap.runtime.errors import MolmocapError  # noqa: E402
from molmocap.runtime.sessions import providers  # noqa: E402

PROMPT = "Describe this image."
BATCH_PROMPTS = ["Describe this image.", "What shapes are in this image?", "What colors do you see?"]


def drawn_image() -> Image.Image:
    image = Image.new("RGB", (520, 380), (240, 240, 230))
    draw = ImageDraw.Draw(image)
    draw.ellipse((40, 60, 200, 220), fill=(200, 30, 30))
    draw.rectangle((280, 150, 470, 340), fill=(30, 70, 200))
    noise = np.random.default_rng(0).integers(0, 40, (380, 520, 3), dtype=np.uint8)
    return Image.fromarray(np.asarray(image) - noise)


def check(model_dir: str, device: str, tokens: int, positions: int) -> dict:
    image = drawn_image()
    cpu = Captioner.load(model_dir, device="cpu")
    gpu = Captioner.load(model_dir, device=device)
    cpu_result = cpu.generate(image, PROMPT, max_new_tokens=tokens, max_crops=4)
    gpu.generate(image, PROMPT, max_new_tokens=2, max_crops=4)
    gpu_result = gpu.generate(image, PROMPT, max_new_tokens=tokens, max_crops=4)
    reference, fed = teacher_forced_logits(cpu, image, PROMPT, None, positions, max_crops=4)
    candidate, _ = teacher_forced_logits(gpu, image, PROMPT, fed, positions, max_crops=4)
    alone = [gpu.generate(image, prompt, max_new_tokens=tokens, max_crops=4).token_ids for prompt in BATCH_PROMPTS]
    together = gpu.generate_batch([image] * len(BATCH_PROMPTS), BATCH_PROMPTS, tokens, max_crops=4)
    return {
        "model": model_dir,
        "quant": cpu.manifest.data["quant"],
        "providers": gpu.decoder.session.get_providers(),
        "same_tokens": cpu_result.token_ids == gpu_result.token_ids,
        "tokens": {"cpu": cpu_result.token_ids, "device": gpu_result.token_ids},
        "logits": compare(reference, candidate),
        "batched_same_as_alone": [r.token_ids == a for r, a in zip(together, alone)],
        "cpu_timings": cpu_result.timings,
        "device_timings": gpu_result.timings,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--tokens", type=int, default=24)
    parser.add_argument("--positions", type=int, default=64)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    try:
        providers(args.device)  # no CUDA: one line, and no results file
    except MolmocapError as exc:
        raise SystemExit(f"error: {exc}") from None
    out = args.out or results_path("cuda-check")
    data = {"meta": {**conditions("onnxruntime-gpu"), "gpu": gpu(), "device": args.device}, "rows": []}
    for model in args.models:
        try:
            data["rows"].append(check(model, args.device, args.tokens, args.positions))
        except Exception as exc:  # noqa: BLE001 - a device kernel that fails: recorded, the next model still runs
            data["rows"].append({"model": model, "error": failure(exc)})
        print(json.dumps(data["rows"][-1]), flush=True)
        save(out, data)


if __name__ == "__main__":
    main()
