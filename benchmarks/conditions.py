"""What every benchmark records beside its figures: the command, the machine, the versions, the load, the spread.

The project's evidence rules ask that a results file say how it was made (so a reader can rerun rather than trust),
that a speed figure be the median of several runs with its min and max, and that the load of this shared machine
be visible next to each measured run. The scripts in this folder share these helpers so they record the same way.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

from molmocap.runtime.files import write_json_atomic

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
ISA_FLAGS = ["avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_int8", "amx_bf16"]


def machine() -> dict:
    """CPU model, the instruction sets that decide int8/int4/bf16 kernel speed, cores and memory."""
    model, flags = platform.processor(), set()
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    memory_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    return {"cpu": model, "isa": [f for f in ISA_FLAGS if f in flags], "cores": os.cpu_count(),
            "memory_gb": round(memory_gb, 1), "platform": platform.platform()}


def versions(*extra: str) -> dict:
    """Versions of python, numpy, onnxruntime and molmocap (with the checkout's commit), plus `extra` packages."""
    found = {"python": platform.python_version()}
    for name in ("numpy", "onnxruntime", "molmocap", *extra):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    found["molmocap_checkout"] = checkout()
    return found


def checkout() -> dict:
    """The commit of this checkout and `git status` of the files that differ from it (others' edits share it).

    A copy of the working tree sent elsewhere (a lent GPU machine) names the commit it was sent from in
    MOLMOCAP_CHECKOUT, which wins: the git metadata there can be stale (on 2026-12-04 it named a commit twelve
    behind the tree it came with, and listed the files changed since as modified)."""
    if os.environ.get("MOLMOCAP_CHECKOUT"):
        return {"commit": os.environ["MOLMOCAP_CHECKOUT"], "status": [], "sent_copy": True}

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.rstrip()
        except OSError:
            return ""

    return {"commit": git("rev-parse", "HEAD"), "status": git("status", "--porcelain").splitlines()}


def conditions(*extra_versions: str) -> dict:
    """The command that made a results file, when, on what, with which versions, and the load when it started."""
    return {"command": shlex.join(["python", *sys.argv]),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine(), "versions": versions(*extra_versions), "load_average_at_start": load_average()}


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages: on this shared 2-core machine, the noise under a measurement."""
    return [round(v, 2) for v in os.getloadavg()]


def spread(values: list[float], digits: int = 4) -> dict:
    """Median, min and max of repeated measurements, with the runs themselves."""
    return {"median": round(statistics.median(values), digits), "min": round(min(values), digits),
            "max": round(max(values), digits), "runs": [round(v, digits) for v in values]}


def failure(exc: BaseException) -> str:
    """One line for a results file's row whose run failed: the exception's type and its message's first line."""
    return f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:500]}"


def cell(figure: dict, fmt: str) -> str:
    """A `spread` as "median (min-max)" for a markdown table."""
    return f"{figure['median']:{fmt}} ({figure['min']:{fmt}}-{figure['max']:{fmt}})"


def run_loads(results: list[dict]) -> list[dict]:
    """The load averages recorded before and after each run (its `load_average_before` / `_after`)."""
    return [{"before": r["load_average_before"], "after": r["load_average_after"]} for r in results]


def load_span(loads: list[dict]) -> str:
    """The range of the 1-minute load averages of `run_loads`, as "min-max"."""
    ones = [v for load in loads for v in (load["before"][0], load["after"][0])]
    return f"{min(ones):.2f}-{max(ones):.2f}"


def results_path(name: str) -> Path:
    """benchmarks/results/<name>-<today>.json"""
    return RESULTS / f"{name}-{datetime.date.today().isoformat()}.json"


def save(path: Path, data: dict) -> None:
    """Write a results file atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, data)
    print(f"saved {path}")
