"""Batch captioning under faults: SIGKILL at random points, a full disk, read-only folders, and streaming memory.

On the demo model and a folder of small Pillow-drawn images, `molmocap caption img -o out.jsonl|out.csv
--write-xmp --threads 1 --no-cache --max-crops 1` is killed with SIGKILL after a random (seeded) delay and resumed,
again and again, until at least --kills kills per format have landed mid-batch (a round that finishes first starts
over on fresh copies; kills during startup happen too and are counted apart). After every run, killed or not,
tests/batch_invariants.py checks the results file, the sidecars and the folders against an uninterrupted reference
run: no row lost, duplicated, torn or different, no stray temporary file, every sidecar whole XML holding its row's
caption; after the last run, every image has its row.

Then: the output on a tiny tmpfs that fills up (exit 2, one line, no torn row; a rerun once space is freed
completes), a read-only output directory (a fresh one, and one holding a partial results file: exit 2, one line,
the file untouched; writable again, a rerun completes), and a read-only image folder (every sidecar fails: error
rows, exit 2; writable again, the rerun retries them). These need `mount` (root); without it the full disk is
simulated with RLIMIT_FSIZE and the read-only cases are skipped, as the results say. Last, `molmocap caption DIR`
without -o streams: its peak RSS (wait4) for 10 and for 200 images of 1600x1200.

Saves benchmarks/results/kill_batch-<date>.json with every kill (delay, rows before and after, unfinished tail,
temporary files seen), every problem found (none expected), the fault cases, the memory figures, the command, the
machine and the versions.

    python benchmarks/kill_batch.py [--seed 0] [--kills 20] [--images 30]
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from conditions import ROOT, conditions, results_path, save

sys.path[:0] = [str(ROOT / "tests")]

from batch_invariants import Snapshot, draw_images, problems, read_results, temporary_files  # noqa: E402

ARGS = ("--write-xmp", "--threads", "1", "--no-cache", "--max-crops", "1")
FORMATS = ("jsonl", "csv")


class Batch:
    """`molmocap caption img -o OUT ARGS` run in a trial folder that holds `img/` (so rows name `img/...`)."""

    def __init__(self, trial: Path, out: Path, env: dict) -> None:
        self.trial, self.out, self.env = trial, out, env
        self.format = "csv" if out.suffix == ".csv" else "jsonl"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "molmocap", "--quiet", "caption", "img", "-o", str(self.out), *ARGS]

    def start(self, **popen) -> subprocess.Popen:
        return subprocess.Popen(self.command(), cwd=self.trial, env=self.env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True, **popen)

    def run(self, **popen) -> subprocess.CompletedProcess:
        proc = self.start(**popen)
        _, stderr = proc.communicate(timeout=600)
        return subprocess.CompletedProcess(proc.args, proc.returncode, "", stderr)

    def snapshot(self) -> Snapshot:
        return read_results(self.out, self.format)

    def problems(self, now: Snapshot, before: Snapshot, reference: dict, finished: bool) -> list[str]:
        return problems(now, before, reference, self.trial, self.trial / "img", self.out.parent, finished)


def new_trial(work: Path, name: str, images: Path) -> Path:
    trial = work / name
    shutil.copytree(images, trial / "img")
    return trial


def reference_run(work: Path, images: Path, env: dict) -> tuple[dict[str, str], float, float]:
    """Captions of an uninterrupted run, by image; seconds to its first row (startup) and to its end."""
    trial = new_trial(work, "reference", images)
    batch = Batch(trial, trial / "out.jsonl", env)
    t0 = time.perf_counter()
    proc = batch.start()
    while not batch.snapshot().rows and proc.poll() is None:
        time.sleep(0.01)
    first_row = time.perf_counter() - t0
    _, stderr = proc.communicate()
    seconds = time.perf_counter() - t0
    rows = batch.snapshot().rows
    if proc.returncode != 0 or any(row["error"] for row in rows):
        raise SystemExit(f"the reference run failed: {stderr}")
    return {row["image"]: row["text"] for row in rows}, first_row, seconds


def kill_format(work: Path, images: Path, env: dict, fmt: str, kills_wanted: int, reference: dict,
                startup: float, full_seconds: float, rng: random.Random) -> dict:
    """Kill and resume batches into one format until `kills_wanted` kills landed mid-batch (the killed run had
    appended rows: kills during startup, which also happen, do not count); every run checked.

    Each delay is uniform between 0 and the expected time of the run (startup plus the images left, from the
    reference run's pace).
    """
    per_image = max(full_seconds - startup, 0.1) / max(len(reference) - 1, 1)
    kills, mid_batch, runs, rounds, events, found = 0, 0, 0, 0, [], []
    while mid_batch < kills_wanted:
        rounds += 1
        trial = new_trial(work, f"kill-{fmt}-{rounds}", images)
        batch = Batch(trial, trial / f"out.{fmt}", env)
        before = Snapshot()
        while True:
            runs += 1
            remaining = len(reference) - len(before.rows)
            delay = rng.uniform(0.0, startup + per_image * remaining)
            proc = batch.start()
            try:
                proc.wait(timeout=delay)
                killed = False
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                killed = True
            _, stderr = proc.communicate()
            now = batch.snapshot()
            finished = not killed
            run_problems = batch.problems(now, before, reference, finished)
            if finished and proc.returncode != 0:
                run_problems.append(f"exit {proc.returncode}: {stderr.strip()[-300:]}")
            temporaries = [p.name for p in temporary_files(batch.trial)]
            events.append({"round": rounds, "run": runs, "killed": killed, "delay_s": round(delay, 3),
                           "exit_code": proc.returncode, "rows_before": len(before.rows), "rows_after": len(now.rows),
                           "unfinished_tail_bytes": len(now.tail), "temporary_files": temporaries,
                           "problems": run_problems})
            found += [f"run {runs}: {p}" for p in run_problems]
            kills += killed
            mid_batch += killed and len(now.rows) > len(before.rows)
            print(f"{fmt} run {runs} {'killed' if killed else 'done  '} at {delay:5.2f}s: rows {len(before.rows)}"
                  f" -> {len(now.rows)}, tail {len(now.tail)}, tmp {len(temporaries)}, problems {len(run_problems)}",
                  flush=True)
            if finished:
                break
            before = now
    return {"format": fmt, "kills": kills, "kills_mid_batch": mid_batch, "runs": runs, "rounds": rounds,
            "kills_with_unfinished_tail": sum(e["killed"] and e["unfinished_tail_bytes"] > 0 for e in events),
            "kills_leaving_temporary_files": sum(e["killed"] and bool(e["temporary_files"]) for e in events),
            "problems": found, "events": events}


def mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def remount(path: Path, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", str(path)], check=True, capture_output=True)


def umount(path: Path) -> None:
    subprocess.run(["umount", str(path)], capture_output=True)


def one_line(run: subprocess.CompletedProcess, needle: str) -> str | None:
    """None when `run` exited 2 with exactly one `error:` line holding `needle`, else what differs."""
    lines = run.stderr.splitlines()
    if run.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0]:
        return None
    return f"exit {run.returncode}, stderr {run.stderr.strip()[-400:]!r}"


def full_disk(work: Path, images: Path, env: dict, fmt: str, reference: dict) -> dict:
    """Results on a 64 KiB tmpfs with 56 KiB taken: the batch stops at ENOSPC; freed, a rerun completes."""
    trial = new_trial(work, f"full-{fmt}", images)
    disk = trial / "disk"
    mounted = mount_tmpfs(disk, "64k")
    batch = Batch(trial, disk / f"out.{fmt}", env)
    if mounted:
        (disk / "filler").write_bytes(b"\0" * 56 * 1024)
        how = "tmpfs size=64k with a 56 KiB filler file"
        first = batch.run()
    else:
        how = "mount not permitted: RLIMIT_FSIZE of 12000 bytes on the batch process"
        limit = 12000
        first = batch.run(preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    try:
        now = batch.snapshot()
        found = batch.problems(now, Snapshot(), reference, finished=False)
        wrong = one_line(first, "No space left" if mounted else "too large")
        found += [wrong] if wrong else []
        found += [f"unfinished row left: {now.tail[:80]!r}"] if now.tail else []
        if mounted:
            (disk / "filler").unlink()
        second = batch.run()
        after = batch.snapshot()
        found += batch.problems(after, now, reference, finished=True)
        found += [f"rerun exit {second.returncode}: {second.stderr.strip()[-300:]}"] if second.returncode else []
    finally:
        if mounted:
            umount(disk)
    return {"case": f"full_disk_{fmt}", "how": how, "exit_code": first.returncode, "stderr": first.stderr.strip(),
            "rows_when_full": len(now.rows), "rerun_exit_code": second.returncode, "rows_after_rerun": len(after.rows),
            "problems": found}


def read_only_output(work: Path, images: Path, env: dict, reference: dict) -> dict:
    """A read-only output directory: fresh (nothing to open) and holding a partial results file (untouched)."""
    trial = new_trial(work, "ro-out", images)
    disk = trial / "ro"
    if not mount_tmpfs(disk, "1m"):
        return {"case": "read_only_output", "skipped": "mount not permitted (as root, chmod does not stop writes)"}
    batch = Batch(trial, disk / "out.jsonl", env)
    found = []
    try:
        remount(disk, "ro")
        fresh = batch.run()
        wrong = one_line(fresh, "Read-only")
        found += [f"fresh: {wrong}"] if wrong else []
        remount(disk, "rw")
        proc = batch.start()
        while len(batch.snapshot().rows) < 5 and proc.poll() is None:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        partial = batch.snapshot()
        remount(disk, "ro")
        blocked = batch.run()
        wrong = one_line(blocked, "Read-only")
        found += [f"partial: {wrong}"] if wrong else []
        if batch.out.read_bytes() != partial.data:
            found.append("the read-only results file changed")
        remount(disk, "rw")
        rerun = batch.run()
        after = batch.snapshot()
        found += batch.problems(after, partial, reference, finished=True)
        found += [f"rerun exit {rerun.returncode}: {rerun.stderr.strip()[-300:]}"] if rerun.returncode else []
    finally:
        umount(disk)
    return {"case": "read_only_output", "fresh_exit_code": fresh.returncode, "fresh_stderr": fresh.stderr.strip(),
            "partial_rows": len(partial.rows), "partial_exit_code": blocked.returncode,
            "partial_stderr": blocked.stderr.strip(), "rerun_exit_code": rerun.returncode,
            "rows_after_rerun": len(after.rows), "problems": found}


def read_only_images(work: Path, images: Path, env: dict, reference: dict) -> dict:
    """Images on a read-only mount with --write-xmp: every sidecar fails, so every image is an error row (exit 2);
    writable again, the rerun retries those rows and completes."""
    trial = work / "ro-img"
    disk = trial / "img"
    if not mount_tmpfs(disk, "4m"):
        return {"case": "read_only_images", "skipped": "mount not permitted"}
    batch = Batch(trial, trial / "out.jsonl", env)
    found = []
    try:
        shutil.copytree(images, disk, dirs_exist_ok=True)
        remount(disk, "ro")
        first = batch.run()
        rows = batch.snapshot().rows
        lines = first.stderr.strip().splitlines()
        if first.returncode != 2 or len(rows) != len(reference) or not all(
                row["error"] and "Read-only" in row["error"] for row in rows):
            found.append(f"expected an error row per image and exit 2: exit {first.returncode}, {len(rows)} rows")
        if len(lines) != len(reference) + 2 or not all(line.startswith(("error: ", f"{len(reference)} images"))
                                                       for line in lines) or "Traceback" in first.stderr:
            found.append(f"stderr is not one line per image, the summary and the final error: {lines[-3:]}")
        remount(disk, "rw")
        rerun = batch.run()
        found += batch.problems(batch.snapshot(), Snapshot(), reference, finished=True)
        found += [f"rerun exit {rerun.returncode}: {rerun.stderr.strip()[-300:]}"] if rerun.returncode else []
    finally:
        umount(disk)
    return {"case": "read_only_images", "exit_code": first.returncode, "error_rows": len(rows),
            "stderr_first_and_last": [lines[0], lines[-1]] if lines else [], "rerun_exit_code": rerun.returncode,
            "problems": found}


def peak_rss_mb(args: list[str], cwd: Path, env: dict) -> tuple[float, int, float]:
    """(peak RSS in MiB of the process itself, its exit code, seconds), from wait4."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return round(usage.ru_maxrss / 1024, 1), proc.returncode, round(time.perf_counter() - t0, 1)


def streaming_memory(work: Path, env: dict, seed: int) -> dict:
    """Peak RSS of `molmocap caption DIR` (no -o) for 10 and 200 images of 1600x1200."""
    size = (1600, 1200)
    draw_images(work / "many", 200, seed, size)
    figures = {}
    for count in (10, 200):
        folder = work / f"stream-{count}" / "img"
        folder.mkdir(parents=True)
        for path in sorted((work / "many").iterdir())[:count]:
            os.link(path, folder / path.name)
        args = [sys.executable, "-m", "molmocap", "--quiet", "caption", "img", "--threads", "1", "--no-cache",
                "--max-crops", "1", "--max-new-tokens", "8"]
        rss, code, seconds = peak_rss_mb(args, folder.parent, env)
        figures[str(count)] = {"peak_rss_mib": rss, "exit_code": code, "seconds": seconds}
        print(f"stream {count} images: peak RSS {rss} MiB, exit {code}, {seconds}s", flush=True)
    decoded = round(200 * size[0] * size[1] * 3 / 2**20)
    growth = figures["200"]["peak_rss_mib"] - figures["10"]["peak_rss_mib"]
    return {"image_size": list(size), "runs": figures, "growth_mib_10_to_200": round(growth, 1),
            "decoded_rgb_of_200_images_mib": decoded,
            "note": "before this change run_images decoded every image before the first caption, so 200 images "
                    f"held about {decoded} MiB of decoded pixels at once"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kills", type=int, default=20, help="Kills mid-batch per format (at least).")
    parser.add_argument("--images", type=int, default=30)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="kill-batch-") as tmp:
        work = Path(tmp)
        env = {**os.environ, "MOLMOCAP_CACHE_DIR": str(work / "cache")}
        env.pop("MOLMOCAP_MODEL", None)  # the demo model
        images = work / "images"
        draw_images(images, args.images, args.seed)
        reference, startup, full_seconds = reference_run(work, images, env)
        print(f"reference: {len(reference)} images in {full_seconds:.1f}s, first row at {startup:.1f}s", flush=True)
        kills = [kill_format(work, images, env, fmt, args.kills, reference, startup, full_seconds, rng)
                 for fmt in FORMATS]
        faults = [full_disk(work, images, env, fmt, reference) for fmt in FORMATS]
        faults += [read_only_output(work, images, env, reference), read_only_images(work, images, env, reference)]
        for fault in faults:
            print(f"{fault['case']}: {fault.get('skipped') or fault['problems'] or 'ok'}", flush=True)
        memory = streaming_memory(work, env, args.seed)
    all_problems = [p for k in kills for p in k["problems"]] + [p for f in faults for p in f.get("problems", [])]
    report = {
        "what": "SIGKILL at random points during resumable batches (JSONL and CSV, with XMP sidecars), each run "
                "checked against an uninterrupted reference; a full disk and read-only folders; peak RSS of "
                "batch captioning without -o for 10 vs 200 images",
        **conditions("pillow"),
        "model": "models/demo/onnx",
        "batch_args": list(ARGS),
        "images": args.images,
        "reference_seconds": {"first_row": round(startup, 2), "all": round(full_seconds, 2)},
        "summary": {"kills": sum(k["kills"] for k in kills), "kills_by_format": {k["format"]: k["kills"] for k in
                                                                                 kills},
                    "problems": len(all_problems),
                    "kills_mid_batch": sum(k["kills_mid_batch"] for k in kills),
                    "kills_with_unfinished_tail": sum(k["kills_with_unfinished_tail"] for k in kills),
                    "kills_leaving_temporary_files": sum(k["kills_leaving_temporary_files"] for k in kills),
                    "stream_peak_rss_mib": {n: r["peak_rss_mib"] for n, r in memory["runs"].items()},
                    "seconds": round(time.perf_counter() - start, 1)},
        "problems": all_problems,
        "kills": kills,
        "faults": faults,
        "streaming_memory": memory,
    }
    save(results_path("kill_batch"), report)
    if all_problems:
        raise SystemExit(f"{len(all_problems)} problems: {all_problems[:5]}")


if __name__ == "__main__":
    main()
