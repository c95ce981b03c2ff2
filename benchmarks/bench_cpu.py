"""CPU speed and memory of molmocap against transformers on a full-size Molmo2-4B checkpoint, in one session.

Every engine captions the same image with the same prompt and generates exactly `--tokens` tokens, at each
`--max-crops`. Each run is its own process (load, a 2-token warm-up, the measured caption), so its peak RSS is its
own; `--runs` runs per engine and setting, interleaved across engines so that the load of this shared machine falls
on all of them alike. Rows: median, min and max of time to first token, vision seconds, prefill tokens/s, decode
tokens/s and peak RSS, the load average before and after each measured run, and model size on disk; transformers
bf16 (what a user would pick) is the baseline. With `--fidelity`, each molmocap plan's next-token logits are compared
with transformers' over teacher-forced positions, at each max_crops, and put in the same row. Missing exports are made
first (bench_export.py's way, their time and peak RSS recorded). The results file is rewritten after each max_crops
and each fidelity pass, with `complete` false until the end, so a run cut short on a busy machine keeps what it did.

    python benchmarks/make_synthetic_checkpoint.py /data/molmo2-4b-synthetic
    python benchmarks/bench_cpu.py /data/molmo2-4b-synthetic --exports /data/molmo2-4b-onnx --fidelity 256

Writes benchmarks/results/cpu-<date>.json (and .md): the conditions (command, machine, versions) and one row per
engine, plan and max_crops.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from conditions import cell, conditions, load_average, load_span, results_path, run_loads, save, spread
from PIL import Image, ImageDraw

from molmocap.runtime.files import replace_atomically

PROMPT = "Describe this image."
SPEED = ["ttft_s", "vision_s", "prefill_s", "prefill_tokens_per_s", "decode_tokens_per_s"]


def bench_image() -> Image.Image:
    """A 640x480 picture with shapes and gradients (the size REFERENCE.md's transformers figures use)."""
    y, x = np.mgrid[0:480, 0:640]
    pixels = np.stack([x * 255 // 640, y * 255 // 480, (x + y) % 256], axis=-1).astype(np.uint8)
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    draw.ellipse((60, 80, 260, 280), fill=(220, 30, 30))
    draw.rectangle((360, 200, 560, 400), fill=(30, 60, 220))
    return image


def disk_gb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e9


def run_child(args: list[str]) -> tuple[dict, float]:
    """Run this script as a child; returns its JSON result and its peak RSS (GB)."""
    proc = subprocess.Popen([sys.executable, __file__, *args], stdout=subprocess.PIPE, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"child {args} failed with status {os.waitstatus_to_exitcode(status)}")
    return json.loads(out.strip().splitlines()[-1]), usage.ru_maxrss / 1e6


# ----- child processes -------------------------------------------------------------------------------------------

def transformers_inputs(processor, max_crops: int):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return processor(images=[bench_image()], text=text, images_kwargs={"max_crops": max_crops}, return_tensors="pt")


def worker_transformers(checkpoint: str, max_crops: int, tokens: int, threads: int) -> dict:
    import torch
    from transformers import Molmo2ForConditionalGeneration, Molmo2Processor
    from transformers.generation.streamers import BaseStreamer

    torch.set_num_threads(threads)
    model = Molmo2ForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.bfloat16).eval()
    processor = Molmo2Processor.from_pretrained(checkpoint)

    class Clock(BaseStreamer):
        def __init__(self) -> None:
            self.times: list[float] = []

        def put(self, value) -> None:
            self.times.append(time.perf_counter())

        def end(self) -> None:
            pass

    def run(n: int) -> dict:
        start = time.perf_counter()
        inputs = transformers_inputs(processor, max_crops)
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
    return measured(run, tokens)


def greedy(captioner, image, prompt: str, tokens: int, max_crops: int | None = None) -> tuple[list[int], dict]:
    """Exactly `tokens` greedy tokens, stop tokens included (as transformers' min_new_tokens gives), through the
    public `Captioner.prefill` and `Captioner.step`; with `generate`'s timings (the first token is the prefill's)."""
    start = time.perf_counter()
    state = captioner.prefill(image, prompt, max_new_tokens=tokens, max_crops=max_crops)
    first = time.perf_counter()
    ids = [int(np.argmax(state.logits))]
    while len(ids) < tokens:
        ids.append(int(np.argmax(captioner.step(state, ids[-1]))))
    end = time.perf_counter()
    return ids, {**state.timings, "ttft_s": first - start, "total_s": end - start,
                 "decode_tokens_per_s": (tokens - 1) / (end - first) if tokens > 1 else 0.0,
                 "prompt_tokens": len(state.prompt_ids)}


def worker_molmocap(model_dir: str, max_crops: int, tokens: int, threads: int) -> dict:
    from molmocap import Captioner

    captioner = Captioner.load(model_dir, threads=threads)

    def run(n: int) -> dict:
        ids, timings = greedy(captioner, bench_image(), PROMPT, n, max_crops)
        return {"generated": len(ids), **timings}

    run(2)
    return measured(run, tokens)


def measured(run, tokens: int) -> dict:
    """One measured run, with the load average just before and after it."""
    before = load_average()
    result = run(tokens)
    return {**result, "load_average_before": before, "load_average_after": load_average()}


def worker_fidelity(checkpoint: str, model_dir: str, max_crops: int, positions: int, threads: int) -> dict:
    """Teacher-forced logits of transformers (bf16; fp32 of the 4B does not fit beside it) and of molmocap."""
    import torch
    from transformers import Molmo2ForConditionalGeneration, Molmo2Processor

    from molmocap import Captioner
    from molmocap.export.fidelity import compare, teacher_forced_logits

    captioner = Captioner.load(model_dir, threads=threads)
    ours, tokens = teacher_forced_logits(captioner, bench_image(), PROMPT, None, positions, max_crops=max_crops)
    del captioner
    torch.set_num_threads(threads)
    model = Molmo2ForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.bfloat16).eval()
    inputs = transformers_inputs(Molmo2Processor.from_pretrained(checkpoint), max_crops)
    extra = torch.tensor([tokens], dtype=inputs["input_ids"].dtype)
    inputs["input_ids"] = torch.cat([inputs["input_ids"], extra], dim=1)
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    inputs["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(extra)], dim=1)
    with torch.no_grad():
        logits = model(**inputs, logits_to_keep=positions).logits[0].float().numpy()
    return compare(logits, ours)


# ----- the parent --------------------------------------------------------------------------------------------------

def summarize(engine: str, quant: str, max_crops: int, where: str, runs: list[tuple[dict, float]]) -> dict:
    """One row: median/min/max of each speed figure and of peak RSS over the runs, and the load around each."""
    results = [{**r, "prefill_tokens_per_s": r["prompt_tokens"] / r["prefill_s"]} for r, _ in runs]
    row = {"engine": engine, "quant": quant, "max_crops": max_crops, "runs": len(runs),
           "prompt_tokens": results[0]["prompt_tokens"], "generated": [r["generated"] for r in results]}
    row.update({key: spread([r[key] for r in results]) for key in SPEED})
    row["peak_rss_gb"] = spread([rss for _, rss in runs], 3)
    row["disk_gb"] = round(disk_gb(Path(where)), 3)
    row["load_average"] = run_loads(results)
    return row


def markdown(meta: dict, rows: list[dict]) -> str:
    head = (f"Median (min-max) of {rows[0]['runs']} runs, each its own process; {meta['tokens']} tokens, "
            f"{meta['threads']} threads, {meta['machine']['cpu']} ({meta['machine']['cores']} cores). Fidelity: "
            f"top-1 agreement and mean logit cosine against transformers bf16 over teacher-forced positions.\n"
            f"Command: `{meta['command']}`\n\n"
            "| engine | quant | max_crops | prompt tokens | TTFT s | vision s | prefill tok/s | decode tok/s "
            "| peak RSS GB | disk GB | top-1 | cosine | load avg (1 min) |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in rows:
        fid = r.get("fidelity_vs_transformers_bf16")
        lines.append(
            f"| {r['engine']} | {r['quant']} | {r['max_crops']} | {r['prompt_tokens']} | {cell(r['ttft_s'], '.2f')} | "
            f"{cell(r['vision_s'], '.2f')} | {cell(r['prefill_tokens_per_s'], '.0f')} | "
            f"{cell(r['decode_tokens_per_s'], '.2f')} | {cell(r['peak_rss_gb'], '.2f')} | {r['disk_gb']:.2f} | "
            + (f"{fid['top1_agreement']:.3f} | {fid['cosine_mean']:.4f} | " if fid else "reference | reference | "
               if r["engine"] == "transformers" else "- | - | ")
            + f"{load_span(r['load_average'])} |\n")
    return head + "".join(lines)


def write(out: Path, meta: dict, rows: list[dict], started: float, complete: bool) -> None:
    """Save the rows measured so far (JSON and a markdown table), saying whether the run is complete."""
    meta.update({"complete": complete, "load_average_at_end": load_average(),
                 "wall_s": round(time.perf_counter() - started, 1)})
    save(out, {"meta": meta, "rows": rows})
    replace_atomically(out.with_suffix(".md"), markdown(meta, rows).encode())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", nargs="?")
    parser.add_argument("--exports", type=Path, help="Folder holding one exported model per plan (made if missing).")
    parser.add_argument("--quants", nargs="+", default=["int8", "int4", "mixed"])
    parser.add_argument("--max-crops", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3, help="Measured runs (processes) per engine and max_crops.")
    parser.add_argument("--fidelity", type=int, default=0, metavar="POSITIONS",
                        help="Also compare each plan's logits with transformers' over this many positions.")
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--out", type=Path, help="Results file (default benchmarks/results/cpu-<date>.json).")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        kind, *rest = args.worker
        workers = {"transformers": worker_transformers, "molmocap": worker_molmocap, "fidelity": worker_fidelity}
        typed = [int(v) if v.isdigit() else v for v in rest]
        print(json.dumps(workers[kind](*typed)), flush=True)
        return
    if args.runs < 3:
        parser.error("--runs must be at least 3: a speed figure is a median of at least 3 runs")

    started = time.perf_counter()
    out = args.out or results_path("cpu")
    meta = {**conditions("torch", "transformers"), "threads": args.threads, "tokens": args.tokens,
            "runs": args.runs, "checkpoint": str(args.checkpoint), "exports_folder": str(args.exports),
            "image": "640x480", "prompt": PROMPT, "fidelity_positions": args.fidelity, "exports_made": {}}
    missing = [q for q in args.quants if not (args.exports / q / "molmocap.json").is_file()]
    if missing:
        from bench_export import export_plan

        for quant in missing:
            print(f"exporting {quant} ...", flush=True)
            meta["exports_made"][quant] = export_plan(args.checkpoint, args.exports / quant, quant, None)
            print(f"  {quant}: {meta['exports_made'][quant]}", flush=True)
    engines = ([] if args.skip_transformers else [("transformers", "bf16", args.checkpoint)]) + [
        ("molmocap", quant, str(args.exports / quant)) for quant in args.quants]
    rows = []
    for max_crops in args.max_crops:
        runs: dict[str, list[tuple[dict, float]]] = {quant: [] for _, quant, _ in engines}
        for i in range(args.runs):
            for engine, quant, where in engines:
                result, rss = run_child(["--worker", engine, where, str(max_crops), str(args.tokens),
                                         str(args.threads)])
                runs[quant].append((result, rss))
                print(f"run {i + 1}/{args.runs} {engine:12s} {quant:6s} crops={max_crops} "
                      f"ttft={result['ttft_s']:.2f}s vision={result['vision_s']:.2f}s "
                      f"decode={result['decode_tokens_per_s']:.2f} tok/s rss={rss:.2f} GB "
                      f"load {result['load_average_before'][0]:.2f}->{result['load_average_after'][0]:.2f}",
                      flush=True)
        new = [summarize(engine, quant, max_crops, where, runs[quant]) for engine, quant, where in engines]
        rows.extend(new)
        write(out, meta, rows, started, complete=False)
        if args.fidelity:
            for row, (engine, quant, where) in zip(new, engines):
                if engine != "molmocap":
                    continue
                load_before = load_average()
                result, _ = run_child(["--worker", "fidelity", args.checkpoint, where, str(max_crops),
                                       str(args.fidelity), str(args.threads)])
                row["fidelity_vs_transformers_bf16"] = {**result, "load_average_before": load_before,
                                                        "load_average_after": load_average()}
                print(f"fidelity {quant} crops={max_crops} vs transformers bf16: {result}", flush=True)
            write(out, meta, rows, started, complete=False)
    write(out, meta, rows, started, complete=True)
    print(markdown(meta, rows))


if __name__ == "__main__":
    main()
