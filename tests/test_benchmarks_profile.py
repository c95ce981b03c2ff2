"""benchmarks/profile_engine.py end to end on the demo model: ONNX Runtime's per-operator profile is split into the
runs the script made, and the memory part's processes report every stage, for this checkout and a baseline one."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import ROOT

SCRIPT = ROOT / "benchmarks" / "profile_engine.py"
DEMO = ROOT / "models" / "demo" / "onnx"


def test_profile_and_memory_of_the_demo_model(tmp_path):
    out = tmp_path / "profile.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--prefill-model", f"demo={DEMO}", "--decode-model",
                           f"demo={DEMO}", "--memory-model", f"demo={DEMO}", "--prefill", "64", "--contexts", "8",
                           "300", "--steps", "4", "--max-crops", "1", "--baseline-src", str(ROOT), "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    data = json.loads(out.read_text())
    prefill, short, long = data["cases"]
    assert (prefill["kind"], prefill["tokens"]) == ("prefill", 64)
    assert [(c["kind"], c["context"]) for c in (short, long)] == [("decode", 8), ("decode", 300)]
    for case in data["cases"]:
        # each run's operators are those of that run alone: one prefill, or one step (the mean of its steps)
        assert len(case["wall_ms"]["runs"]) == 3
        assert {"GroupQueryAttention", "MatMul"} <= set(case["operators_ms"])
        assert 0 < case["products_share"] < 1 and sum(case["operators_share"].values()) > 0.99
    assert prefill["isolated_int8_tops"]["median"] > 0 and prefill["achieved_tops"]["median"] > 0
    for step in (short, long):
        assert step["attention_ms"] == step["operators_ms"]["GroupQueryAttention"]
        assert step["rest_ms"] > 0
    baseline, current = data["memory"]
    assert (baseline["model"], current["model"]) == ("demo (baseline)", "demo")
    for row in (baseline, current):
        stages = [s["stage"] for s in row["stages"]]
        assert stages[:2] == ["start", "load"] and len(stages) == 6
        load = row["stages"][1]["VmRSS"]["median"]
        assert row["peak_rss_gb"]["median"] >= load > row["stages"][0]["VmRSS"]["median"]
        assert row["kv_cache_gb"] > 0 and row["prompt_tokens"] > 0
    assert out.with_suffix(".md").read_text().count("| stage | RSS after | peak during |") == 2
