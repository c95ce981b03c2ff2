"""Measure the matrix kernels the exporter can emit, on Molmo2-4B's largest projection, to choose the plan.

For one weight (K=2560 x N=9728, the text MLP's gate/up) it times, side by side in one run: fp32 MatMul, int8
per-channel DynamicQuantizeMatMul, and MatMulNBits at 4 and 8 bits over block sizes and accuracy levels, at M=1
(a decode step, bound by weight bytes) and at a prefill's M (bound by arithmetic). Each figure is the median, min
and max over `--runs` runs, a run being the mean time of `--calls` calls (100 at M=1, whose single calls are too short
to time alone). It prints a table and saves `benchmarks/results/kernels-<date>.json` with the conditions (command,
machine, versions) and the load average around each kernel's runs.

    python benchmarks/bench_kernels.py [--m-prefill 441] [--threads 2] [--runs 3] [--calls 5]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from conditions import conditions, load_average, results_path, save, spread
from onnx import TensorProto

from molmocap.export.onnx_graph import GraphBuilder
from molmocap.export.quantize import QuantLinear, linear_node

K, N = 2560, 9728
CANDIDATES = [
    QuantLinear("fp32"),
    QuantLinear("int8"),
    *[QuantLinear("nbits", bits=4, block_size=b, accuracy_level=a) for b in (32, 64, 128) for a in (0, 4)],
    *[QuantLinear("nbits", bits=8, block_size=b, accuracy_level=4) for b in (32, 128)],
]


def build(path: Path, weight: np.ndarray, kind: QuantLinear) -> None:
    g = GraphBuilder(path)
    x = g.input("x", TensorProto.FLOAT, ["m", K])
    g.output(linear_node(g, x, weight, None, kind, "w"), "y", TensorProto.FLOAT, ["m", N])
    g.save()


def time_runs(session: ort.InferenceSession, x: np.ndarray, runs: int, calls: int) -> list[float]:
    """Seconds per call, averaged over `calls` calls, for each of `runs` runs (after one warm-up call)."""
    session.run(None, {"x": x})
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        for _ in range(calls):
            session.run(None, {"x": x})
        times.append((time.perf_counter() - start) / calls)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--m-prefill", type=int, default=441)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3, help="Timed runs per kernel and M (median, min, max).")
    parser.add_argument("--calls", type=int, default=5, help="Calls per run at the prefill's M (20x that at M=1).")
    args = parser.parse_args()
    if args.runs < 3:
        parser.error("--runs must be at least 3: a speed figure is a median of at least 3 runs")
    meta = {**conditions("onnx"), "k": K, "n": N, "threads": args.threads, "runs": args.runs,
            "calls_per_run": {"m1": args.calls * 20, f"m{args.m_prefill}": args.calls}}

    rng = np.random.default_rng(0)
    weight = (rng.standard_normal((N, K)) * 0.02).astype(np.float32)
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind in CANDIDATES:
            path = Path(tmp) / f"{kind.label}.onnx"
            build(path, weight, kind)
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            row = {"kernel": kind.label, "load_average_before": load_average()}
            for m in (1, args.m_prefill):
                x = rng.standard_normal((m, K)).astype(np.float32)
                seconds = time_runs(session, x, args.runs, args.calls if m > 1 else args.calls * 20)
                row[f"m{m}_ms"] = spread([s * 1e3 for s in seconds], 3)
                row[f"m{m}_tops"] = spread([2 * m * K * N / s / 1e12 for s in seconds], 3)
            row["load_average_after"] = load_average()
            y = session.run(None, {"x": x})[0]
            ref = x @ weight.T
            row["rel_error"] = float(np.linalg.norm(y - ref) / np.linalg.norm(ref))
            rows.append(row)
            prefill = row[f"m{args.m_prefill}_ms"]
            print(f"{row['kernel']:28s} M=1 {row['m1_ms']['median']:8.3f} ms ({row['m1_ms']['min']:.3f}-"
                  f"{row['m1_ms']['max']:.3f})   M={args.m_prefill} {prefill['median']:9.2f} ms ({prefill['min']:.2f}-"
                  f"{prefill['max']:.2f}, {row[f'm{args.m_prefill}_tops']['median']:.2f} TOP/s)   "
                  f"rel.err {row['rel_error']:.4f}   load {row['load_average_before'][0]:.2f}->"
                  f"{row['load_average_after'][0]:.2f}", flush=True)
    meta["load_average_at_end"] = load_average()
    save(results_path("kernels"), {"meta": meta, "rows": rows})


if __name__ == "__main__":
    main()
