"""`molmocap info`: the model, its verification state and the environment, as text or as one JSON object."""

from __future__ import annotations

import json
import platform

import onnxruntime as ort

from conftest import flip_byte, molmocap
from molmocap.runtime.info import cpu_features, gather, render_text
from molmocap.runtime.manifest import read_manifest

X86_CPUINFO = """processor\t: 0
model name\t: Some CPU
flags\t\t: fpu sse2 avx avx2 avx512f avx512bw avx512_vnni amx_tile amx_int8
"""
ARM_CPUINFO = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes crc32\n"


def test_info_text_names_every_field(model_copy, tmp_path):
    proc = molmocap("info", str(model_copy), cache_dir=tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    manifest = read_manifest(model_copy)
    for entry in manifest.data["files"]:
        assert f"{entry['path']}" in out and f"{entry['bytes']:,} bytes" in out
    total = sum(entry["bytes"] for entry in manifest.data["files"])
    assert "total" in out and f"{total:,} bytes" in out
    for field in (f"model: {model_copy.resolve()}\n", f"source: {manifest.data['source']}\n",
                  f"quant: {manifest.data['quant']} (vision fp32", "verification: not yet",
                  f"onnxruntime: {ort.__version__} (providers: ", "CPUExecutionProvider", "cpu: ", "AVX2 ",
                  "AVX-512 VNNI ", "AMX ", "NEON ", "onnxruntime threads by default: ",
                  f"cache: {tmp_path / 'cache'} (0 results", "molmocap: ", f"python: {platform.python_version()}"):
        assert field in out, field
    assert "embedded demo model" not in out


def test_info_json_tracks_verification(model_copy, tmp_path):
    cache = tmp_path / "cache"

    def report(*args: str) -> tuple[int, dict]:
        proc = molmocap("info", str(model_copy), "--json", *args, cache_dir=cache)
        return proc.returncode, json.loads(proc.stdout)

    code, fresh = report()
    assert code == 0 and fresh["model"]["verification"] == "not yet"
    assert {"model", "onnxruntime", "cpu", "cache", "molmocap", "python", "platform"} <= set(fresh)
    assert fresh["model"]["model_id"] == read_manifest(model_copy).model_id and fresh["model"]["demo_model"] is False
    assert fresh["cache"]["dir"] == str(cache) and fresh["cpu"]["default_threads"] >= 1

    code, verified = report("--verify")
    assert code == 0 and verified["model"]["verification"] == "verified"
    assert {entry["state"] for entry in verified["model"]["files"]} == {"verified"}

    flip_byte(model_copy / "decoder.onnx.data")
    assert report()[1]["model"]["verification"] == "not yet"  # changed since the last check: unknown until hashed
    proc = molmocap("info", str(model_copy), "--json", "--verify", cache_dir=cache)
    states = {entry["path"]: entry["state"] for entry in json.loads(proc.stdout)["model"]["files"]}
    assert proc.returncode == 2 and states["decoder.onnx.data"] == "mismatch"
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "decoder.onnx.data" in lines[0]
    code, remembered = report()  # the stamp remembers the mismatch: no hashing needed to report it
    assert code == 0 and remembered["model"]["verification"] == "mismatch"


def test_info_on_the_demo_model_and_without_any_model():
    proc = molmocap("info", "--json", env={"MOLMOCAP_MODEL": ""})
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["model"]["demo_model"] is True
    report = gather(None)
    assert report["model"] is None and report["onnxruntime"]["version"] == ort.__version__
    assert render_text(report).startswith("model: none")


def test_info_refuses_a_missing_model_in_one_line(tmp_path):
    proc = molmocap("info", str(tmp_path / "nope"))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and proc.stdout == "" and len(lines) == 1 and "not found" in lines[0]


def test_cpu_features_from_cpuinfo():
    assert cpu_features(X86_CPUINFO) == {"AVX2": True, "AVX-512": True, "AVX-512 VNNI": True, "AMX": True,
                                         "NEON": False}
    assert cpu_features(ARM_CPUINFO) == {"AVX2": False, "AVX-512": False, "AVX-512 VNNI": False, "AMX": False,
                                         "NEON": True}
    assert cpu_features(None) is None and cpu_features("processor : 0\n") is None
