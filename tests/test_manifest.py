"""Manifest validation and file integrity: a model directory that is not whole, not ours or not the exported bytes
is refused with a ModelError; a stamp under the cache directory spares later loads the hashing."""

from __future__ import annotations

import json
import os

import pytest

from conftest import flip_byte, molmocap, noise_image
from molmocap.runtime.errors import ModelError
from molmocap.runtime.manifest import FORMAT_VERSION, MANIFEST_NAME, load_manifest, read_manifest, stamp_path

FAST = ("--max-new-tokens", "3", "--max-crops", "1", "--threads", "1")


def test_exported_manifest_lists_every_file_with_checksum(exported):
    manifest = load_manifest(exported["qwen3_gqa"])
    manifest.verify_files()
    listed = {entry["path"] for entry in manifest.data["files"]}
    on_disk = {p.name for p in exported["qwen3_gqa"].iterdir()} - {MANIFEST_NAME}
    assert listed == on_disk
    assert {"vision.onnx", "adapter.onnx", "embed.onnx", "decoder.onnx", "tokenizer.json"} <= listed


def test_other_format_version_is_refused(model_copy):
    path = model_copy / MANIFEST_NAME
    data = json.loads(path.read_text())
    data["format_version"] = FORMAT_VERSION + 1
    path.write_text(json.dumps(data))
    with pytest.raises(ModelError, match="format version"):
        load_manifest(model_copy)


def test_truncated_file_is_refused(model_copy):
    with open(model_copy / "decoder.onnx", "r+b") as f:
        f.truncate(100)
    with pytest.raises(ModelError, match="truncated"):
        load_manifest(model_copy)


def test_corrupted_file_is_refused_at_load(model_copy):
    path = model_copy / "embed.onnx"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    read_manifest(model_copy)
    with pytest.raises(ModelError, match=r"embed\.onnx does not match the sha256 in its manifest.*re-export"):
        load_manifest(model_copy)
    with pytest.raises(ModelError, match="embed.onnx"):
        read_manifest(model_copy).verify_files()


def test_check_figures_are_optional_and_checked_when_present(model_copy):
    path = model_copy / MANIFEST_NAME
    data = json.loads(path.read_text())
    assert "check" not in data  # an export without --check, as every manifest before the field: still valid
    load_manifest(model_copy)
    data["check"] = {"reference": "int8", "positions": 48, "top1_agreement": "high", "cosine_mean": 0.99}
    path.write_text(json.dumps(data))
    with pytest.raises(ModelError, match="check.top1_agreement must be a number"):
        read_manifest(model_copy)


def one_line_error(proc) -> str:
    """The single `error:` line of a refused command (exit 2, nothing on stdout, no traceback)."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and proc.stdout == "" and len(lines) == 1 and lines[0].startswith("error: "), \
        proc.stderr
    return lines[0]


def test_cli_refuses_a_flipped_weight_byte_on_first_load(model_copy, tmp_path):
    image = tmp_path / "a.png"
    noise_image(40, 50, seed=1).save(image)
    flip_byte(model_copy / "decoder.onnx.data")
    proc = molmocap("caption", str(image), "--model", str(model_copy), *FAST, cache_dir=tmp_path / "cache")
    line = one_line_error(proc)
    assert "decoder.onnx.data" in line and "re-export or re-download" in line


def test_cli_refuses_a_weight_changed_after_a_verified_load(model_copy, tmp_path, monkeypatch):
    image = tmp_path / "a.png"
    noise_image(40, 50, seed=1).save(image)
    cache = tmp_path / "cache"
    monkeypatch.setenv("MOLMOCAP_CACHE_DIR", str(cache))
    before = sorted(p.name for p in model_copy.iterdir())
    runs = [molmocap("caption", str(image), "--model", str(model_copy), "--no-cache", *FAST, cache_dir=cache)
            for _ in range(2)]
    assert [run.returncode for run in runs] == [0, 0], runs[0].stderr + runs[1].stderr
    assert sorted(p.name for p in model_copy.iterdir()) == before  # the stamp is not in the model directory
    path = stamp_path(model_copy)
    stamp = json.loads(path.read_text())
    assert stamp["model_dir"] == str(model_copy.resolve())
    recorded = stamp["files"]["vision.onnx.data"]
    flip_byte(model_copy / "vision.onnx.data")
    assert (model_copy / "vision.onnx.data").stat().st_mtime_ns != recorded["mtime_ns"]
    proc = molmocap("caption", str(image), "--model", str(model_copy), "--no-cache", *FAST, cache_dir=cache)
    assert "vision.onnx.data" in one_line_error(proc)


def test_later_loads_trust_the_stamp_until_size_or_mtime_change(model_copy):
    load_manifest(model_copy)
    path = stamp_path(model_copy)
    stamp = json.loads(path.read_text())
    assert set(stamp["files"]) == {entry["path"] for entry in read_manifest(model_copy).data["files"]}
    # Evidence that a second load does not read the file: a stamp claiming another sha256 at the file's current
    # size and mtime is believed, so the (intact) file is refused without being hashed.
    real = stamp["files"]["embed.onnx.data"]["sha256"]
    stamp["files"]["embed.onnx.data"]["sha256"] = "0" * 64
    path.write_text(json.dumps(stamp))
    with pytest.raises(ModelError, match=r"embed\.onnx\.data"):
        load_manifest(model_copy)
    # A new mtime voids the record: the file is hashed again, found intact, and the stamp corrected.
    file = model_copy / "embed.onnx.data"
    os.utime(file, ns=(file.stat().st_atime_ns, file.stat().st_mtime_ns + 1_000_000_000))
    load_manifest(model_copy)
    record = json.loads(path.read_text())["files"]["embed.onnx.data"]
    assert record == {"bytes": file.stat().st_size, "mtime_ns": file.stat().st_mtime_ns, "sha256": real}


def test_unwritable_cache_dir_means_verifying_every_time(model_copy, tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    monkeypatch.setenv("MOLMOCAP_CACHE_DIR", str(blocker / "cache"))
    before = sorted(p.name for p in model_copy.iterdir())
    load_manifest(model_copy)
    load_manifest(model_copy)
    assert sorted(p.name for p in model_copy.iterdir()) == before  # nothing written into the model directory
    flip_byte(model_copy / "adapter.onnx.data")
    with pytest.raises(ModelError, match="adapter.onnx.data"):
        load_manifest(model_copy)



def test_missing_directory_and_missing_manifest(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        load_manifest(tmp_path / "nope")
    with pytest.raises(ModelError, match="molmocap export"):
        load_manifest(tmp_path)
