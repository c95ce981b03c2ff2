"""benchmarks/check_cuda.py on the CPU (`--device cpu`), as a lent GPU runs it on CUDA: the results file holds, per
model, the CPU-against-device tokens and logits and the device's batched-against-alone answers."""

from __future__ import annotations

import json
import subprocess
import sys

import onnxruntime as ort
import pytest

from conftest import ROOT

SCRIPT = ROOT / "benchmarks" / "check_cuda.py"
DEMO = ROOT / "models" / "demo" / "onnx"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_cpu_dry_run_compares_tokens_logits_and_batching(tmp_path):
    out = tmp_path / "check.json"
    done = run(str(DEMO), "--device", "cpu", "--tokens", "8", "--positions", "8", "--out", str(out))
    assert done.returncode == 0, done.stderr
    data = json.loads(out.read_text())
    assert data["meta"]["device"] == "cpu" and "check_cuda.py" in data["meta"]["command"]
    (row,) = data["rows"]
    assert row["providers"] == ["CPUExecutionProvider"] and row["quant"] == "fp32"
    assert row["same_tokens"] and row["tokens"]["cpu"] == row["tokens"]["device"] and len(row["tokens"]["cpu"]) > 0
    assert row["logits"]["positions"] == 8 and row["logits"]["top1_agreement"] == 1.0
    assert row["batched_same_as_alone"] == [True, True, True]


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(), reason="this onnxruntime has CUDA")
def test_cuda_absent_is_one_error_line(tmp_path):
    out = tmp_path / "check.json"
    done = run(str(DEMO), "--out", str(out))
    assert done.returncode != 0 and not out.exists()
    assert done.stderr.splitlines() == ["error: CUDA was asked for, but this onnxruntime has no CUDAExecutionProvider "
                                        "(install onnxruntime-gpu)"]
