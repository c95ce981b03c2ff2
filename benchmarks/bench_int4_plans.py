"""Candidate 4-bit plans side by side: fidelity to a reference export, size on disk, memory and decode speed.

Each candidate (`CANDIDATES`: block 32 instead of 128, the lm_head at 8 bits, the first and last decoder layers at
8 bits, and combinations) is exported from CHECKPOINT in a child process (its wall time and peak RSS recorded) and
measured; the exports are deleted at the end unless `--keep` (a 4B export is 3 GB):
- fidelity: the reference export (`--reference`, e.g. the int8 export of the same checkpoint) reads the check images
  of `molmocap export --check` (export/check.py) at max_crops 1 and decodes greedily for `--positions` tokens each;
  every candidate is fed the same tokens (teacher forcing) and its next-token logits are compared with the
  reference's: top-1 agreement and cosine. The reference logits are computed once, in a child;
- speed and memory: `--runs` children per candidate, interleaved across candidates so that the load of this shared
  machine falls on all alike, each load the candidate (RSS right after loading), warm up, then caption the
  benchmark image of bench_cpu.py at max_crops 1 for exactly `--tokens` greedy tokens through the public
  prefill/step API: time to first token, prefill tokens/s, decode tokens/s, decode tokens per CPU-second (the
  process's CPU time over the decode steps, which other processes' load disturbs far less than wall time), and the
  child's peak RSS, each as median, min and max, with the load average around each run.

    python benchmarks/bench_int4_plans.py /work/bench-data/molmo2-4b-synthetic \\
        --reference /work/bench-data/onnx-engine/int8 --exports benchmarks/out/int4-plans --label 4b

Saves benchmarks/results/int4-plans-<label>-<date>.json (and .md), rewritten after each plan.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from bench_cpu import PROMPT, bench_image, greedy
from conditions import cell, conditions, load_average, load_span, results_path, run_loads, save, spread

from molmocap.export.plan import INT4, INT8_BLOCKS, PLANS, ExportPlan
from molmocap.runtime.files import replace_atomically

SPEED = ["ttft_s", "prefill_tokens_per_s", "decode_tokens_per_s", "decode_tokens_per_cpu_s", "load_rss_gb",
         "peak_rss_gb"]
INT4_B32 = replace(INT4, block_size=32)
BASE = PLANS["int4"]
CANDIDATES: dict[str, ExportPlan] = {
    "int4": BASE,
    "int4-b32": replace(BASE, prefill=INT4_B32, lm_head=INT4_B32),
    "int4-head8": replace(BASE, lm_head=INT8_BLOCKS),
    "int4-edge1": replace(BASE, edge_layers=1),
    "int4-head8-edge1": replace(BASE, lm_head=INT8_BLOCKS, edge_layers=1),
    "int4-head8-edge2": replace(BASE, lm_head=INT8_BLOCKS, edge_layers=2),
}


def plan_for(name: str) -> ExportPlan:
    """A candidate by name, or a shipped plan (`molmocap export --quant`)."""
    return CANDIDATES.get(name) or PLANS[name]


# ----- child processes -------------------------------------------------------------------------------------------

def worker_export(checkpoint: str, out: str, name: str) -> dict:
    from molmocap.export.exporter import export

    export(checkpoint, Path(out), quant=name, force=True, plan=plan_for(name))
    return {}


def worker_reference(model_dir: str, positions: int, threads: int, out: str) -> dict:
    """The reference's own greedy continuation and its logits on every check image, saved to `out` (.npz)."""
    from molmocap import Captioner
    from molmocap.export.check import MAX_CROPS, drawn_images
    from molmocap.export.fidelity import teacher_forced_logits

    captioner = Captioner.load(model_dir, threads=threads)
    logits, tokens = zip(*(teacher_forced_logits(captioner, image, PROMPT, None, positions, MAX_CROPS)
                           for _, image in drawn_images()))
    np.savez(out, logits=np.stack(logits), tokens=np.array(tokens))
    return {"model_id": captioner.manifest.model_id}


def worker_fidelity(model_dir: str, reference: str, threads: int) -> dict:
    """The candidate fed the reference's tokens; its logits compared with the reference's, per image and overall."""
    from molmocap import Captioner
    from molmocap.export.check import MAX_CROPS, drawn_images
    from molmocap.export.fidelity import compare, teacher_forced_logits

    saved = np.load(reference)
    captioner = Captioner.load(model_dir, threads=threads)
    positions = saved["logits"].shape[1]
    ours = [teacher_forced_logits(captioner, image, PROMPT, list(tokens), positions, MAX_CROPS)[0]
            for (_, image), tokens in zip(drawn_images(), saved["tokens"])]
    per_image = {name: compare(ref, cand) for (name, _), ref, cand in zip(drawn_images(), saved["logits"], ours)}
    return {**compare(np.concatenate(saved["logits"]), np.concatenate(ours)), "per_image": per_image}


def worker_speed(model_dir: str, tokens: int, threads: int) -> dict:
    """Load (RSS after it), a 2-token warm-up, then one measured caption of exactly `tokens` tokens."""
    from molmocap import Captioner

    captioner = Captioner.load(model_dir, threads=threads)
    load_rss_gb = rss_gb()
    image = bench_image()
    greedy(captioner, image, PROMPT, 2, max_crops=1)
    before = load_average()
    start = time.perf_counter()
    state = captioner.prefill(image, PROMPT, max_new_tokens=tokens, max_crops=1)
    ttft = time.perf_counter() - start
    token, cpu, wall = int(np.argmax(state.logits)), time.process_time(), time.perf_counter()
    for _ in range(tokens - 1):
        token = int(np.argmax(captioner.step(state, token)))
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return {**state.timings, "ttft_s": ttft, "prompt_tokens": len(state.prompt_ids),
            "decode_tokens_per_s": (tokens - 1) / wall, "decode_tokens_per_cpu_s": (tokens - 1) / cpu,
            "load_rss_gb": load_rss_gb, "load_average_before": before, "load_average_after": load_average()}


def rss_gb() -> float:
    """This process's resident memory now (VmRSS), in GB."""
    with open("/proc/self/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return kib * 1024 / 1e9


# ----- the parent --------------------------------------------------------------------------------------------------

def run_child(args: list[str]) -> tuple[dict, float, float]:
    """Run this script as a child; its JSON result, peak RSS (GB) and wall seconds."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, __file__, "--worker", *args], stdout=subprocess.PIPE, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"child {args} failed with status {os.waitstatus_to_exitcode(status)}")
    return json.loads(out.strip().splitlines()[-1]), usage.ru_maxrss / 1e6, time.perf_counter() - start


def disk_gb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e9


def prepare(name: str, out: Path, reference_logits: Path, args) -> dict:
    """Export `name` if missing, then its size and fidelity."""
    row: dict = {"plan": name}
    if not (out / "molmocap.json").is_file():
        print(f"{name}: exporting", flush=True)
        before = load_average()
        _, peak, wall = run_child(["export", args.checkpoint, str(out), name])
        row["export"] = {"export_s": round(wall, 1), "peak_rss_gb": round(peak, 3), "load_average_before": before,
                         "load_average_after": load_average()}
    row["plan_spec"] = json.loads((out / "molmocap.json").read_text())["plan"]
    row["disk_gb"] = round(disk_gb(out), 3)
    before = load_average()
    fidelity, _, _ = run_child(["fidelity", str(out), str(reference_logits), str(args.threads)])
    row["fidelity"] = {**fidelity, "load_average_before": before, "load_average_after": load_average()}
    print(f"{name}: top-1 {fidelity['top1_agreement']:.3f}, cosine {fidelity['cosine_mean']:.4f}, "
          f"{row['disk_gb']:.2f} GB on disk", flush=True)
    return row


def add_speed(row: dict, runs: list[tuple[dict, float]]) -> None:
    """Median, min and max of each speed and memory figure over a plan's runs."""
    results = [{**r, "prefill_tokens_per_s": r["prompt_tokens"] / r["prefill_s"], "peak_rss_gb": peak}
               for r, peak in runs]
    row["prompt_tokens"] = results[0]["prompt_tokens"]
    for key in SPEED:
        row[key] = spread([r[key] for r in results], 3)
    row["load_average"] = run_loads(results)


def markdown(meta: dict, rows: list[dict]) -> str:
    head = (f"Candidate 4-bit plans of `{meta['checkpoint']}`. Fidelity: top-1 agreement and mean logit cosine "
            f"against `{meta['reference']}` over {meta['positions']} teacher-forced positions on each of the 3 "
            f"check images (max_crops 1). Speed: median (min-max) of {meta['runs']} runs, each its own process, "
            f"{meta['tokens']} tokens at max_crops 1, {meta['threads']} threads.\nCommand: `{meta['command']}`\n\n"
            "| plan | top-1 | cosine | disk GB | load RSS GB | peak RSS GB | TTFT s | prefill tok/s | decode tok/s "
            "| decode tok/CPU-s | load avg (1 min) |\n|---|---|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in rows:
        if "load_average" not in r:
            continue  # speed not measured yet
        lines.append(f"| {r['plan']} | {r['fidelity']['top1_agreement']:.3f} | {r['fidelity']['cosine_mean']:.4f} | "
                     f"{r['disk_gb']:.2f} | {cell(r['load_rss_gb'], '.2f')} | {cell(r['peak_rss_gb'], '.2f')} | "
                     f"{cell(r['ttft_s'], '.2f')} | {cell(r['prefill_tokens_per_s'], '.0f')} | "
                     f"{cell(r['decode_tokens_per_s'], '.2f')} | {cell(r['decode_tokens_per_cpu_s'], '.2f')} | "
                     f"{load_span(r['load_average'])} |\n")
    return head + "".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", nargs="?")
    parser.add_argument("--reference", type=Path, help="The higher-precision export to compare with (e.g. int8).")
    parser.add_argument("--exports", type=Path, help="Folder to export each candidate into (<plan>/).")
    parser.add_argument("--plans", nargs="+", default=list(CANDIDATES))
    parser.add_argument("--positions", type=int, default=48, help="Teacher-forced positions per check image.")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3, help="Speed runs (processes) per plan.")
    parser.add_argument("--keep", action="store_true", help="Keep each export (default: delete it once measured).")
    parser.add_argument("--label", default="4b", help="Names the results file: int4-plans-<label>-<date>.json.")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        kind, *rest = args.worker
        workers = {"export": worker_export, "reference": worker_reference, "fidelity": worker_fidelity,
                   "speed": worker_speed}
        typed = [int(v) if v.isdigit() else v for v in rest]
        print(json.dumps(workers[kind](*typed)), flush=True)
        return
    if not (args.checkpoint and args.reference and args.exports):
        parser.error("CHECKPOINT, --reference and --exports are required")
    if args.runs < 3:
        parser.error("--runs must be at least 3: a speed figure is a median of at least 3 runs")
    unknown = [name for name in args.plans if name not in CANDIDATES and name not in PLANS]
    if unknown:
        parser.error(f"unknown plans {unknown}; candidates: {', '.join(CANDIDATES)}")

    started = time.perf_counter()
    out = results_path(f"int4-plans-{args.label}")
    meta = {**conditions(), "checkpoint": args.checkpoint, "reference": str(args.reference),
            "positions": args.positions, "tokens": args.tokens, "threads": args.threads, "runs": args.runs,
            "image": "640x480 (bench_cpu.py)", "prompt": PROMPT, "max_crops": 1}
    args.exports.mkdir(parents=True, exist_ok=True)
    reference_logits = args.exports / f"reference-logits-{args.positions}.npz"
    if not reference_logits.is_file():
        print("reference logits ...", flush=True)
        before = load_average()
        result, peak, wall = run_child(["reference", str(args.reference), str(args.positions), str(args.threads),
                                        str(reference_logits)])
        meta["reference_run"] = {**result, "wall_s": round(wall, 1), "peak_rss_gb": round(peak, 3),
                                 "load_average_before": before, "load_average_after": load_average()}
    rows = []

    def write(complete: bool) -> None:
        meta.update({"complete": complete, "load_average_at_end": load_average(),
                     "wall_s": round(time.perf_counter() - started, 1)})
        save(out, {"meta": meta, "rows": rows})
        replace_atomically(out.with_suffix(".md"), markdown(meta, rows).encode())

    for name in args.plans:
        rows.append(prepare(name, args.exports / name, reference_logits, args))
        write(complete=False)
    runs: dict[str, list[tuple[dict, float]]] = {name: [] for name in args.plans}
    for i in range(args.runs):
        for name in args.plans:
            result, peak, _ = run_child(["speed", str(args.exports / name), str(args.tokens), str(args.threads)])
            runs[name].append((result, peak))
            print(f"run {i + 1}/{args.runs} {name}: decode {result['decode_tokens_per_s']:.2f} tok/s "
                  f"({result['decode_tokens_per_cpu_s']:.2f} per CPU-s), ttft {result['ttft_s']:.1f} s, load RSS "
                  f"{result['load_rss_gb']:.2f} GB, peak {peak:.2f} GB", flush=True)
    for row in rows:
        add_speed(row, runs[row["plan"]])
    write(complete=True)
    if not args.keep:
        for name in args.plans:
            shutil.rmtree(args.exports / name)
    print(markdown(meta, rows))


if __name__ == "__main__":
    main()
