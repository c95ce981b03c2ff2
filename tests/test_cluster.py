"""What `--ray` needs without Ray: the results directory of part files, the usage rules, and molmocap itself working
where Ray cannot be imported (an optional extra: import, every other command, and `--ray` as one line saying what to
install)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import ROOT, molmocap, noise_image
from molmocap.cluster.parts import ResultsDir
from molmocap.runtime.errors import InputError

DEMO = ROOT / "models" / "demo" / "onnx"
WITHOUT_RAY = """
import sys
sys.modules["ray"] = None  # `import ray` now raises ImportError, as where Ray is not installed
from molmocap.cli import entry
sys.argv[0] = "molmocap"
entry()
"""


def row(image: str, key: str | None, error: str | None = None) -> dict:
    return {"image": image, "key": key, "text": "t", "error": error}


def test_results_dir_resumes_across_parts_and_retries_errors(tmp_path):
    out = tmp_path / "out"
    with ResultsDir(out) as results:
        assert results.open() == set()
        assert list(out.glob("part-*")) == []  # no row yet, no part
        results.append(row("a.png", "ka"))
        results.append(row("b.png", None, error="corrupt"))
        first = results.part
    with ResultsDir(out) as results:
        assert results.open(retry=["elsewhere.png"]) == {"ka"}
        results.append(row("c.png", "kc"))
        second = results.part
    assert first != second
    with open(second, "ab") as f:
        f.write(b'{"image": "d.png", "ke')  # a kill in the middle of a row
    with ResultsDir(out) as results:
        assert results.open(retry=["b.png"]) == {"ka", "kc"}
    assert [json.loads(line)["image"] for line in first.read_text().splitlines()] == ["a.png"]
    assert second.read_bytes().endswith(b"}\n")


def test_results_dir_refuses_a_file_and_a_second_run(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="is a file"):
        ResultsDir(tmp_path / "file").open()
    with ResultsDir(tmp_path / "out") as results:
        results.open()
        with pytest.raises(InputError, match="another run is writing"):
            ResultsDir(tmp_path / "out").open()
    with ResultsDir(tmp_path / "out") as results:
        results.open()  # the lock went with the first run


@pytest.mark.parametrize("args, message", [
    (["--workers", "2"], "--ray-address and --workers apply to --ray"),
    (["--ray"], "give -o OUT_DIR"),
    (["--ray", "-o", "out", "--write-xmp"], "--write-xmp, --write-txt, --pages and --format do not apply"),
    (["--ray", "-o", "out", "--format", "csv"], "--write-xmp, --write-txt, --pages and --format do not apply"),
    (["-o", "."], "is a directory; name a results file (or add --ray for part files)"),
])
def test_ray_usage_errors(tmp_path, args, message):
    noise_image(40, 40).save(tmp_path / "a.png")
    done = molmocap("caption", str(tmp_path / "a.png"), *args)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: ") and message in done.stderr


def test_molmocap_works_without_ray(tmp_path):
    noise_image(40, 50).save(tmp_path / "a.png")

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", WITHOUT_RAY, "--quiet", *args], cwd=tmp_path,
                              capture_output=True, text=True, timeout=300)

    fast = ("--model", str(DEMO), "--max-new-tokens", "4", "--max-crops", "1", "--no-cache")
    for args in (["caption", "a.png", *fast], ["caption", "a.png", "-o", "r.jsonl", *fast],
                 ["ask", "a.png", "What is this?", *fast], ["point", "a.png", "circle", "--model", str(DEMO),
                                                            "--max-new-tokens", "4", "--max-crops", "1"],
                 ["info", str(DEMO)], ["cache", "stats"], ["export", "--help"], ["caption", "--help"]):
        done = run(*args)
        assert done.returncode == 0, (args, done.stderr)
        assert (done.stdout + done.stderr).strip(), args
    assert len((tmp_path / "r.jsonl").read_text().splitlines()) == 1

    done = run("caption", "a.png", "-o", "out", "--ray", *fast)
    assert done.returncode == 2
    assert done.stderr == 'error: --ray needs Ray Data, which is not installed: pip install "molmocap[ray]"\n'
    assert not (tmp_path / "out").exists()

    imports = subprocess.run([sys.executable, "-c", 'import sys; sys.modules["ray"] = None; import molmocap.cli, '
                              'molmocap.cluster, molmocap.cluster.parts, molmocap.runtime.batch, molmocap.serve'],
                             capture_output=True, text=True, timeout=120)
    assert imports.returncode == 0, imports.stderr
