"""Tampered model directories (tests/model_tampering.py): `molmocap caption` refuses each in one line with exit 2,
in a subprocess so that a crash of the interpreter shows; extra files are accepted. benchmarks/tamper_models.py
runs the same cases and records the results."""

from __future__ import annotations

import shutil

import pytest
from model_tampering import CASES
from PIL import Image, ImageDraw

from conftest import ROOT, molmocap

DEMO = ROOT / "models" / "demo" / "onnx"
FAST = ("--max-new-tokens", "4", "--max-crops", "1", "--threads", "1", "--no-cache")


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp("tamper-image") / "shapes.png"
    picture = Image.new("RGB", (96, 72), "white")
    ImageDraw.Draw(picture).ellipse((10, 10, 50, 50), fill="red")
    picture.save(path)
    return path


@pytest.fixture(scope="module")
def reference(image) -> str:
    """The untouched demo model's caption of `image`."""
    run = molmocap("--quiet", "caption", str(image), "--model", str(DEMO), *FAST)
    assert run.returncode == 0 and run.stdout.strip(), run.stderr
    return run.stdout


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_tampered_model_is_refused_in_one_line(case, exported, image, reference, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(DEMO, model)
    case.apply(model, exported["qwen3_gqa"])
    run = molmocap("--quiet", "caption", str(image), "--model", str(model), *FAST, cache_dir=tmp_path / "cache")
    assert run.returncode >= 0, f"killed by signal {-run.returncode}"
    assert "Traceback" not in run.stderr, run.stderr
    if not case.refused:
        assert run.returncode == 0 and run.stdout == reference, run.stderr
        return
    lines = run.stderr.splitlines()
    assert run.returncode == 2 and run.stdout == "", run.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), run.stderr
