"""Decoder speed before and after a runtime change: prefill and decode tokens/s at several context lengths.

Builds a mid-size random Molmo2 (hidden 1024, 8 layers, 16/4 heads of 64, MLP 2816, vocabulary 32k; tiny vision),
exports it under each plan with this checkout's exporter and with a baseline checkout's (`--baseline-src`, any
molmocap checkout), then, `--runs` times and alternating baseline and current so that the shared machine's drift
hits both alike, prefills `--contexts` random text tokens and times `--tokens` greedy decode steps, each run in its
own process. A run's decode speed is one over its median step time (robust to other processes' bursts on a shared
machine); the report gives the median of the runs with their min/max, and the median of each run's
current/baseline ratio (the two ran back to back, so the pair shares the machine's state). Beside wall-clock
speed it gives tokens per second of process CPU time, which other processes on a shared machine barely move: with
`--threads 1` that is the engine's own work (at 2 threads ORT's spinning workers count too). For the current export it
also lists which fused operators ONNX Runtime's optimized graph holds (SessionOptions.optimized_model_filepath).

    git worktree add --detach /tmp/molmocap-base <commit>
    python benchmarks/bench_decoder.py --baseline-src /tmp/molmocap-base --work /tmp/bench-decoder

Writes benchmarks/results/decoder-<date>.json.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from molmocap.runtime.files import write_json_atomic

ROOT = Path(__file__).resolve().parents[1]
GEOMETRY = {"hidden_size": 1024, "num_hidden_layers": 8, "num_attention_heads": 16, "num_key_value_heads": 4,
            "head_dim": 64, "intermediate_size": 2816, "vocab_size": 32000, "qk_norm_type": "qwen3"}
FUSED = ("GroupQueryAttention", "SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization",
         "RotaryEmbedding", "QuickGelu", "MatMulNBits", "DynamicQuantizeMatMul", "MatMulIntegerToFloat",
         "Concat", "Softmax", "MatMul")


def build_checkpoint(out: Path) -> Path:
    """The mid-size random checkpoint (saved once; later runs reuse it)."""
    if (out / "config.json").is_file():
        return out
    sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]
    import dataclasses

    import tiny_models

    base = tiny_models.VARIANTS["qwen3_gqa"]
    variant = dataclasses.replace(base, name="bench_mid", text={**base.text, **GEOMETRY})
    model, processor = tiny_models.build_model(variant, seed=0)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def python_path(src: Path, scratch: Path) -> str:
    """A PYTHONPATH under which `import molmocap` is the checkout `src` (the repository root is the package)."""
    link = scratch / "pkg" / "molmocap"
    link.parent.mkdir(parents=True, exist_ok=True)
    if not link.exists():
        link.symlink_to(src.resolve())
    return str(link.parent)


def run_python(code: str, path: str, *args: str) -> str:
    env = {**os.environ, "PYTHONPATH": path}
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env,
                          cwd=tempfile.gettempdir())
    if done.returncode:
        raise SystemExit(f"subprocess failed:\n{done.stderr[-3000:]}")
    return done.stdout


EXPORT = """
import sys
from molmocap.export.exporter import export
export(sys.argv[1], __import__("pathlib").Path(sys.argv[2]), quant=sys.argv[3], force=True)
"""

WORKER = """
import json, resource, sys, time
import numpy as np
from molmocap.runtime import Captioner
from molmocap.runtime.decoder import prefill_bias

model, contexts, tokens, threads = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
captioner = Captioner.load(model, threads=threads)
decoder = captioner.decoder
rng = np.random.default_rng(0)
rows = []
for n in [min(contexts), *contexts]:  # the first pass warms the session up and is not reported
    ids = rng.integers(0, 300, n).astype(np.int64)
    if hasattr(decoder, "step"):  # KV cache preallocated and written in place
        cache = decoder.new_cache(n + tokens)
        step = lambda embeds: decoder.step(embeds, cache)
    else:  # the runtime before it: the cache grown by Concat, a zero bias built per step
        cache = decoder.new_cache()
        step = lambda embeds: decoder.forward(embeds, np.zeros((1, 1, 1, cache.length + 1), np.float32), cache)
    t0, c0 = time.perf_counter(), time.process_time()
    logits = decoder.forward(captioner.embed(ids[None]), prefill_bias(ids, []), cache)
    prefill_s, prefill_cpu_s = time.perf_counter() - t0, time.process_time() - c0
    steps, c0 = [], time.process_time()
    for _ in range(tokens):
        t0 = time.perf_counter()
        token = logits.token() if hasattr(logits, "token") else int(np.argmax(logits))  # Logits since the GPU work
        logits = step(captioner.embed(np.array([[token]], dtype=np.int64)))
        steps.append(time.perf_counter() - t0)
    rows.append({"context": n, "prefill_tokens_per_s": n / prefill_s, "decode_tokens_per_s": 1 / np.median(steps),
                 "prefill_tokens_per_cpu_s": n / prefill_cpu_s,
                 "decode_tokens_per_cpu_s": tokens / (time.process_time() - c0)})
rows = rows[1:]
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
print(json.dumps([{**row, "peak_rss_gb": peak} for row in rows]))
"""


def fusions(model: Path, scratch: Path) -> dict[str, int]:
    """Operator counts of ONNX Runtime's optimized graph of `model` (what actually runs)."""
    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    options.optimized_model_filepath = str(scratch / "optimized.onnx")
    options.add_session_config_entry("session.optimized_model_external_initializers_file_name", "optimized.data")
    ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    graph = onnx.load(str(scratch / "optimized.onnx"), load_external_data=False).graph
    counts = collections.Counter(node.op_type for node in graph.node)
    return {op: counts[op] for op in FUSED if counts[op]} | {"nodes": len(graph.node)}


def machine() -> dict:
    import onnxruntime

    model = platform.processor()
    with open("/proc/cpuinfo") as f:
        model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    return {"cpu": model, "cores": os.cpu_count(), "python": platform.python_version(),
            "onnxruntime": onnxruntime.__version__, "numpy": np.__version__}


def summary(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 2), "min": round(min(values), 2),
            "max": round(max(values), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline-src", type=Path, required=True, help="a molmocap checkout to compare against")
    parser.add_argument("--work", type=Path, required=True, help="scratch folder (checkpoint, exports)")
    parser.add_argument("--plans", nargs="+", default=["fp32", "int8", "int4"])
    parser.add_argument("--contexts", nargs="+", type=int, default=[100, 423, 765])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path,
                        default=ROOT / "benchmarks" / "results" / f"decoder-{datetime.date.today()}.json")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    checkpoint = build_checkpoint(args.work / "checkpoint")
    sides = {"baseline": python_path(args.baseline_src, args.work / "baseline"),
             "current": python_path(ROOT, args.work / "current")}
    exports = {}
    for side, path in sides.items():
        for plan in args.plans:
            target = args.work / side / plan
            if not (target / "molmocap.json").is_file():
                print(f"exporting {side} {plan}", flush=True)
                run_python(EXPORT, path, str(checkpoint), str(target), plan)
            exports[side, plan] = target
    samples: dict = collections.defaultdict(list)
    for run in range(args.runs):
        for plan in args.plans:
            for side, path in sides.items():
                out = run_python(WORKER, path, str(exports[side, plan]), json.dumps(args.contexts),
                                 str(args.tokens), str(args.threads))
                for row in json.loads(out):
                    samples[side, plan, row["context"]].append(row)
                    print(f"run {run + 1} {side:8} {plan:5} context {row['context']:4}: prefill "
                          f"{row['prefill_tokens_per_s']:7.1f} tok/s, decode {row['decode_tokens_per_s']:6.1f} tok/s",
                          flush=True)
    rows = [{"side": side, "plan": plan, "context": context,
             "prefill_tokens_per_s": summary([r["prefill_tokens_per_s"] for r in runs]),
             "decode_tokens_per_s": summary([r["decode_tokens_per_s"] for r in runs]),
             "prefill_tokens_per_cpu_s": summary([r["prefill_tokens_per_cpu_s"] for r in runs]),
             "decode_tokens_per_cpu_s": summary([r["decode_tokens_per_cpu_s"] for r in runs]),
             "peak_rss_gb": round(max(r["peak_rss_gb"] for r in runs), 3)}
            for (side, plan, context), runs in samples.items()]
    speedups = [{"plan": plan, "context": context, **{
        f"{kind}_current_over_baseline": summary([c[kind] / b[kind] for b, c in zip(
            samples["baseline", plan, context], samples["current", plan, context])])
        for kind in ("prefill_tokens_per_s", "decode_tokens_per_s", "prefill_tokens_per_cpu_s",
                     "decode_tokens_per_cpu_s")}}
        for plan in args.plans for context in args.contexts]
    with tempfile.TemporaryDirectory() as scratch:
        fused = {plan: fusions(exports["current", plan] / "decoder.onnx", Path(scratch)) for plan in args.plans}
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=args.baseline_src, capture_output=True, text=True)
    result = {"command": " ".join([Path(sys.executable).name, *sys.argv]),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": machine(), "geometry": GEOMETRY, "runs": args.runs, "tokens": args.tokens,
              "threads": args.threads, "baseline_commit": commit.stdout.strip(), "rows": rows,
              "paired_speedups": speedups,
              "current_optimized_graph_ops": fused}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out, result)
    print(f"wrote {args.out} ({time.strftime('%H:%M:%S')})")


if __name__ == "__main__":
    main()
