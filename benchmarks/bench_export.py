"""Time each export and its peak memory, and say whether two exporters make the same model.

Each plan is exported by `molmocap export` in a child process, whose wall time and peak RSS are recorded: one run
per plan, since an export of the 4B takes minutes and its memory, not its speed, is the target. With `--commit`, the
exporter is the one at that commit (its tree unpacked by `git archive` into a temporary folder and put first on the
child's path), so today's exporter can still be measured after the checkout has moved on. After each export: its
size, the sha256 of every file, and the greedy tokens it generates on bench_cpu's image at max_crops 1 (read with
this checkout's runtime, in a child too: Linux carries a process's peak RSS over fork and exec, so the export child
of a parent that had loaded a model would report the parent's peak). With `--reference FOLDER`, the export of the
same plan found there is compared: tokens and files.

    python benchmarks/bench_export.py CHECKPOINT --exports /data/onnx-old --quants int4 --commit HEAD --label old
    python benchmarks/bench_export.py CHECKPOINT --exports /data/onnx --reference /data/onnx-old --label new

Exports go to EXPORTS/<quant>. Saves benchmarks/results/export-<label>-<date>.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_cpu import PROMPT, bench_image, greedy
from conditions import ROOT, conditions, load_average, results_path, save


def unpack_commit(rev: str, into: Path) -> tuple[Path, str]:
    """The tree of commit `rev` as an importable `molmocap` package under `into`; returns (path entry, commit)."""
    commit = subprocess.run(["git", "rev-parse", rev], cwd=ROOT, capture_output=True, text=True,
                            check=True).stdout.strip()
    package = into / "molmocap"
    package.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", "--format=tar", commit], cwd=ROOT, capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(package)], input=archive.stdout, check=True)
    return into, commit


def source_digest(package: Path) -> str:
    """sha256 over the exporter's sources (export/*.py), naming the code that ran even when it is uncommitted."""
    digest = hashlib.sha256()
    for path in sorted((package / "export").glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def export_plan(checkpoint: str, out: Path, quant: str, path_entry: Path | None) -> dict:
    """Run `molmocap export` in a child; its wall seconds, peak RSS (of the child and anything it waited for)."""
    env = dict(os.environ)
    if path_entry is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(path_entry), env.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "molmocap", "export", checkpoint, "-o", str(out), "--quant", quant, "--force"]
    load_before = load_average()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as cwd:  # not the checkout: its root is the package, not a folder holding it
        proc = subprocess.Popen(command, cwd=cwd, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"export of {quant} failed with status {os.waitstatus_to_exitcode(status)}")
    return {"export_s": round(wall, 1), "peak_rss_gb": round(usage.ru_maxrss / 1e6, 3),
            "load_average_before": load_before, "load_average_after": load_average()}


def file_digests(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder`, by relative path."""
    digests = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                digest.update(block)
        digests[str(path.relative_to(folder))] = digest.hexdigest()
    return digests


def greedy_tokens(model_dir: Path, tokens: int, threads: int) -> list[int]:
    """Exactly `tokens` greedy tokens (stop tokens ignored) on the benchmark image at max_crops 1, from a child."""
    out = subprocess.run([sys.executable, __file__, "--worker", str(model_dir), str(tokens), str(threads)],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out.splitlines()[-1])


def worker_tokens(model_dir: str, tokens: int, threads: int) -> list[int]:
    from molmocap import Captioner

    captioner = Captioner.load(model_dir, threads=threads)
    return greedy(captioner, bench_image(), PROMPT, tokens, max_crops=1)[0]


def compare(row: dict, reference: Path, tokens: int, threads: int) -> dict:
    """Tokens and file digests of this export against the reference export of the same plan."""
    ref_files = file_digests(reference)
    ref_tokens = greedy_tokens(reference, tokens, threads)
    files = row["sha256"]
    return {"reference": str(reference), "reference_tokens": ref_tokens, "same_tokens": ref_tokens == row["tokens"],
            "identical_files": sorted(k for k in files if ref_files.get(k) == files[k]),
            "differing_files": sorted(k for k in files if k in ref_files and ref_files[k] != files[k]),
            "only_here": sorted(set(files) - set(ref_files)), "only_in_reference": sorted(set(ref_files) - set(files))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", nargs="?")
    parser.add_argument("--exports", type=Path, help="Folder to export each plan into (<quant>/).")
    parser.add_argument("--quants", nargs="+", default=["int8", "int4", "mixed"])
    parser.add_argument("--commit", help="Export with the exporter of this commit instead of the checkout's.")
    parser.add_argument("--reference", type=Path, help="Folder of exports (<quant>/) to compare tokens and files.")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--label", default="current", help="Names the results file: export-<label>-<date>.json.")
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        model_dir, tokens, threads = args.worker
        print(json.dumps(worker_tokens(model_dir, int(tokens), int(threads))), flush=True)
        return
    if not args.checkpoint or not args.exports:
        parser.error("CHECKPOINT and --exports are required")

    meta = {**conditions("torch", "transformers", "onnx"), "runs_per_export": 1,
            "runs_note": "one export per plan: an export takes minutes and its peak RSS is the target, not its speed",
            "checkpoint": args.checkpoint, "tokens": args.tokens, "max_crops": 1, "prompt": PROMPT}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.commit:
            path_entry, commit = unpack_commit(args.commit, Path(tmp))
            meta["exporter"] = {"commit": commit, "export_sources_sha256": source_digest(path_entry / "molmocap")}
        else:
            path_entry = None
            meta["exporter"] = {"checkout": meta["versions"]["molmocap_checkout"],
                                "export_sources_sha256": source_digest(ROOT)}
        for quant in args.quants:
            out = args.exports / quant
            print(f"exporting {quant} to {out} ...", flush=True)
            row = {"quant": quant, "output": str(out), **export_plan(args.checkpoint, out, quant, path_entry)}
            row["disk_gb"] = round(sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) / 1e9, 3)
            row["sha256"] = file_digests(out)
            row["tokens"] = greedy_tokens(out, args.tokens, args.threads)
            if args.reference:
                row["vs_reference"] = compare(row, args.reference / quant, args.tokens, args.threads)
            print(f"  {quant}: {row['export_s']:.0f} s, peak RSS {row['peak_rss_gb']:.2f} GB, "
                  f"{row['disk_gb']:.2f} GB on disk" + (f", same tokens as the reference: "
                                                        f"{row['vs_reference']['same_tokens']}" if args.reference
                                                        else ""), flush=True)
            rows.append(row)
    meta["load_average_at_end"] = load_average()
    save(results_path(f"export-{args.label}"), {"meta": meta, "rows": rows})


if __name__ == "__main__":
    main()
