"""Where the time and the memory go in an exported model on this CPU: what bounds the speed and memory targets.

Part `time`: ONNX Runtime's own per-operator profile (SessionOptions.enable_profiling) of the decoder graphs as
exported, run through the runtime's `Decoder` and `KVCache`:
- a prefill of `--prefill` tokens with each `--prefill-model` (Molmo2's image-block bias is what the runtime feeds;
  a causal one here, the cost is the same), against the same run's isolated int8 product of the MLP's shape
  (2560 x 9728, bench_kernels' DynamicQuantizeMatMul) at the same M: the share of the prefill in matrix products and
  the achieved int8 throughput, 2 x decoder weights x tokens / prefill time;
- single decode steps with each `--decode-model` after `--contexts` positions (the cache holds random values there:
  a step's cost does not depend on them), split into GroupQueryAttention (grows with the context) and the rest
  (reads the weights once per step, whatever the context), with the bandwidth that reaches: the step graph's
  weight files over the time of the other operators.
Embeddings are random: the weights do not care what they multiply. Each case is timed `--runs` times (median, min,
max of the profiled runs; per-operator times are the median run's).

Part `memory`: in a fresh process, the public `Captioner` loads the model (RSS after load), then captions the bench
image at each `--max-crops` twice; before each stage the peak RSS is reset (Linux /proc/self/clear_refs), so each
stage's peak is its own: the model's resident weights, then what a caption adds (KV cache, ONNX Runtime's arenas).
`--runs` processes; the second caption's TTFT and decode speed are recorded beside, to see what a memory change
costs. With `--baseline-src`, as many processes of another checkout alternate with them (the change under test).

    python benchmarks/profile_engine.py --prefill-model int8=EXPORT_DIR --decode-model int4=EXPORT_DIR \
        --memory-model int4=EXPORT_DIR

Writes benchmarks/results/profile-<date>.json and a .md table beside it.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from bench_cpu import PROMPT, bench_image
from bench_kernels import K, N, build
from conditions import cell, conditions, load_average, results_path, save, spread

from molmocap.export.quantize import QuantLinear
from molmocap.runtime.decoder import Decoder
from molmocap.runtime.files import replace_atomically
from molmocap.runtime.manifest import load_manifest

PRODUCTS = ("MatMulNBits", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "MatMulInteger", "MatMul", "Gemm",
            "FusedMatMul")


def decoder_weights(text: dict) -> int:
    """Weights one token multiplies in the decoder's layers (the lm_head runs on the last position only)."""
    h, d = text["hidden_size"], text["head_dim"]
    attention = h * d * (2 * text["num_heads"] + 2 * text["num_kv_heads"])
    return text["num_layers"] * (attention + 3 * h * text["intermediate_size"])


def profiled_decoder(model_dir: Path, threads: int,
                     scratch: Path) -> tuple[Decoder, dict, list[ort.InferenceSession], int]:
    """The model's decoder with profiling on in each of its sessions (prefill, and the mixed plan's step graph),
    its text geometry, its sessions and the bytes of the step graph's files (the weights a decode step reads)."""
    manifest = load_manifest(model_dir)
    components = manifest.data["components"]
    step_file = manifest.root / components.get("decoder_step", components["decoder"])
    step_bytes = sum(p.stat().st_size for p in (step_file, Path(f"{step_file}.data")) if p.is_file())
    sessions = {}
    for name in ("decoder", "decoder_step"):
        if name in manifest.data["components"]:
            options = ort.SessionOptions()
            options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
            options.enable_profiling = True
            options.profile_file_prefix = str(scratch / f"{model_dir.name}-{name}")
            options.log_severity_level = 3
            sessions[name] = ort.InferenceSession(str(manifest.root / manifest.data["components"][name]), options,
                                                  providers=["CPUExecutionProvider"])
    text = manifest.geometry["text"]
    return Decoder(sessions["decoder"], text, sessions.get("decoder_step")), text, list(sessions.values()), step_bytes


def operator_times(profile: Path) -> list[dict[str, float]]:
    """Per run of a session (in order): microseconds spent in each operator type, from ORT's profile file."""
    events = json.loads(profile.read_text())
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == "model_run")
    per_run = [collections.Counter() for _ in runs]
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            for i, (begin, end) in enumerate(runs):
                if begin <= e["ts"] <= end:
                    per_run[i][e["args"]["op_name"]] += e["dur"]
                    break
    return [dict(c) for c in per_run]


def summarize_ops(wall_ms: list[float], ops: list[dict[str, float]]) -> dict:
    """Wall time spread, and the median run's operator times (ms) with each one's share of that run."""
    middle = sorted(range(len(wall_ms)), key=wall_ms.__getitem__)[len(wall_ms) // 2]
    chosen = ops[middle]
    total = sum(chosen.values())
    top = sorted(chosen.items(), key=lambda kv: -kv[1])
    return {"wall_ms": spread(wall_ms, 2),
            "operators_ms": {op: round(us / 1e3, 2) for op, us in top},
            "operators_share": {op: round(us / total, 3) for op, us in top},
            "products_share": round(sum(us for op, us in chosen.items() if op in PRODUCTS) / total, 3)}


def time_part(args: argparse.Namespace) -> dict:
    rng = np.random.default_rng(0)
    cases = []
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        kernel_path = scratch / "int8.onnx"
        build(kernel_path, (rng.standard_normal((N, K)) * 0.02).astype(np.float32), QuantLinear("int8"))
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        kernel = ort.InferenceSession(str(kernel_path), options, providers=["CPUExecutionProvider"])
        jobs = [(label, path, True) for label, path in args.prefill_model]
        for label, model_dir, prefill in jobs + [(label, path, False) for label, path in args.decode_model]:
            decoder, text, sessions, step_bytes = profiled_decoder(model_dir, args.threads, scratch)
            hidden = text["hidden_size"]
            wall: dict[tuple, list[float]] = collections.defaultdict(list)
            order: list[tuple] = []  # (session index, case) of each profiled run, in order
            for _ in range(args.runs):
                if prefill:
                    for tokens in args.prefill:
                        cache = decoder.new_cache(tokens + 1)
                        embeds = (rng.standard_normal((1, tokens, hidden)) * 0.02).astype(np.float32)
                        causal = np.triu(np.full((tokens, tokens), np.finfo(np.float32).min, np.float32), 1)
                        start = time.perf_counter()
                        decoder.forward(embeds, causal[None, None], cache)
                        wall[("prefill", tokens)].append(1e3 * (time.perf_counter() - start))
                        order.append((0, ("prefill", tokens)))
                else:
                    step_index = len(sessions) - 1
                    for context in args.contexts:
                        cache = decoder.new_cache(context + args.steps + 1)
                        for array in cache.arrays.values():
                            array[...] = rng.standard_normal(array.shape).astype(array.dtype)
                        cache.length = context
                        times = []
                        for _ in range(args.steps):
                            embeds = (rng.standard_normal((1, 1, hidden)) * 0.02).astype(np.float32)
                            start = time.perf_counter()
                            decoder.step(embeds, cache)
                            times.append(1e3 * (time.perf_counter() - start))
                            order.append((step_index, ("decode", context)))
                        wall[("decode", context)].append(statistics.median(times))
            profiles = [operator_times(Path(s.end_profiling())) for s in sessions]
            per_case: dict[tuple, list[dict]] = collections.defaultdict(list)
            cursors = [0] * len(sessions)
            for index, case in order:
                per_case[case].append(profiles[index][cursors[index]])
                cursors[index] += 1
            for (kind, n), runs in wall.items():
                ops = per_case[(kind, n)]
                if kind == "decode":  # a run's operator times: the mean over its steps
                    ops = [{op: statistics.mean(o.get(op, 0.0) for o in ops[i:i + args.steps])
                            for op in set().union(*ops[i:i + args.steps])}
                           for i in range(0, len(ops), args.steps)]
                row = {"model": label, "kind": kind, "tokens" if kind == "prefill" else "context": n,
                       "load_average": load_average(), **summarize_ops(runs, ops)}
                if kind == "prefill":
                    row["tokens_per_s"] = spread([n / (ms / 1e3) for ms in runs], 1)
                    row["achieved_tops"] = spread([2 * decoder_weights(text) * n / (ms / 1e3) / 1e12 for ms in runs],
                                                  3)
                    x = rng.standard_normal((n, K)).astype(np.float32)
                    kernel.run(None, {"x": x})
                    seconds = []
                    for _ in range(args.runs):
                        start = time.perf_counter()
                        kernel.run(None, {"x": x})
                        seconds.append(time.perf_counter() - start)
                    row["isolated_int8_tops"] = spread([2 * n * K * N / s / 1e12 for s in seconds], 3)
                else:
                    row["tokens_per_s"] = spread([1e3 / ms for ms in runs], 2)
                    gqa = row["operators_ms"].get("GroupQueryAttention", 0.0)
                    row["attention_ms"] = gqa
                    row["rest_ms"] = round(sum(row["operators_ms"].values()) - gqa, 2)
                    row["weights_gb"] = round(step_bytes / 1e9, 3)
                    row["weights_gb_per_s"] = round(step_bytes / 1e9 / (row["rest_ms"] / 1e3), 1)
                cases.append(row)
                print(json.dumps({k: row[k] for k in row if k not in ("operators_share",)}), flush=True)
            del decoder, sessions
    return {"cases": cases}


def memory_child(model_dir: str, max_crops: int, threads: int) -> None:
    """Runs in its own process: RSS after load, then each stage's own peak over two captions, with their speed."""
    from molmocap import Captioner

    def status() -> dict[str, float]:
        found = {}
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(("VmRSS", "VmHWM")):
                    key, value = line.split(":")
                    found[key] = round(int(value.split()[0]) / 1e6, 3)
        return found

    def reset_peak() -> None:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")

    stages = [{"stage": "start", **status()}]
    captioner = Captioner.load(model_dir, threads=threads)
    stages.append({"stage": "load", **status()})
    image, speed = bench_image(), {}
    for attempt in (1, 2):
        reset_peak()
        start = time.perf_counter()
        state = captioner.prefill(image, PROMPT, max_new_tokens=32, max_crops=max_crops)
        first = time.perf_counter()
        kv_gb = sum(array.nbytes for array in state.cache.arrays.values()) / 1e9
        stages.append({"stage": f"caption {attempt}: vision + prefill", **status()})
        reset_peak()
        token = int(np.argmax(state.logits))
        for _ in range(31):
            token = int(np.argmax(captioner.step(state, token)))
        stages.append({"stage": f"caption {attempt}: 31 decode steps", **status()})
        speed = {"prompt_tokens": len(state.prompt_ids), "kv_cache_gb": round(kv_gb, 3),
                 "ttft_s": first - start, "decode_tokens_per_s": 31 / (time.perf_counter() - first)}
        del state
    print(json.dumps({"stages": stages, **speed}))


def memory_part(args: argparse.Namespace) -> dict:
    """`--runs` memory children per model; with `--baseline-src`, alternating with as many from that checkout."""
    sides = [("", None)]
    if args.baseline_src:
        scratch = Path(tempfile.mkdtemp())
        link = scratch / "molmocap"
        link.symlink_to(args.baseline_src.resolve())
        sides.insert(0, (" (baseline)", str(scratch)))
    rows = []
    for (label, model_dir), max_crops in itertools.product(args.memory_model, args.max_crops):
        children: dict[str, list[dict]] = {suffix: [] for suffix, _ in sides}
        for _ in range(args.runs):
            for suffix, path in sides:
                env = {**os.environ, "PYTHONPATH": path} if path else None
                done = subprocess.run([sys.executable, __file__, "--memory-child", str(model_dir),
                                       str(max_crops), str(args.threads)], capture_output=True, text=True,
                                      env=env, cwd=tempfile.gettempdir())
                if done.returncode:
                    raise SystemExit(f"memory child failed:\n{done.stderr[-2000:]}")
                children[suffix].append(json.loads(done.stdout.strip().splitlines()[-1]))
        for suffix, _ in sides:
            runs = children[suffix]
            stages = [{"stage": stage["stage"],
                       **{key: spread([c["stages"][i][key] for c in runs], 3) for key in ("VmRSS", "VmHWM")}}
                      for i, stage in enumerate(runs[0]["stages"])]
            rows.append({"model": label + suffix, "max_crops": max_crops,
                         "prompt_tokens": runs[0]["prompt_tokens"], "kv_cache_gb": runs[0]["kv_cache_gb"],
                         "stages": stages,
                         "peak_rss_gb": spread([max(s["VmHWM"] for s in c["stages"]) for c in runs], 3),
                         "ttft_s": spread([c["ttft_s"] for c in runs], 2),
                         "decode_tokens_per_s": spread([c["decode_tokens_per_s"] for c in runs], 2)})
            print(json.dumps(rows[-1]), flush=True)
    return {"memory": rows}


def markdown(result: dict) -> str:
    lines = [f"# Where the time and memory go, {result['meta']['date']}", "",
             f"`{result['meta']['command']}`; load average at start {result['meta']['load_average_at_start']}", ""]
    cases = result.get("cases", [])
    tables = {
        "prefill": (["prefill", "tokens", "ms", "tok/s", "achieved int8 TOP/s", "isolated int8 product TOP/s",
                     "products' share"],
                    lambda c: [c["tokens"], cell(c["wall_ms"], ""), c["tokens_per_s"]["median"],
                               c["achieved_tops"]["median"], c["isolated_int8_tops"]["median"], c["products_share"]]),
        "decode": (["decode", "after positions", "step ms", "tok/s", "GroupQueryAttention ms", "other operators ms",
                    "weights GB / other operators' time"],
                   lambda c: [c["context"], cell(c["wall_ms"], ""), c["tokens_per_s"]["median"], c["attention_ms"],
                              c["rest_ms"], f"{c['weights_gb']} GB at {c['weights_gb_per_s']} GB/s"]),
    }
    for kind, (header, columns) in tables.items():
        rows = [c for c in cases if c["kind"] == kind]
        if not rows:
            continue
        header = [*header, "top operators (ms)"]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for c in rows:
            top = ", ".join(f"{op} {ms}" for op, ms in list(c["operators_ms"].items())[:4])
            lines.append("| " + " | ".join(str(v) for v in [c["model"], *columns(c), top]) + " |")
        lines.append("")
    for row in result.get("memory", []):
        lines += [f"Memory, {row['model']}, max_crops {row['max_crops']} ({row['prompt_tokens']} prompt tokens, KV "
                  f"cache {row['kv_cache_gb']} GB), GB, median (min-max) of {len(row['peak_rss_gb']['runs'])} "
                  f"processes; a stage's peak is its own (reset before it): peak RSS "
                  f"{cell(row['peak_rss_gb'], '.3f')}, TTFT {cell(row['ttft_s'], '.2f')} s, decode "
                  f"{cell(row['decode_tokens_per_s'], '.2f')} tok/s (the second caption's)", "",
                  "| stage | RSS after | peak during |", "|---|---|---|"]
        lines += [f"| {s['stage']} | {cell(s['VmRSS'], '.3f')} | {cell(s['VmHWM'], '.3f')} |" for s in row["stages"]]
        lines.append("")
    return "\n".join(lines)


def pair(text: str) -> tuple[str, Path]:
    label, _, path = text.partition("=")
    if not path:
        raise argparse.ArgumentTypeError(f"expected LABEL=EXPORT_DIR, got {text!r}")
    return label, Path(path).resolve()


def main() -> None:
    if sys.argv[1:2] == ["--memory-child"]:
        memory_child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prefill-model", type=pair, action="append", default=[], metavar="LABEL=DIR")
    parser.add_argument("--decode-model", type=pair, action="append", default=[], metavar="LABEL=DIR")
    parser.add_argument("--memory-model", type=pair, action="append", default=[], metavar="LABEL=DIR")
    parser.add_argument("--prefill", type=int, nargs="+", default=[423, 765], help="prompt lengths")
    parser.add_argument("--contexts", type=int, nargs="+", default=[100, 423, 765], help="positions before a step")
    parser.add_argument("--steps", type=int, default=8, help="decode steps per run (a run's time: their median)")
    parser.add_argument("--max-crops", type=int, nargs="+", default=[8])
    parser.add_argument("--baseline-src", type=Path, help="a molmocap checkout whose memory children alternate with "
                        "this one's (git worktree add --detach DIR COMMIT)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=results_path("profile"))
    args = parser.parse_args()
    if args.runs < 3:
        parser.error("--runs must be at least 3: a speed figure is a median of at least 3 runs")
    if not (args.prefill_model or args.decode_model or args.memory_model):
        parser.error("name at least one --prefill-model, --decode-model or --memory-model")
    result = {"meta": conditions()}
    if args.prefill_model or args.decode_model:
        result.update(time_part(args))
    if args.memory_model:
        result.update(memory_part(args))
    result["meta"]["load_average_at_end"] = load_average()
    save(args.out, result)
    replace_atomically(args.out.with_suffix(".md"), (markdown(result) + "\n").encode())
    print(markdown(result))


if __name__ == "__main__":
    main()
