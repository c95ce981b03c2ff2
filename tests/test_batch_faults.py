"""Batches under faults, on the demo model: killed (SIGKILL) mid-batch and resumed, and writing into a file that
cannot grow (RLIMIT_FSIZE, a full disk as a process sees it): no row lost, duplicated, torn or different from an
uninterrupted run, no stray temporary file, sidecars whole. benchmarks/kill_batch.py does the same at scale."""

from __future__ import annotations

import resource
import shutil
import signal
import subprocess
import sys
import time

import pytest
from batch_invariants import Snapshot, draw_images, problems, read_results, temporary_files

from conftest import ROOT

ARGS = ("--write-xmp", "--threads", "1", "--no-cache", "--max-crops", "1", "--max-new-tokens", "8")
DEMO = ROOT / "models" / "demo" / "onnx"


def command(out) -> list[str]:
    return [sys.executable, "-m", "molmocap", "--quiet", "caption", "img", "-o", str(out), "--model", str(DEMO), *ARGS]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fault-images") / "img"
    draw_images(folder, 16, seed=3)  # three kills, each after at most one group of --batch-size rows, leave some
    return folder


@pytest.fixture(scope="module")
def reference(images, tmp_path_factory) -> dict[str, str]:
    """Each image's caption from an uninterrupted run."""
    trial = tmp_path_factory.mktemp("fault-reference")
    shutil.copytree(images, trial / "img")
    run = subprocess.run(command(trial / "out.jsonl"), cwd=trial, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    return {row["image"]: row["text"] for row in read_results(trial / "out.jsonl", "jsonl").rows}


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_kills_mid_batch_lose_nothing(images, reference, tmp_path, fmt):
    shutil.copytree(images, tmp_path / "img")
    out = tmp_path / f"out.{fmt}"
    before = Snapshot()
    for _ in range(3):  # each run is killed right after it appended one more row
        proc = subprocess.Popen(command(out), cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while len(read_results(out, fmt).rows) <= len(before.rows) and proc.poll() is None:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        now = read_results(out, fmt)
        assert len(before.rows) < len(now.rows) < len(reference)
        assert problems(now, before, reference, tmp_path, tmp_path / "img", tmp_path, finished=False) == []
        before = now
    # what a kill during an atomic write leaves: a temporary sidecar of an image not yet done, a results rewrite
    (tmp_path / "img" / ".img005.xmp.k1ll3d_0.tmp").write_text("<x:xmpmeta")
    (tmp_path / f".out.{fmt}.k1ll3d_0.tmp").write_text("partial")
    run = subprocess.run(command(out), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert problems(read_results(out, fmt), before, reference, tmp_path, tmp_path / "img", tmp_path,
                    finished=True) == []
    assert temporary_files(tmp_path) == []


def test_a_file_that_cannot_grow_stops_the_batch_without_a_torn_row(images, reference, tmp_path):
    shutil.copytree(images, tmp_path / "img")
    out = tmp_path / "out.jsonl"
    limit = 2500  # bytes: about three rows, then a row written in part and refused (EFBIG)
    full = subprocess.run(command(out), cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    lines = full.stderr.splitlines()
    assert full.returncode == 2 and len(lines) == 1 and "too large" in lines[0], full.stderr
    now = read_results(out, "jsonl")
    assert now.tail == b"" and 0 < len(now.rows) < len(reference)
    assert problems(now, Snapshot(), reference, tmp_path, tmp_path / "img", tmp_path, finished=False) == []
    rerun = subprocess.run(command(out), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert problems(read_results(out, "jsonl"), now, reference, tmp_path, tmp_path / "img", tmp_path,
                    finished=True) == []
