"""The batch on Ray (`molmocap caption img -o OUT_DIR --ray`) on a local Ray of 2 CPUs and the demo model: the local
batch's rows exactly, a resume after the driver is killed, nothing lost when a worker is killed mid-run, a bad image
as an error row.

One Ray instance serves the module: this process starts it, and every command joins it with --ray-address.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray
from batch_invariants import draw_images

from conftest import ROOT

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # before ray.init: Ray's usage statistics go to the internet

DEMO = ROOT / "models" / "demo" / "onnx"
IMAGES = 32  # 640x480 at --max-crops 8: several seconds of work for two workers, so that kills land mid-run
ARGS = ("--model", str(DEMO), "--no-cache", "--threads", "1", "--max-crops", "8", "--max-new-tokens", "32")
WORKER_TITLE = b"ray::MapWorker(MapBatches(CaptionWorker))"


def run(cwd: Path, *args: str, popen: bool = False) -> subprocess.CompletedProcess | subprocess.Popen:
    """`molmocap --quiet caption img ARGS ...` in `cwd` (which holds img/)."""
    command = [sys.executable, "-m", "molmocap", "--quiet", "caption", "img", *ARGS, *args]
    if popen:
        return subprocess.Popen(command, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300)


def parts(out: Path) -> list[dict]:
    """Every whole row of the part files in `out`; fails on a complete line that is not a row."""
    rows = []
    for part in sorted(out.glob("part-*.jsonl")):
        data = part.read_text(encoding="utf-8")
        rows += [json.loads(line) for line in data[:data.rfind("\n") + 1].splitlines()]
    return rows


def without_timings(row: dict) -> dict:
    return {name: value for name, value in row.items() if name != "timings"}


@pytest.fixture(scope="module")
def address():
    ray.init(num_cpus=2, include_dashboard=False, logging_level="warning")
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """img/ with IMAGES drawn images and one corrupt file."""
    root = tmp_path_factory.mktemp("ray-images")
    draw_images(root / "img", IMAGES, seed=5, size=(640, 480))
    (root / "img" / "bad.png").write_bytes(b"not a png")
    return root


@pytest.fixture(scope="module")
def reference(folder) -> dict[str, dict]:
    """The local batch's rows, by image."""
    done = run(folder, "-o", "local.jsonl")
    assert done.returncode == 2, done.stderr  # bad.png
    rows = [json.loads(line) for line in (folder / "local.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(rows) == IMAGES + 1
    return {row["image"]: row for row in rows}


def check_complete(rows: list[dict], reference: dict[str, dict]) -> None:
    """Each image once, with the local batch's row but its timings."""
    assert sorted(row["image"] for row in rows) == sorted(reference)
    for row in rows:
        assert row.keys() == reference[row["image"]].keys()
        assert without_timings(row) == without_timings(reference[row["image"]])


def test_ray_rows_are_the_local_batch_rows(folder, reference, address, tmp_path):
    out = tmp_path / "out"
    done = run(folder, "-o", str(out), "--ray", "--ray-address", address, "--workers", "2")
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: {reference['img/bad.png']['error']}",
                      f"error: 1 of {IMAGES + 1} images failed; their rows in {out} hold the errors"]
    assert f"{IMAGES + 1} images: {IMAGES} captioned, 0 from the cache, 0 already in {out}, 1 failed" in done.stderr
    rows = parts(out)
    check_complete(rows, reference)
    assert reference["img/bad.png"]["error"].startswith("unsupported or unrecognised image format")
    assert all(row["token_ids"] for row in rows if not row["error"])

    again = run(folder, "-o", str(out), "--ray", "--ray-address", address)
    assert again.returncode == 2, again.stderr  # bad.png is tried again: its old error row gives way to a new one
    assert f"0 captioned, 0 from the cache, {IMAGES} already in {out}, 1 failed" in again.stderr
    check_complete(parts(out), reference)


def wait_for_rows(out: Path, proc: subprocess.Popen, least: int) -> int:
    deadline = time.monotonic() + 240
    while (count := len(parts(out) if out.exists() else [])) < least:
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    return count


def test_resume_after_the_driver_is_killed(folder, reference, address, tmp_path):
    out = tmp_path / "out"
    proc = run(folder, "-o", str(out), "--ray", "--ray-address", address, "--workers", "2", popen=True)
    wait_for_rows(out, proc, 1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = parts(out)
    assert 0 < len(before) < IMAGES + 1
    assert len({row["image"] for row in before}) == len(before)

    done = run(folder, "-o", str(out), "--ray", "--ray-address", address, "--workers", "2")
    assert done.returncode == 2, done.stderr
    assert f"already in {out}" in done.stderr
    check_complete(parts(out), reference)


def worker_pids() -> list[int]:
    """The processes of the caption workers (Ray names them by their class)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and (entry / "cmdline").read_bytes().startswith(WORKER_TITLE):
                pids.append(int(entry.name))
        except OSError:
            pass
    return pids


def test_a_worker_killed_mid_run_loses_nothing(folder, reference, address, tmp_path):
    out = tmp_path / "out"
    proc = run(folder, "-o", str(out), "--ray", "--ray-address", address, "--workers", "2", popen=True)
    wait_for_rows(out, proc, 1)
    victims = worker_pids()
    assert len(victims) == 2
    os.kill(victims[0], signal.SIGKILL)
    killed_at = len(parts(out))
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 2, stderr
    assert killed_at < IMAGES + 1  # the kill came while images were left
    assert victims[0] not in worker_pids()
    check_complete(parts(out), reference)
