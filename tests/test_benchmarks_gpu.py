"""benchmarks/bench_gpu.py end to end on the CPU with the demo model, as a GPU session will run it on CUDA: the
results file's figures, counts and ratios, and one error line when CUDA is asked for and absent."""

from __future__ import annotations

import json
import subprocess
import sys

import onnxruntime as ort
import pytest

from conftest import ROOT

SCRIPT = ROOT / "benchmarks" / "bench_gpu.py"
DEMO = ROOT / "models" / "demo" / "onnx"
TOKENS = 8


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_cpu_dry_run_writes_every_figure(tmp_path):
    out = tmp_path / "gpu.json"
    done = run(str(DEMO), "--device", "cpu", "--runs", "1", "--tokens", str(TOKENS), "--max-crops", "1",
               "--batch-sizes", "1,2", "--compare-cpu", "--checkpoint", str(ROOT / "models" / "demo" / "checkpoint"),
               "--out", str(out))
    assert done.returncode == 0, done.stderr
    data = json.loads(out.read_text())
    assert data["complete"] and data["device"] == "cpu" and "bench_gpu.py" in data["conditions"]["command"]
    reference, plan = data["rows"]
    assert reference["engine"] == "transformers" and reference["plan"] == "bf16"
    assert plan["plan"] == "fp32" and plan["providers"] == ["CPUExecutionProvider"]
    single = plan["single"]["1"]
    assert single["generated"] == [TOKENS] and single["prompt_tokens"] == reference["single"]["1"]["prompt_tokens"]
    # The demo model answers every batch prompt past the budget, so each row is fed TOKENS - 1 times (its first
    # token comes from the prefill): the count is what the decoder produced, not B x TOKENS.
    assert plan["batch"]["2"]["tokens_decoded"] == [2 * (TOKENS - 1)] and plan["batch"]["2"]["rows_at_budget"] == [2]
    assert reference["batch"]["2"]["tokens_decoded"] == [2 * (TOKENS - 1)]
    assert plan["cpu_match"] == {"same_tokens": True, "first_difference": None, "tokens_device": TOKENS,
                                 "tokens_cpu": TOKENS, "max_crops": 1}
    ttft = single["ttft_s"]["median"] / reference["single"]["1"]["ttft_s"]["median"]
    assert plan["vs_transformers"]["ttft_x"]["1"] == pytest.approx(ttft, abs=1e-3)
    assert set(plan["targets"]) == {"decode_b1_tokens_per_s", "same_tokens_as_cpu"}  # no max_crops 8, no B=8
    assert plan["targets"]["same_tokens_as_cpu"]["met"] is True
    assert "| molmocap | fp32 | 2 |" in done.stdout


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(), reason="this onnxruntime has CUDA")
def test_cuda_absent_is_one_error_line(tmp_path):
    out = tmp_path / "gpu.json"
    done = run(str(DEMO), "--device", "cuda", "--out", str(out))
    assert done.returncode != 0 and not out.exists()
    assert done.stderr.splitlines() == ["error: CUDA was asked for, but this onnxruntime has no CUDAExecutionProvider "
                                        "(install onnxruntime-gpu)"]
