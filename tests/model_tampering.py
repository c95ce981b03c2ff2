"""Ways to damage or tamper with an exported model directory, shared by tests/test_tampered_models.py and
benchmarks/tamper_models.py.

Each case edits a private copy of a model in place. `refused` cases must make the runtime refuse the model with one
`ModelError` line (exit 2 at the CLI); the others must still caption exactly as the untouched model does.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

MANIFEST = "molmocap.json"


@dataclass(frozen=True)
class TamperCase:
    """One tampering: its name, what it does, whether the runtime must refuse it, and the edit itself.

    `apply(model_dir, other_dir)` edits `model_dir`; `other_dir` is another exported model (of other geometry),
    the source of foreign manifests and components.
    """

    name: str
    description: str
    refused: bool
    apply: Callable[[Path, Path], None]


def flip_byte(path: Path) -> None:
    """Invert the middle byte of a file in place (its size stays, its mtime moves on)."""
    with open(path, "r+b") as f:
        f.seek(path.stat().st_size // 2)
        byte = f.read(1)[0]
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte ^ 0xFF]))


def read_manifest_json(model: Path) -> dict:
    return json.loads((model / MANIFEST).read_text(encoding="utf-8"))


def write_manifest_json(model: Path, data: dict) -> None:
    (model / MANIFEST).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def edit_manifest(model: Path, edit: Callable[[dict], None]) -> None:
    data = read_manifest_json(model)
    edit(data)
    write_manifest_json(model, data)


def relist(model: Path, *names: str) -> None:
    """Make the manifest's size and sha256 of `names` match the files as they now are (a deliberate tampering
    that the checksums cannot see), adding entries for files it did not list."""
    data = read_manifest_json(model)
    entries = {entry["path"]: entry for entry in data["files"]}
    for name in names:
        blob = (model / name).read_bytes()
        entry = entries.get(name)
        if entry is None:
            entry = {"path": name}
            data["files"].append(entry)
        entry.update(bytes=len(blob), sha256=hashlib.sha256(blob).hexdigest())
    write_manifest_json(model, data)


def _swap(model: Path, a: str, b: str) -> None:
    first, second = (model / a).read_bytes(), (model / b).read_bytes()
    (model / a).write_bytes(second)
    (model / b).write_bytes(first)


def _truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def _extra_files(model: Path, other: Path) -> None:
    (model / "NOTES.txt").write_text("exported for the photo library\n")
    shutil.copyfile(other / "vision.onnx", model / "old-vision.onnx")


def _replace_component(model: Path, other: Path) -> None:
    """vision.onnx becomes the adapter graph (its weights file is there too), listed with its true checksum."""
    shutil.copyfile(model / "adapter.onnx", model / "vision.onnx")
    relist(model, "vision.onnx")


def _from_other_model(component: str) -> Callable[[Path, Path], None]:
    """A component (graph and weights) of a model of other sizes, listed with its true checksums."""
    def apply(model: Path, other: Path) -> None:
        names = (f"{component}.onnx", f"{component}.onnx.data")
        for name in names:
            shutil.copyfile(other / name, model / name)
        relist(model, *names)
    return apply


def _unlisted_component(model: Path, other: Path) -> None:
    """The manifest points vision at a file it does not list, so no checksum covers it."""
    shutil.copyfile(other / "vision.onnx", model / "vision-2.onnx")
    edit_manifest(model, lambda data: data["components"].update(vision="vision-2.onnx"))


def _garbage_onnx(model: Path, other: Path) -> None:
    (model / "embed.onnx").write_bytes(b"\x08\x07" + os.urandom(300))
    relist(model, "embed.onnx")


def _not_a_tokenizer(model: Path, other: Path) -> None:
    (model / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "Nonsense"}}\n')
    relist(model, "tokenizer.json")


def _path_outside(model: Path, other: Path) -> None:
    """A listed file outside the model directory (which would make loading read, and trust, any file)."""
    shutil.copyfile(model / "tokenizer.json", model.parent / f"{model.name}-tokenizer.json")
    edit_manifest(model, lambda data: data["files"].append(
        {"path": f"../{model.name}-tokenizer.json", **_entry(model / "tokenizer.json")}))


def _entry(path: Path) -> dict:
    blob = path.read_bytes()
    return {"bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}


def _delete(path: list[str]) -> Callable[[dict], None]:
    def edit(data: dict) -> None:
        for key in path[:-1]:
            data = data[key]
        del data[path[-1]]
    return edit


def _stringify_geometry(data: dict) -> None:
    data["geometry"]["text"] = {key: str(value) for key, value in data["geometry"]["text"].items()}


def _empty(model: Path, other: Path) -> None:
    for child in model.iterdir():
        child.unlink()


CASES = [
    TamperCase("flipped_byte_onnx", "one byte of vision.onnx inverted", True,
               lambda m, o: flip_byte(m / "vision.onnx")),
    TamperCase("flipped_byte_onnx_data", "one byte of decoder.onnx.data (the weights) inverted", True,
               lambda m, o: flip_byte(m / "decoder.onnx.data")),
    TamperCase("flipped_byte_tokenizer", "one byte of tokenizer.json inverted", True,
               lambda m, o: flip_byte(m / "tokenizer.json")),
    TamperCase("flipped_byte_manifest", "one byte of molmocap.json inverted", True,
               lambda m, o: flip_byte(m / MANIFEST)),
    TamperCase("truncated", "decoder.onnx.data cut to half its size", True,
               lambda m, o: _truncate(m / "decoder.onnx.data")),
    TamperCase("swapped_files", "the contents of vision.onnx and adapter.onnx swapped", True,
               lambda m, o: _swap(m, "vision.onnx", "adapter.onnx")),
    TamperCase("missing_file", "embed.onnx.data deleted", True,
               lambda m, o: (m / "embed.onnx.data").unlink()),
    TamperCase("missing_manifest", "molmocap.json deleted", True, lambda m, o: (m / MANIFEST).unlink()),
    TamperCase("extra_files", "a text file and an unlisted .onnx file added: never opened, so accepted", False,
               _extra_files),
    TamperCase("foreign_manifest", "molmocap.json copied from another export", True,
               lambda m, o: shutil.copyfile(o / MANIFEST, m / MANIFEST)),
    TamperCase("component_replaced", "vision.onnx replaced by adapter.onnx, manifest checksums updated to match",
               True, _replace_component),
    TamperCase("decoder_from_other_model", "decoder of a model with fewer layers, checksums updated to match",
               True, _from_other_model("decoder")),
    TamperCase("embed_from_other_model", "embed of a model of other width, checksums updated to match",
               True, _from_other_model("embed")),
    TamperCase("vision_from_other_model", "vision encoder of a model of other width, checksums updated to match",
               True, _from_other_model("vision")),
    TamperCase("component_not_in_files", "components.vision names a file the manifest does not list", True,
               _unlisted_component),
    TamperCase("weights_file_unlisted", "the files entry of decoder.onnx.data deleted (no checksum would cover it)",
               True, lambda m, o: edit_manifest(m, lambda d: d.update(
                   files=[e for e in d["files"] if e["path"] != "decoder.onnx.data"]))),
    TamperCase("onnx_garbage_relisted", "embed.onnx replaced by random bytes, checksums updated to match", True,
               _garbage_onnx),
    TamperCase("tokenizer_not_a_tokenizer", "tokenizer.json replaced by other JSON, checksums updated", True,
               _not_a_tokenizer),
    TamperCase("file_path_outside", "the manifest lists a file outside the model directory", True, _path_outside),
    TamperCase("manifest_missing_key", "molmocap.json without tokens", True,
               lambda m, o: edit_manifest(m, _delete(["tokens"]))),
    TamperCase("manifest_missing_nested_key", "molmocap.json without geometry.text.num_layers", True,
               lambda m, o: edit_manifest(m, _delete(["geometry", "text", "num_layers"]))),
    TamperCase("manifest_missing_component", "molmocap.json without components.embed", True,
               lambda m, o: edit_manifest(m, _delete(["components", "embed"]))),
    TamperCase("manifest_wrong_types_geometry", "geometry.text values as strings", True,
               lambda m, o: edit_manifest(m, _stringify_geometry)),
    TamperCase("manifest_wrong_types_tokens", "tokens.image_structure_ids a string", True,
               lambda m, o: edit_manifest(m, lambda d: d["tokens"].update(image_structure_ids="512,513"))),
    TamperCase("manifest_wrong_types_files", "files is an object, not a list", True,
               lambda m, o: edit_manifest(m, lambda d: d.update(files={"path": "vision.onnx"}))),
    TamperCase("manifest_wrong_types_preprocess", "preprocess.max_crops a string", True,
               lambda m, o: edit_manifest(m, lambda d: d["preprocess"].update(max_crops="8"))),
    TamperCase("manifest_not_an_object", "molmocap.json is a JSON list", True,
               lambda m, o: (m / MANIFEST).write_text("[]\n")),
    TamperCase("empty_directory", "every file deleted", True, _empty),
]
