"""One decode step's attention and KV-cache update, old way against new, at the full-size geometry (no weights needed).

- concat: what the decoder did before the KV cache was written in place: the past keys/values fed in, the new
  position appended with Concat (a copy of the whole cache, returned as the present), grouped MatMul/Softmax over a
  host-built zero bias (export/layers.attention);
- gqa: GroupQueryAttention with past and present bound to one preallocated buffer (IOBinding), causal=0 with a
  zero bias slice, as export/text.py builds it (rotary left out of both).
Each case runs `--repeats` calls per context length after a warm-up, `--runs` times alternating the two; a run's
figure is its median call. Reports the median run with min/max, in ms per layer and times the layer count (the
attention share of one decode step of the whole model).

    python benchmarks/bench_attention.py            # Molmo2-4B: 36 layers, 32/8 heads of 128

Writes benchmarks/results/attention-<date>.json.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

from molmocap.export import layers
from molmocap.export.onnx_graph import GraphBuilder
from molmocap.export.quantize import MS
from molmocap.runtime.files import write_json_atomic

ROOT = Path(__file__).resolve().parents[1]
F = TensorProto.FLOAT


def session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def concat_graph(path: Path, heads: int, kv_heads: int, head_dim: int) -> None:
    g = GraphBuilder(path)
    q = g.input("q", F, [1, heads, 1, head_dim])
    k, v = g.input("k", F, [1, kv_heads, 1, head_dim]), g.input("v", F, [1, kv_heads, 1, head_dim])
    past_k, past_v = g.input("past_k", F, [1, kv_heads, "past", head_dim]), g.input("past_v", F,
                                                                                   [1, kv_heads, "past", head_dim])
    bias = g.op("Unsqueeze", [g.input("bias", F, [1, 1, 1, "total"]), g.const([1], np.int64)])
    present_k, present_v = g.op("Concat", [past_k, k], axis=2), g.op("Concat", [past_v, v], axis=2)
    out = layers.attention(g, q, present_k, present_v, heads, kv_heads, head_dim, bias)
    g.output(out, "out", F, [1, heads, 1, head_dim])
    g.output(present_k, "present_k", F, [1, kv_heads, "total", head_dim])
    g.output(present_v, "present_v", F, [1, kv_heads, "total", head_dim])
    g.save()


def gqa_graph(path: Path, heads: int, kv_heads: int, head_dim: int) -> None:
    g = GraphBuilder(path)
    inputs = [g.input("q", F, [1, 1, heads * head_dim]), g.input("k", F, [1, 1, kv_heads * head_dim]),
              g.input("v", F, [1, 1, kv_heads * head_dim]),
              g.input("past_k", F, [1, kv_heads, "capacity", head_dim]),
              g.input("past_v", F, [1, kv_heads, "capacity", head_dim]),
              g.input("seqlens_k", TensorProto.INT32, [1]), g.input("total", TensorProto.INT32, []), "", "", "",
              g.input("bias", F, [1, 1, 1, "total"])]
    g.nodes.append(helper.make_node("GroupQueryAttention", inputs, ["out", "present_k", "present_v"], domain=MS,
                                    num_heads=heads, kv_num_heads=kv_heads, causal=0))
    g.output("out", "out", F, [1, 1, heads * head_dim])
    g.output("present_k", "present_k", F, [1, kv_heads, "capacity", head_dim])
    g.output("present_v", "present_v", F, [1, kv_heads, "capacity", head_dim])
    g.save()


def median_ms(call, repeats: int) -> float:
    for _ in range(10):
        call()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=36)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--contexts", nargs="+", type=int, default=[100, 423, 765])
    parser.add_argument("--capacity", type=int, default=893, help="KV buffer positions (765 + 128 new tokens)")
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path,
                        default=ROOT / "benchmarks" / "results" / f"attention-{datetime.date.today()}.json")
    args = parser.parse_args()
    h, kvh, d = args.heads, args.kv_heads, args.head_dim
    rng = np.random.default_rng(0)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        concat_graph(Path(scratch) / "concat.onnx", h, kvh, d)
        gqa_graph(Path(scratch) / "gqa.onnx", h, kvh, d)
        old, new = session(Path(scratch) / "concat.onnx", args.threads), session(Path(scratch) / "gqa.onnx",
                                                                                 args.threads)
        buffers = [rng.standard_normal((1, kvh, args.capacity, d)).astype(np.float32) for _ in range(2)]
        values = [ort.OrtValue.ortvalue_from_numpy(b) for b in buffers]
        zeros = np.zeros((1, 1, 1, args.capacity), np.float32)
        q = rng.standard_normal((1, 1, h * d)).astype(np.float32)
        k = rng.standard_normal((1, 1, kvh * d)).astype(np.float32)
        for context in args.contexts:
            past = [np.ascontiguousarray(b[:, :, : context - 1]) for b in buffers]
            old_feeds = {"q": q.reshape(1, h, 1, d), "k": k.reshape(1, kvh, 1, d), "v": k.reshape(1, kvh, 1, d),
                         "past_k": past[0], "past_v": past[1], "bias": zeros[..., :context].copy()}

            def gqa_step() -> None:
                binding = new.io_binding()
                for name, array in (("q", q), ("k", k), ("v", k), ("bias", zeros[..., :context]),
                                    ("seqlens_k", np.array([context - 1], np.int32)),
                                    ("total", np.array(context, np.int32))):
                    binding.bind_cpu_input(name, array)
                for name, value in zip(("k", "v"), values):
                    binding.bind_ortvalue_input(f"past_{name}", value)
                    binding.bind_ortvalue_output(f"present_{name}", value)
                binding.bind_output("out")
                new.run_with_iobinding(binding)

            runs = {"concat": [], "gqa": []}
            for _ in range(args.runs):
                runs["concat"].append(median_ms(lambda: old.run(None, old_feeds), args.repeats))
                runs["gqa"].append(median_ms(gqa_step, args.repeats))
            row = {"context": context}
            for case, times in runs.items():
                for unit, scale in (("ms_per_layer", 1), ("ms_per_step", args.layers)):
                    row[f"{case}_{unit}"] = {"median": round(statistics.median(times) * scale, 3),
                                             "min": round(min(times) * scale, 3),
                                             "max": round(max(times) * scale, 3)}
            rows.append(row)
            print(context, {case: row[f"{case}_ms_per_step"] for case in runs}, flush=True)
    result = {"command": " ".join([Path(sys.executable).name, *sys.argv]),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "onnxruntime": ort.__version__, "geometry": {"layers": args.layers, "heads": h, "kv_heads": kvh,
                                                           "head_dim": d, "capacity": args.capacity},
              "threads": args.threads, "repeats": args.repeats, "runs": args.runs, "rows": rows}
    write_json_atomic(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
