"""molmocap's text decoder beside llama.cpp's on the same geometry, in one session: prefill and decode tokens/s.

llama.cpp does not run Molmo2, so the comparison is the part both can run: the text decoder (Molmo2-4B's is a
Qwen3-4B: 2560 hidden, 36 layers, 32/8 heads of 128, MLP 9728, vocabulary 152064) with random weights.
- prefill: N random text tokens through the decoder (llama-bench `-p N`; molmocap `Captioner.embed` and
  `Captioner.decoder.forward` with a causal bias into a fresh KV cache);
- decode: 32 greedy tokens after D positions of context (llama-bench `-n 32 -d D`; molmocap a prefill of D
  tokens, then 32 `Captioner.step` calls), reported as 32 / seconds.
Each of `--runs` rounds measures every model once, llama.cpp's GGUFs and molmocap's exports in turn, so that the
shared machine's drift hits all of them alike; figures are the median of the rounds with min and max. Each molmocap
model runs in its own process per round (its peak RSS is recorded), as llama-bench does.

How to get llama.cpp and the GGUFs (see ../shared/REFERENCE.md): the `llama-cpp-python` 0.3.36 sdist carries
llama.cpp (commit 0c1e57098); `cmake -B build -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DCMAKE_BUILD_TYPE=Release &&
cmake --build build -j2 --target llama-bench llama-quantize`; a random Qwen3-4B from
`../shared/anchors/make_random_qwen3.py LLAMA_CPP_DIR OUT`, `convert_hf_to_gguf.py OUT --outtype bf16` (or q8_0), then
`llama-quantize [--allow-requantize] IN OUT Q4_K_M 2`. molmocap's exports: `make_synthetic_checkpoint.py` and
`molmocap export CKPT -o DIR --quant int8|int4`.

    python benchmarks/bench_llama_cpp.py --llama-bench BUILD/bin/llama-bench \
        --gguf Q4_K_M=q4km.gguf --gguf Q8_0=q8.gguf --molmocap int8=DIR8 --molmocap int4=DIR4

Writes benchmarks/results/llama_cpp-<date>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conditions import conditions, load_average, results_path, save, spread  # noqa: E402

from molmocap.runtime.files import replace_atomically  # noqa: E402


def llama_round(binary: str, gguf: str, prompts: list[int], depths: list[int], tokens: int, threads: int,
                prefill_only: bool = False) -> dict:
    """One llama-bench pass: prompt processing at each length, generation after each depth (tokens/s)."""
    def bench(*args: str) -> list[dict]:
        done = subprocess.run([binary, "-m", gguf, "-t", str(threads), "-r", "1", "-o", "json", *args],
                              capture_output=True, text=True, check=True)
        return json.loads(done.stdout)

    figures: dict = {}
    for row in bench("-p", ",".join(map(str, prompts)), "-n", "0"):
        figures[f"prefill_{row['n_prompt']}"] = row["avg_ts"]
    if not prefill_only:
        for row in bench("-p", "0", "-n", str(tokens), "-d", ",".join(map(str, depths))):
            figures[f"decode_at_{row['n_depth']}"] = row["avg_ts"]
    return figures


def molmocap_round(model: str, prompts: list[int], depths: list[int], tokens: int, threads: int) -> dict:
    """One pass over a molmocap export in this process (run by `--child`): the same work as `llama_round`."""
    from molmocap import Captioner
    from molmocap.runtime.captioner import DecodeState
    from molmocap.runtime.decoder import prefill_bias

    captioner = Captioner.load(model, threads=threads)
    rng = np.random.default_rng(0)
    vocab = captioner.manifest.geometry["text"]["vocab_size"]

    def prefill(n: int, room: int) -> tuple[DecodeState, float]:
        ids = rng.integers(0, min(vocab, 150000), n)  # ordinary text tokens, below the special ones
        cache = captioner.decoder.new_cache(n + room)
        start = time.perf_counter()
        output = captioner.decoder.forward(captioner.embed(ids[None]), prefill_bias(ids, []), cache)
        return DecodeState(cache, output, ids), time.perf_counter() - start

    prefill(16, 1)  # first-call setup (thread pools, allocations) is not part of either figure
    figures: dict = {}
    for n in prompts:
        figures[f"prefill_{n}"] = n / prefill(n, 1)[1]
    for depth in depths:
        state, _ = prefill(depth, tokens)
        start = time.perf_counter()
        for _ in range(tokens):
            captioner.step(state, state.greedy_token)
        figures[f"decode_at_{depth}"] = tokens / (time.perf_counter() - start)
    figures["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    return figures


def render(report: dict) -> str:
    """The side-by-side table and the ratios asked for, as markdown."""
    keys = list(dict.fromkeys(k for figures in report["models"].values() for k in figures if k != "peak_rss_gb"))
    lines = [f"# molmocap vs llama.cpp, text decoder, {report['conditions']['date']}", "",
             f"`{report['conditions']['command']}`; {report['runs']} rounds, tokens/s median (min-max); "
             f"load average per round: {report['load_per_round']}", "",
             "| model | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for name, figures in report["models"].items():
        cells = [f"{figures[k]['median']:.1f} ({figures[k]['min']:.1f}-{figures[k]['max']:.1f})" if k in figures
                 else "-" for k in keys]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Ratios of medians (same session):"]
    lines += [f"- {k}: {v}" for k, v in report["ratios"].items()]
    return "\n".join(lines) + "\n"


def ratios(models: dict, prompts: list[int], depths: list[int]) -> dict:
    """molmocap int8 prefill over llama.cpp's best prefill; molmocap int4 decode over llama.cpp's best Q4 decode;
    int4 decode at the deepest context over the shallowest (flatness)."""
    out: dict = {}
    llama = {k: v for k, v in models.items() if k.startswith("llama.cpp")}
    med = {name: {k: f["median"] for k, f in figs.items()} for name, figs in models.items()}
    for n in prompts:
        if llama and "molmocap int8" in med:
            best = max(llama, key=lambda m: med[m][f"prefill_{n}"])
            out[f"int8 prefill {n} / {best}"] = round(med["molmocap int8"][f"prefill_{n}"] / med[best][f"prefill_{n}"],
                                                      2)
    q4 = [m for m in llama if "Q4" in m and f"decode_at_{depths[0]}" in med[m]]
    for depth in depths:
        if q4 and "molmocap int4" in med:
            best = max(q4, key=lambda m: med[m][f"decode_at_{depth}"])
            out[f"int4 decode at {depth} / {best}"] = round(
                med["molmocap int4"][f"decode_at_{depth}"] / med[best][f"decode_at_{depth}"], 2)
    for name in (m for m in med if f"decode_at_{depths[0]}" in med[m]):
        out[f"{name} decode at {depths[-1]} / at {depths[0]}"] = round(
            med[name][f"decode_at_{depths[-1]}"] / med[name][f"decode_at_{depths[0]}"], 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--llama-bench", help="llama.cpp's llama-bench binary")
    parser.add_argument("--gguf", action="append", default=[], metavar="NAME=PATH")
    parser.add_argument("--prefill-only", action="append", default=[], metavar="NAME",
                        help="a --gguf measured for prompt processing only (e.g. BF16, whose generation is slow)")
    parser.add_argument("--molmocap", action="append", default=[], metavar="NAME=DIR")
    parser.add_argument("--prompts", default="423,765")
    parser.add_argument("--depths", default="100,423,765")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--label", help="Names the results file llama_cpp-<label>-<date> (default llama_cpp-<date>).")
    parser.add_argument("--child", metavar="DIR", help=argparse.SUPPRESS)
    args = parser.parse_args()
    prompts, depths = [int(v) for v in args.prompts.split(",")], [int(v) for v in args.depths.split(",")]
    if args.child:
        print(json.dumps(molmocap_round(args.child, prompts, depths, args.tokens, args.threads)))
        return

    started = conditions()
    rounds: dict[str, list[dict]] = {}
    load = []
    for _ in range(args.runs):
        load.append(load_average())
        for spec in args.gguf:
            name, path = spec.split("=", 1)
            rounds.setdefault(f"llama.cpp {name}", []).append(
                llama_round(args.llama_bench, path, prompts, depths, args.tokens, args.threads,
                            name in args.prefill_only))
        for spec in args.molmocap:
            name, path = spec.split("=", 1)
            done = subprocess.run([sys.executable, __file__, "--child", path, "--prompts", args.prompts, "--depths",
                                   args.depths, "--tokens", str(args.tokens), "--threads", str(args.threads)],
                                  capture_output=True, text=True, check=True)
            rounds.setdefault(f"molmocap {name}", []).append(json.loads(done.stdout.splitlines()[-1]))
    models = {name: {key: spread([r[key] for r in runs], 2) for key in runs[0]} for name, runs in rounds.items()}
    report = {"conditions": started, "runs": args.runs, "tokens": args.tokens, "threads": args.threads,
              "load_per_round": load, "load_average_at_end": load_average(), "models": models,
              "ratios": ratios(models, prompts, depths)}
    path = results_path(f"llama_cpp-{args.label}" if args.label else "llama_cpp")
    save(path, report)
    replace_atomically(path.with_suffix(".md"), render(report).encode(), mode=0o644)
    print(render(report))


if __name__ == "__main__":
    main()
