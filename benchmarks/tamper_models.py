"""Damaged and tampered model directories through `molmocap caption`: each must be refused in one line, exit 2.

The cases come from tests/model_tampering.py (flipped bytes in each kind of file, truncation, swapped, missing and
extra files, a foreign manifest, components replaced with checksums updated to match, manifests with missing keys
and wrong types, an empty directory). Each edits a fresh copy of the demo model; the foreign manifest and
components come from a tiny random export made here (tests/tiny_models.py). Every case runs
`molmocap --quiet caption IMG --model DIR --no-cache` in its own subprocess, so a crash of the interpreter (a
negative return code: a signal) shows. A refused case passes with exit 2, exactly one stderr line starting
`error: ` and no traceback; an accepted one (extra files: never opened) with exit 0 and the untouched model's
caption. Saves benchmarks/results/tamper_models-<date>.json with each case's outcome, exit code and stderr line,
the command, the machine and the versions.

    python benchmarks/tamper_models.py
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from conditions import ROOT, conditions, results_path, save
from PIL import Image, ImageDraw

sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]  # tests/tiny_models.py imports models.demo

from model_tampering import CASES, TamperCase  # noqa: E402

DEMO = ROOT / "models" / "demo" / "onnx"
FAST = ("--max-new-tokens", "4", "--max-crops", "1", "--threads", "1")


def caption(model: Path, image: Path, cache: Path) -> subprocess.CompletedProcess:
    """`molmocap --quiet caption IMAGE --model MODEL --no-cache` in a subprocess, with its own cache directory."""
    return subprocess.run([sys.executable, "-m", "molmocap", "--quiet", "caption", str(image), "--model", str(model),
                           "--no-cache", *FAST], capture_output=True, text=True, timeout=300,
                          env={"MOLMOCAP_CACHE_DIR": str(cache), "PATH": "/usr/bin:/bin"}, cwd=ROOT)


def judge(case: TamperCase, run: subprocess.CompletedProcess, reference: str) -> str | None:
    """None when `run` is what `case` must give, else what is wrong."""
    lines = run.stderr.splitlines()
    if run.returncode < 0:
        return f"killed by signal {-run.returncode}"
    if "Traceback" in run.stderr:
        return "traceback on stderr"
    if not case.refused:
        return None if run.returncode == 0 and run.stdout == reference else f"exit {run.returncode}, not the caption"
    if run.returncode != 2:
        return f"exit {run.returncode}, not 2"
    if len(lines) != 1 or not lines[0].startswith("error: "):
        return f"{len(lines)} stderr lines, not one error line"
    return None


def make_other_model(work: Path) -> Path:
    """A tiny random export of other geometry than the demo model (the source of foreign files)."""
    import tiny_models
    from molmocap.export.exporter import export

    checkpoint = tiny_models.save_checkpoint("qwen3_gqa", work / "checkpoint", seed=0)
    return export(str(checkpoint), work / "other")


def main() -> None:
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tamper-") as tmp:
        work = Path(tmp)
        other = make_other_model(work)
        image = work / "shapes.png"
        picture = Image.new("RGB", (96, 72), "white")
        ImageDraw.Draw(picture).ellipse((10, 10, 50, 50), fill="red")
        picture.save(image)
        reference = caption(DEMO, image, work / "cache")
        if reference.returncode != 0:
            raise SystemExit(f"the untouched demo model fails: {reference.stderr}")
        cases = []
        for case in CASES:
            model = work / case.name
            shutil.copytree(DEMO, model)
            case.apply(model, other)
            t0 = time.perf_counter()
            run = caption(model, image, work / "cache")
            problem = judge(case, run, reference.stdout)
            cases.append({"case": case.name, "description": case.description,
                          "expected": "refused" if case.refused else "accepted",
                          "outcome": "pass" if problem is None else "FAIL", "problem": problem,
                          "exit_code": run.returncode, "stderr": run.stderr.rstrip("\n"),
                          "seconds": round(time.perf_counter() - t0, 2)})
            print(f"{cases[-1]['outcome']:4} {case.name}: exit {run.returncode} {run.stderr.strip()[:150]}",
                  flush=True)
    failed = [c["case"] for c in cases if c["outcome"] != "pass"]
    report = {
        "what": "tampered model directories through `molmocap caption`, one subprocess each: refused cases must "
                "exit 2 with one `error:` line on stderr and no traceback, accepted ones caption as the untouched "
                "model; a negative exit code (signal) fails",
        **conditions("tokenizers", "pillow"),
        "model": "models/demo/onnx (a fresh copy per case); foreign files from a tiny random qwen3_gqa export",
        "caption_args": list(FAST),
        "summary": {"cases": len(cases), "refused_in_one_line": sum(c["expected"] == "refused" and c["outcome"] ==
                                                                    "pass" for c in cases),
                    "accepted": sum(c["expected"] == "accepted" and c["outcome"] == "pass" for c in cases),
                    "failed": failed, "seconds": round(time.perf_counter() - start, 1)},
        "cases": cases,
    }
    save(results_path("tamper_models"), report)
    if failed:
        raise SystemExit(f"{len(failed)} cases failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
