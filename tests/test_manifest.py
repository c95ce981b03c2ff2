"""Manifest validation: a model directory that is not whole or not ours is refused with a ModelError."""

from __future__ import annotations

import json
import shutil

import pytest

from molmocap.runtime.errors import ModelError
from molmocap.runtime.manifest import FORMAT_VERSION, MANIFEST_NAME, load_manifest


@pytest.fixture()
def model_copy(exported, tmp_path):
    target = tmp_path / "model"
    shutil.copytree(exported["qwen3_gqa"], target)
    return target


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


def test_corrupted_file_fails_verification(model_copy):
    path = model_copy / "embed.onnx"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    load_manifest(model_copy)
    with pytest.raises(ModelError, match="checksum"):
        load_manifest(model_copy).verify_files()


def test_missing_directory_and_missing_manifest(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        load_manifest(tmp_path / "nope")
    with pytest.raises(ModelError, match="molmocap export"):
        load_manifest(tmp_path)
