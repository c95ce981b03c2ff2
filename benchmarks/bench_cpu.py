"""CPU speed and memory of molmocap against transformers on a full-size Molmo2-4B checkpoint, in one run.

Every engine captions the same image with the same prompt and generates exactly `--tokens` tokens, at each
`--max-crops`, each in its own process so that peak RSS is its own. Rows: time to first token, vision seconds,
prefill tokens/s, decode tokens/s, peak RSS and model size on disk; transformers bf16 (what a user would pick) is
the baseline. Missing exports are made first, with their time and peak RSS recorded. With `--fidelity`, each
molmocap plan's next-token logits are compared with transformers' over teacher-forced positions.

    python benchmarks/make_synthetic_checkpoint.py /data/molmo2-4b-synthetic
    python benchmarks/bench_cpu.py /data/molmo2-4b-synthetic --exports /data/molmo2-4b-onnx

Writes benchmarks/results/cpu-<date>.json (and .md): a list of rows with `engine`, `quant`, `max_crops`,
`ttft_s`, `decode_tokens_per_s`, `peak_rss_gb`, `disk_gb` and more.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPT = "Describe this image."


def bench_image() -> Image.Image:
    """A 640x480 picture with shapes and gradients (the size REFERENCE.md's transformers figures use)."""
    y, x = np.mgrid[0:480, 0:640]
    pixels = np.stack([x * 255 // 640, y * 255 // 480, (x + y) % 256], axis=-1).astype(np.uint8)
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    draw.ellipse((60, 80, 260, 280), fill=(220, 30, 30))
    draw.rectangle((360, 200, 560, 400), fill=(30, 60, 220))
    return image


def machine() -> dict:
    """CPU model and the instruction sets that decide int8 and bf16 speed, plus library versions."""
    import platform

    import onnxruntime

    flags = set()
    model = platform.processor()
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    wanted = ["avx512f", "avx512_vnni", "avx512_bf16", "amx_int8", "amx_bf16", "avx2"]
    return {"cpu": model, "cores": os.cpu_count(), "isa": [f for f in wanted if f in flags],
            "onnxruntime": onnxruntime.__version__}


def disk_gb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file()) / 1e9


def run_child(args: list[str]) -> tuple[dict, float, float]:
    """Run this script as a child; returns its JSON result, its peak RSS (GB) and wall seconds."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, __file__, *args], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"child {args} failed with status {proc.returncode}")
    result = json.loads(out.strip().splitlines()[-1]) if out.strip() else {}
    return result, usage.ru_maxrss / 1e6, time.perf_counter() - start


# ----- child processes -------------------------------------------------------------------------------------------

def worker_transformers(checkpoint: str, max_crops: int, tokens: int, threads: int) -> dict:
    import torch
    from transformers import Molmo2ForConditionalGeneration, Molmo2Processor
    from transformers.generation.streamers import BaseStreamer

    torch.set_num_threads(threads)
    model = Molmo2ForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.bfloat16).eval()
    processor = Molmo2Processor.from_pretrained(checkpoint)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    class Clock(BaseStreamer):
        def __init__(self) -> None:
            self.times: list[float] = []

        def put(self, value) -> None:
            self.times.append(time.perf_counter())

        def end(self) -> None:
            pass

    def run(n: int) -> dict:
        start = time.perf_counter()
        inputs = processor(images=[bench_image()], text=text, images_kwargs={"max_crops": max_crops},
                           return_tensors="pt")
        preprocessed = time.perf_counter()
        with torch.no_grad():
            vision_start = time.perf_counter()
            model.model.get_image_features(inputs["pixel_values"].to(torch.bfloat16), inputs["image_token_pooling"],
                                           inputs["image_grids"])
            vision_s = time.perf_counter() - vision_start
            clock = Clock()
            gen_start = time.perf_counter()
            model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False, streamer=clock)
            end = time.perf_counter()
        first = clock.times[1]  # put() gets the prompt first, then each new token
        return {"prompt_tokens": int(inputs["input_ids"].shape[1]), "preprocess_s": preprocessed - start,
                "vision_s": vision_s, "ttft_s": (preprocessed - start) + (first - gen_start),
                "prefill_s": first - gen_start - vision_s,
                "decode_tokens_per_s": (n - 1) / (end - first), "generated": len(clock.times) - 1}

    run(2)
    return run(tokens)


def worker_molmocap(model_dir: str, max_crops: int, tokens: int, threads: int) -> dict:
    from molmocap.runtime import Captioner

    captioner = Captioner.load(model_dir, threads=threads)
    captioner.stop_ids = set()  # exactly `tokens` tokens, as transformers' min_new_tokens does
    captioner.generate(bench_image(), PROMPT, max_new_tokens=2, max_crops=max_crops)
    result = captioner.generate(bench_image(), PROMPT, max_new_tokens=tokens, max_crops=max_crops)
    return {"prompt_tokens": result.prompt_tokens, "generated": len(result.token_ids), **result.timings}


def worker_export(checkpoint: str, out: str, quant: str) -> dict:
    from molmocap.export.exporter import export

    start = time.perf_counter()
    export(checkpoint, Path(out), quant=quant, force=True, progress=lambda msg: print(msg, file=sys.stderr))
    return {"export_s": time.perf_counter() - start}


def worker_fidelity(checkpoint: str, model_dir: str, positions: int, threads: int) -> dict:
    """Teacher-forced logits of transformers (bf16; fp32 of the 4B does not fit beside it) and of molmocap."""
    import torch
    from transformers import Molmo2ForConditionalGeneration, Molmo2Processor

    from molmocap.export.fidelity import compare, teacher_forced_logits
    from molmocap.runtime import Captioner

    captioner = Captioner.load(model_dir, threads=threads)
    ours, tokens = teacher_forced_logits(captioner, bench_image(), PROMPT, None, positions, max_crops=1)
    del captioner
    torch.set_num_threads(threads)
    model = Molmo2ForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.bfloat16).eval()
    processor = Molmo2Processor.from_pretrained(checkpoint)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = processor(images=[bench_image()], text=text, images_kwargs={"max_crops": 1}, return_tensors="pt")
    extra = torch.tensor([tokens], dtype=inputs["input_ids"].dtype)
    inputs["input_ids"] = torch.cat([inputs["input_ids"], extra], dim=1)
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    inputs["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(extra)], dim=1)
    with torch.no_grad():
        logits = model(**inputs, logits_to_keep=positions).logits[0].float().numpy()
    return compare(logits, ours)


# ----- the parent --------------------------------------------------------------------------------------------------

def markdown(rows: list[dict]) -> str:
    head = ("| engine | quant | max_crops | prompt tokens | TTFT s | vision s | prefill tok/s | decode tok/s "
            "| peak RSS GB | disk GB |\n|---|---|---|---|---|---|---|---|---|---|\n")
    return head + "".join(
        f"| {r['engine']} | {r['quant']} | {r['max_crops']} | {r['prompt_tokens']} | {r['ttft_s']:.2f} | "
        f"{r['vision_s']:.2f} | {r['prefill_tokens_per_s']:.0f} | {r['decode_tokens_per_s']:.2f} | "
        f"{r['peak_rss_gb']:.2f} | {r['disk_gb']:.2f} |\n" for r in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", nargs="?")
    parser.add_argument("--exports", type=Path, help="Folder holding one exported model per plan (made if missing).")
    parser.add_argument("--quants", nargs="+", default=["int8", "int4", "mixed"])
    parser.add_argument("--max-crops", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--fidelity", type=int, default=0, metavar="POSITIONS",
                        help="Also compare each plan's logits with transformers' over this many positions.")
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--out", type=Path, help="Results file (default benchmarks/results/cpu-<date>.json).")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        kind, *rest = args.worker
        workers = {"transformers": worker_transformers, "molmocap": worker_molmocap, "export": worker_export,
                   "fidelity": worker_fidelity}
        typed = [int(v) if v.isdigit() else v for v in rest]
        print(json.dumps(workers[kind](*typed)), flush=True)
        return

    rows, exports, fidelity = [], {}, {}
    for quant in args.quants:
        target = args.exports / quant
        if not (target / "molmocap.json").is_file():
            print(f"exporting {quant} ...", flush=True)
            result, rss, wall = run_child(["--worker", "export", args.checkpoint, str(target), quant])
            exports[quant] = {"export_s": round(wall, 1), "peak_rss_gb": round(rss, 2)}
            print(f"  {quant}: {wall:.0f} s, peak RSS {rss:.2f} GB", flush=True)
    engines = ([] if args.skip_transformers else [("transformers", "bf16", args.checkpoint)]) + [
        ("molmocap", quant, str(args.exports / quant)) for quant in args.quants]
    for max_crops in args.max_crops:
        for engine, quant, where in engines:
            result, rss, _ = run_child(["--worker", engine, where, str(max_crops), str(args.tokens),
                                        str(args.threads)])
            row = {"engine": engine, "quant": quant, "max_crops": max_crops, **result,
                   "prefill_tokens_per_s": result["prompt_tokens"] / result["prefill_s"],
                   "peak_rss_gb": rss, "disk_gb": disk_gb(Path(where))}
            rows.append(row)
            print(f"{engine:12s} {quant:6s} crops={max_crops} ttft={row['ttft_s']:.2f}s vision={row['vision_s']:.2f}s "
                  f"prefill={row['prefill_tokens_per_s']:.0f} tok/s decode={row['decode_tokens_per_s']:.2f} tok/s "
                  f"rss={rss:.2f} GB disk={row['disk_gb']:.2f} GB", flush=True)
    if args.fidelity:
        for quant in args.quants:
            result, _, _ = run_child(["--worker", "fidelity", args.checkpoint, str(args.exports / quant),
                                      str(args.fidelity), str(args.threads)])
            fidelity[quant] = result
            print(f"fidelity {quant} vs transformers bf16: {result}", flush=True)

    stamp = datetime.date.today().isoformat()
    out = args.out or ROOT / "benchmarks" / "results" / f"cpu-{stamp}.json"
    out.parent.mkdir(exist_ok=True)
    meta = {"threads": args.threads, "tokens": args.tokens, "checkpoint": str(args.checkpoint), "image": "640x480",
            "prompt": PROMPT, "machine": machine(), "exports": exports, "fidelity_vs_transformers_bf16": fidelity}
    rounded = [{k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()} for row in rows]
    out.write_text(json.dumps({"meta": meta, "rows": rounded}, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(rows))
    print(markdown(rows))
    print(f"saved {out}")


if __name__ == "__main__":
    main()
