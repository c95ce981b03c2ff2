"""Measure the matrix kernels the exporter can emit, on Molmo2-4B's largest projection, to choose the plan.

For one weight (K=2560 x N=9728, the text MLP's gate/up) it times, side by side in one run: fp32 MatMul, int8
per-channel DynamicQuantizeMatMul, and MatMulNBits at 4 and 8 bits over block sizes and accuracy levels, at M=1
(a decode step, bound by weight bytes) and at a prefill's M (bound by arithmetic). It prints a table and saves
`benchmarks/results/kernels-<date>.json`.

    python benchmarks/bench_kernels.py [--m-prefill 441] [--threads 2] [--repeats 5]
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from onnx import TensorProto  # noqa: E402

from molmocap.export.onnx_graph import GraphBuilder  # noqa: E402
from molmocap.export.quantize import QuantLinear, linear_node  # noqa: E402

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


def time_run(session: ort.InferenceSession, x: np.ndarray, repeats: int) -> float:
    session.run(None, {"x": x})
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, {"x": x})
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--m-prefill", type=int, default=441)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

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
            row = {"kernel": kind.label}
            for m in (1, args.m_prefill):
                x = rng.standard_normal((m, K)).astype(np.float32)
                seconds = time_run(session, x, args.repeats if m > 1 else args.repeats * 20)
                row[f"m{m}_ms"] = round(seconds * 1e3, 3)
                row[f"m{m}_tops"] = round(2 * m * K * N / seconds / 1e12, 3)
            y = session.run(None, {"x": x})[0]
            ref = x @ weight.T
            row["rel_error"] = float(np.linalg.norm(y - ref) / np.linalg.norm(ref))
            rows.append(row)
            print(f"{row['kernel']:28s} M=1 {row['m1_ms']:8.3f} ms   M={args.m_prefill} "
                  f"{row[f'm{args.m_prefill}_ms']:9.2f} ms ({row[f'm{args.m_prefill}_tops']:.2f} TOP/s)   "
                  f"rel.err {row['rel_error']:.4f}", flush=True)
    out = Path(__file__).parent / "results" / f"kernels-{datetime.date.today()}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"k": K, "n": N, "threads": args.threads, "ort": ort.__version__, "rows": rows},
                              indent=2) + "\n")
    print(f"saved {out}")


if __name__ == "__main__":
    main()
