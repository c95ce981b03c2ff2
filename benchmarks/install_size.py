"""What a user installs: the size of a fresh venv with molmocap alone and with each extra, and whether torch came in.

The export extra must stay small enough for a laptop or a board to export its own model (issue: under 300 MB, no
torch). Each install goes into its own new venv from this checkout (`pip install DIR[extra]`, no pip cache);
sizes are of the venv's site-packages, which includes the pip and setuptools a new venv always has (measured and
recorded apart as `baseline`).

    python benchmarks/install_size.py                      # "", export, serve, pdf

Saves benchmarks/results/install_size-<date>.json.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conditions import ROOT, conditions, results_path, save  # noqa: E402


def du_mb(path: Path) -> float:
    """Bytes of every file under `path`, in MB (10^6)."""
    return round(sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink()) / 1e6, 1)


def measure(extra: str, work: Path) -> dict:
    """A fresh venv with `molmocap[extra]` (or molmocap alone): site-packages size and the distributions in it."""
    venv = work / (extra or "plain")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    site = next((venv / "lib").glob("python*/site-packages"))
    baseline = du_mb(site)
    target = f"{ROOT}[{extra}]" if extra else str(ROOT)
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-cache-dir", target], check=True)
    listed = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "list", "--format=freeze"],
                            capture_output=True, text=True, check=True).stdout.split()
    names = sorted(line.split("==")[0].lower() for line in listed)
    return {"extra": extra or None, "site_packages_mb": du_mb(site), "baseline_mb": baseline,
            "added_mb": round(du_mb(site) - baseline, 1), "torch": "torch" in names,
            "transformers": "transformers" in names, "distributions": names}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--extras", nargs="+", default=["", "export", "serve", "pdf"])
    args = parser.parse_args()
    meta = conditions()
    with tempfile.TemporaryDirectory(prefix="molmocap-install-") as work:
        rows = [measure(extra, Path(work)) for extra in args.extras]
    for row in rows:
        print(f"{row['extra'] or '(runtime)'}: {row['site_packages_mb']} MB "
              f"({row['added_mb']} MB over a new venv), torch: {row['torch']}")
    save(results_path("install_size"), {"meta": meta, "rows": rows})


if __name__ == "__main__":
    main()
