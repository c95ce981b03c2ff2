"""Exported plans on a GPU beside transformers bf16 on the same GPU, in one session: TTFT and decode tokens/s.

For each exported model directory (its plan read from its manifest), on `--device`:
- single: `Captioner.generate` on a 640x480 picture (bench_cpu's) with "Describe this image." at each `--max-crops`:
  time to first token (preprocessing, vision and prefill) and decode tokens/s of one sequence;
- batch: at each `--batch-sizes` B, B describe-style questions about one encoded image (the first max_crops) started
  with `Captioner.start` and stepped in one `DecodeBatch` until every answer ends; aggregate decode tokens/s = the
  tokens the decoder produced (one per row per step, counted, not assumed) / the steps' wall time, prefill excluded;
  how many rows reached their `--tokens` budget is recorded beside it;
- with `--compare-cpu`: the greedy tokens of one caption on the device and on the CPU provider, identical or the
  first position where they differ (slow for a 4B: the CPU run decodes `--tokens` tokens on the CPU).
With `--checkpoint`, transformers' Molmo2ForConditionalGeneration in bf16 runs the same single and batch cases on
the same device, in a child process (torch is imported there only), before the plans; each plan's figures are then
also given as a ratio to it. Each figure is the median, min and max of `--runs` runs after one warm-up run that is
not counted. The issue's targets for Molmo2-4B on an H200 are checked per plan (decode at B=1 >= 100 tokens/s, TTFT
at max_crops 8 <= 0.3 s, aggregate decode at B=8 >= 500 tokens/s, the CPU's tokens); they apply to the 4B's
geometry, recorded in each row.

    pip install onnxruntime-gpu   # in place of onnxruntime, for --device cuda
    python benchmarks/bench_gpu.py /data/molmo2-4b-onnx/int4 /data/molmo2-4b-onnx/fp32 \\
        --checkpoint /data/molmo2-4b-synthetic --device cuda --compare-cpu --label 4b

Writes benchmarks/results/gpu-<label>-<date>.json (or `--out`) after each model, `complete` false until the end,
with the conditions (command, machine, versions), the GPU (nvidia-smi) and one row per plan; prints a summary table.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
from pathlib import Path

from bench_cpu import bench_image
from conditions import conditions, failure, load_average, results_path, save, spread

from molmocap import Captioner
from molmocap.runtime.batching import DecodeBatch
from molmocap.runtime.errors import MolmocapError
from molmocap.runtime.manifest import load_manifest
from molmocap.runtime.sessions import providers

PROMPT = "Describe this image."
# Questions a captioning model answers at length, so that batch rows tend to decode their whole budget (the demo
# model at max_crops 1: 82 to 128 tokens each); the tokens actually decoded are counted all the same.
BATCH_PROMPTS = ["Describe this image.", "Describe this image in detail.", "Describe every object in this image.",
                 "Describe this image fully.", "Describe this image carefully.", "Describe everything in this image.",
                 "Describe the image in detail.", "Describe this image, please."]
# The targets for Molmo2-4B on an H200: (figure, comparison, bound).
TARGETS = [("decode_b1_tokens_per_s", ">=", 100.0), ("ttft_max_crops_8_s", "<=", 0.3),
           ("aggregate_b8_tokens_per_s", ">=", 500.0), ("same_tokens_as_cpu", "==", True)]


# ----- the GPU, as nvidia-smi sees it ------------------------------------------------------------------------------

def nvidia_smi(*fields: str) -> list[str] | None:
    """The first GPU's `fields` from nvidia-smi; None where there is no nvidia-smi or it fails."""
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = out.stdout.strip().splitlines()
    return [v.strip() for v in lines[0].split(",")] if out.returncode == 0 and lines else None


def gpu() -> dict | None:
    """Name, driver and memory of the GPU the figures come from."""
    found = nvidia_smi("name", "driver_version", "memory.total")
    return None if found is None else {"name": found[0], "driver": found[1], "memory_total_mib": int(found[2])}


def gpu_memory_used_mib() -> int | None:
    """Memory in use on the GPU now (all processes; on a lent GPU, this one)."""
    found = nvidia_smi("memory.used")
    return None if found is None else int(found[0])


# ----- molmocap ------------------------------------------------------------------------------------------------------

def counted(run, runs: int) -> list:
    """`run()` once as a warm-up, then `runs` times; the results of the counted runs."""
    run()
    return [run() for _ in range(runs)]


def single(captioner: Captioner, max_crops: int, tokens: int, runs: int) -> dict:
    """TTFT and decode tokens/s of one caption at `max_crops`, through `generate`, as a user gets them."""
    results = counted(lambda: captioner.generate(bench_image(), PROMPT, tokens, max_crops), runs)
    return {"prompt_tokens": results[0].prompt_tokens, "generated": [len(r.token_ids) for r in results],
            "ttft_s": spread([r.timings["ttft_s"] for r in results]),
            "decode_tokens_per_s": spread([r.timings["decode_tokens_per_s"] for r in results], 2)}


def batch_prompts(size: int) -> list[str]:
    return [BATCH_PROMPTS[i % len(BATCH_PROMPTS)] for i in range(size)]


def batch_decode(captioner: Captioner, encoded, size: int, tokens: int) -> tuple[float, int, int]:
    """`size` questions about `encoded` decoded together until all end: (aggregate tokens/s, tokens the decoder
    produced, rows that reached the `tokens` budget)."""
    batch = DecodeBatch(captioner, max_batch=size)
    generations = [captioner.start(encoded, prompt, tokens, batch=batch) for prompt in batch_prompts(size)]
    decoded = 0
    start = time.perf_counter()
    while batch:
        batch.step()
        decoded += len(batch)  # the rows fed in this step: the decoder produced one token for each
    elapsed = time.perf_counter() - start
    full = sum(len(generation.tokens) == tokens for generation in generations)
    return decoded / elapsed, decoded, full


def batched(captioner: Captioner, size: int, max_crops: int, tokens: int, runs: int) -> dict:
    encoded = captioner.encode_image(bench_image(), max_crops=max_crops)
    results = counted(lambda: batch_decode(captioner, encoded, size, tokens), runs)
    return {"aggregate_tokens_per_s": spread([rate for rate, _, _ in results], 2),
            "tokens_decoded": [decoded for _, decoded, _ in results],
            "rows_at_budget": [full for _, _, full in results]}


def first_difference(a: list[int], b: list[int]) -> int | None:
    """The first position where two token lists differ (a shorter one differs where it ends); None if equal."""
    found = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
    return found if found is not None or len(a) == len(b) else min(len(a), len(b))


def compare_cpu(model_dir: str, captioner: Captioner, max_crops: int, tokens: int) -> dict:
    """Greedy tokens of one caption on the device against those of the same model on the CPU provider."""
    on_device = captioner.generate(bench_image(), PROMPT, tokens, max_crops).token_ids
    on_cpu = Captioner.load(model_dir, device="cpu").generate(bench_image(), PROMPT, tokens, max_crops).token_ids
    position = first_difference(on_device, on_cpu)
    return {"same_tokens": position is None, "first_difference": position, "tokens_device": len(on_device),
            "tokens_cpu": len(on_cpu), "max_crops": max_crops}


def bench_plan(model_dir: str, args: argparse.Namespace) -> dict:
    """Every figure of one exported model on `args.device`."""
    start = time.perf_counter()
    captioner = Captioner.load(model_dir, device=args.device)
    load_s = round(time.perf_counter() - start, 2)
    row = {"model": model_dir, "plan": captioner.manifest.data["quant"], "load_s": load_s,
           "providers": captioner.decoder.session.get_providers(),
           "text_geometry": {key: captioner.manifest.geometry["text"][key]
                             for key in ("num_layers", "hidden_size", "num_heads", "num_kv_heads")},
           "load_average_before": load_average(), "single": {}, "batch": {}}
    for max_crops in args.max_crops:
        row["single"][str(max_crops)] = single(captioner, max_crops, args.tokens, args.runs)
        print(f"{row['plan']} crops={max_crops}: {row['single'][str(max_crops)]}", flush=True)
    for size in args.batch_sizes:
        row["batch"][str(size)] = batched(captioner, size, args.max_crops[0], args.tokens, args.runs)
        print(f"{row['plan']} B={size}: {row['batch'][str(size)]}", flush=True)
    row["gpu_memory_used_mib"] = gpu_memory_used_mib()
    if args.compare_cpu:
        row["cpu_match"] = compare_cpu(model_dir, captioner, args.max_crops[0], args.tokens)
        print(f"{row['plan']} against the CPU: {row['cpu_match']}", flush=True)
    row["load_average_after"] = load_average()
    return row


# ----- transformers, in a child process ----------------------------------------------------------------------------

def worker_transformers(config: dict) -> dict:
    """Transformers bf16 on `config["device"]`: the single and batch cases of `bench_plan`, with `min_new_tokens`
    so that every row decodes the whole budget."""
    import torch
    from transformers import Molmo2ForConditionalGeneration, Molmo2Processor
    from transformers.generation.streamers import BaseStreamer

    device, tokens, runs = config["device"], config["tokens"], config["runs"]
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("CUDA was asked for, but this torch sees no CUDA device (install torch with CUDA)")
    model = Molmo2ForConditionalGeneration.from_pretrained(config["checkpoint"], dtype=torch.bfloat16)
    model = model.to(device).eval()
    processor = Molmo2Processor.from_pretrained(config["checkpoint"])
    processor.tokenizer.padding_side = "left"

    class Clock(BaseStreamer):
        """When the prompt and each decoded token come out (`tolist` waits for the device)."""

        def __init__(self) -> None:
            self.times: list[float] = []

        def put(self, value) -> None:
            value.tolist()
            self.times.append(time.perf_counter())

        def end(self) -> None:
            pass

    def generate(features, start: float) -> tuple[float, float, int]:
        """(time to the first token from `start`, decode seconds after it, tokens decoded per row)."""
        clock = Clock()
        with torch.no_grad():
            model.generate(**features.to(device), max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                           streamer=clock)
        return clock.times[1] - start, clock.times[-1] - clock.times[1], len(clock.times) - 2

    def inputs(prompts: list[str], max_crops: int):
        """The processor's inputs for one picture per prompt, and when their making began (after the pictures are
        drawn, as `Captioner.generate` is given a drawn one)."""
        images = [[bench_image()] for _ in prompts]
        start = time.perf_counter()
        texts = [processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}],
            tokenize=False, add_generation_prompt=True) for prompt in prompts]
        return processor(images=images, text=texts, padding=True, images_kwargs={"max_crops": max_crops},
                         return_tensors="pt"), start

    def many(size: int) -> tuple[float, int]:
        _, decode_s, decoded = generate(*inputs(batch_prompts(size), config["max_crops"][0]))
        return size * decoded / decode_s, size * decoded

    row = {"engine": "transformers", "plan": "bf16", "model": config["checkpoint"], "torch_device":
           torch.cuda.get_device_name() if device == "cuda" else "cpu", "single": {}, "batch": {}}
    for max_crops in config["max_crops"]:
        results = counted(lambda: generate(*inputs([PROMPT], max_crops)), runs)
        row["single"][str(max_crops)] = {
            "prompt_tokens": int(inputs([PROMPT], max_crops)[0]["input_ids"].shape[1]),
            "generated": [decoded + 1 for _, _, decoded in results],
            "ttft_s": spread([ttft for ttft, _, _ in results]),
            "decode_tokens_per_s": spread([decoded / decode_s for _, decode_s, decoded in results], 2)}
    for size in config["batch_sizes"]:
        results = counted(lambda: many(size), runs)
        row["batch"][str(size)] = {"aggregate_tokens_per_s": spread([rate for rate, _ in results], 2),
                                   "tokens_decoded": [decoded for _, decoded in results]}
    row["gpu_memory_used_mib"] = gpu_memory_used_mib()
    return row


def run_transformers(args: argparse.Namespace) -> dict:
    """`worker_transformers` in a child process (torch is imported there only, and no ONNX Runtime session runs
    beside it); one error line if it fails."""
    config = {"checkpoint": args.checkpoint, "device": args.device, "tokens": args.tokens, "runs": args.runs,
              "max_crops": args.max_crops, "batch_sizes": args.batch_sizes}
    before = load_average()
    child = subprocess.run([sys.executable, __file__, "--worker", json.dumps(config)], capture_output=True, text=True)
    if child.returncode != 0:
        last = (child.stderr.strip().splitlines() or [f"exit status {child.returncode}"])[-1]
        raise SystemExit(f"error: the transformers run failed: {last}")
    row = json.loads(child.stdout.strip().splitlines()[-1])
    return {**row, "load_average_before": before, "load_average_after": load_average()}


# ----- comparison and report ---------------------------------------------------------------------------------------

def ratio(a: float, b: float) -> float | None:
    return round(a / b, 3) if b else None


def against(row: dict, reference: dict) -> dict:
    """A plan's medians over transformers': TTFT as a fraction of its time, decode as a multiple of its rate."""
    return {
        "ttft_x": {crops: ratio(s["ttft_s"]["median"], reference["single"][crops]["ttft_s"]["median"])
                   for crops, s in row["single"].items()},
        "decode_b1_x": {crops: ratio(s["decode_tokens_per_s"]["median"],
                                     reference["single"][crops]["decode_tokens_per_s"]["median"])
                        for crops, s in row["single"].items()},
        "aggregate_x": {size: ratio(b["aggregate_tokens_per_s"]["median"],
                                    reference["batch"][size]["aggregate_tokens_per_s"]["median"])
                        for size, b in row["batch"].items()},
    }


def targets(row: dict) -> dict:
    """Each of the issue's targets this run measured: the figure (a median), the bound and whether it is met."""
    first = next(iter(row["single"]))
    figures = {"decode_b1_tokens_per_s": row["single"][first]["decode_tokens_per_s"]["median"],
               "ttft_max_crops_8_s": row["single"].get("8", {}).get("ttft_s", {}).get("median"),
               "aggregate_b8_tokens_per_s": row["batch"].get("8", {}).get("aggregate_tokens_per_s", {}).get("median"),
               "same_tokens_as_cpu": row.get("cpu_match", {}).get("same_tokens")}
    checks = {">=": lambda v, b: v >= b, "<=": lambda v, b: v <= b, "==": lambda v, b: v == b}
    return {name: {"value": figures[name], "bound": f"{op} {bound}", "met": checks[op](figures[name], bound)}
            for name, op, bound in TARGETS if figures[name] is not None}


def table(rows: list[dict]) -> str:
    """Medians per engine or plan: one line per max_crops, then one per batch size; in brackets the ratio to
    transformers (TTFT: of its time; tokens/s: of its rate), where it ran; then the runs that failed."""
    failed = [row for row in rows if "error" in row]
    rows = [row for row in rows if "error" not in row]
    def vs(row: dict, kind: str, key: str) -> str:
        return f" ({row['vs_transformers'][kind][key]}x)" if "vs_transformers" in row else ""

    lines = ["| engine | plan | max_crops | prompt tokens | TTFT s | decode tok/s | same tokens as CPU |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        match = row.get("cpu_match")
        same = "-" if not match else "yes" if match["same_tokens"] else f"no, from {match['first_difference']}"
        for crops, s in row["single"].items():
            lines.append(f"| {row.get('engine', 'molmocap')} | {row['plan']} | {crops} | {s['prompt_tokens']} | "
                         f"{s['ttft_s']['median']:.3f}{vs(row, 'ttft_x', crops)} | "
                         f"{s['decode_tokens_per_s']['median']:.1f}{vs(row, 'decode_b1_x', crops)} | {same} |")
    lines += ["", "| engine | plan | batch size | aggregate decode tok/s | tokens decoded per run |",
              "|---|---|---|---|---|"]
    for row in rows:
        for size, b in row["batch"].items():
            decoded = ", ".join(str(n) for n in b["tokens_decoded"])
            lines.append(f"| {row.get('engine', 'molmocap')} | {row['plan']} | {size} | "
                         f"{b['aggregate_tokens_per_s']['median']:.1f}{vs(row, 'aggregate_x', size)} | {decoded} |")
    lines += [f"failed: {row.get('engine', row.get('model'))}: {row['error']}" for row in failed]
    return "\n".join(lines)


def number_list(text: str) -> list[int]:
    return [int(v) for v in text.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", help="Exported model directories, one plan each.")
    parser.add_argument("--checkpoint", help="Also run transformers bf16 on this checkpoint, the baseline.")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--batch-sizes", type=number_list, default=[1, 8])
    parser.add_argument("--max-crops", type=number_list, default=[1, 8],
                        help="TTFT at each; the first is also the batch part's and the CPU comparison's.")
    parser.add_argument("--tokens", type=int, default=64, help="Budget of every answer.")
    parser.add_argument("--runs", type=int, default=3, help="Counted runs per figure, after one warm-up.")
    parser.add_argument("--compare-cpu", action="store_true", help="Also compare the tokens with the CPU's.")
    parser.add_argument("--label", help="Names the results file: gpu-<label>-<date>.json (default: the plans).")
    parser.add_argument("--out", type=Path, help="Results file (default benchmarks/results/gpu-<label>-<date>.json).")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker_transformers(json.loads(args.worker))), flush=True)
        return
    if not args.models:
        parser.error("give at least one exported model directory")
    if args.runs < 3:
        print("note: fewer than 3 runs: figures are single measurements, not medians", file=sys.stderr)
    try:
        providers(args.device)  # no CUDA: one line now, not after the transformers run
        plans = [load_manifest(Path(model)).data["quant"] for model in args.models]
    except MolmocapError as exc:
        raise SystemExit(f"error: {exc}") from None
    args.models = [str(Path(model).resolve()) for model in args.models]
    out = args.out or results_path(f"gpu-{args.label or '-'.join(plans)}")
    data = {"conditions": conditions("onnxruntime-gpu", "torch", "transformers"), "gpu": gpu(),
            "device": args.device, "image": "640x480", "prompt": PROMPT, "batch_prompts": BATCH_PROMPTS,
            "tokens": args.tokens, "runs": args.runs, "warm_up_runs": 1, "max_crops": args.max_crops,
            "batch_sizes": args.batch_sizes, "checkpoint": args.checkpoint, "complete": False, "rows": []}
    reference = None
    if args.checkpoint:
        print("transformers bf16 ...", flush=True)
        try:
            reference = run_transformers(args)
        except SystemExit as exc:  # its one error line, kept in the results; the plans are measured all the same
            data["rows"].append({"engine": "transformers", "plan": "bf16", "error": str(exc)})
        else:
            data["rows"].append(reference)
        save(out, data)
    for model in args.models:
        try:
            row = bench_plan(model, args)
        except MolmocapError as exc:
            raise SystemExit(f"error: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - a device kernel that fails: recorded, and the next plan still runs
            data["rows"].append({"model": model, "error": failure(exc)})
            print(f"{model}: {data['rows'][-1]['error']}", flush=True)
            save(out, data)
            continue
        if reference:
            row["vs_transformers"] = against(row, reference)
        row["targets"] = targets(row)
        data["rows"].append(row)
        save(out, data)
        gc.collect()  # the next plan's sessions start on a free device
    data["complete"] = True
    save(out, data)
    print(table(data["rows"]))


if __name__ == "__main__":
    main()
