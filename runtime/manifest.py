"""The `molmocap.json` manifest: what an exported model directory holds and how to drive it.

The exporter writes it; the runtime reads nothing else to learn the geometry, the special tokens, the prompt layout,
the preprocessing parameters and the files (each with its size and sha256).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .errors import ModelError

MANIFEST_NAME = "molmocap.json"
FORMAT_VERSION = 1
COMPONENTS = ("vision", "adapter", "embed", "decoder")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_json_atomic(path: Path, data: dict) -> None:
    """Write JSON through a temporary file and a rename, so a reader never sees half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=False)
        f.write("\n")
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


@dataclass(frozen=True)
class Manifest:
    """A parsed manifest bound to its directory."""

    root: Path
    data: dict

    @property
    def geometry(self) -> dict:
        return self.data["geometry"]

    @property
    def tokens(self) -> dict:
        return self.data["tokens"]

    @property
    def prompt(self) -> dict:
        return self.data["prompt"]

    @property
    def preprocess(self) -> dict:
        return self.data["preprocess"]

    @property
    def stop_token_ids(self) -> list[int]:
        return self.data["stop_token_ids"]

    def component(self, name: str) -> Path:
        """Path of the ONNX file of one component (vision, adapter, embed, decoder)."""
        return self.root / self.data["components"][name]

    def verify_files(self) -> None:
        """Check every listed file's size and sha256 (slow on large models: used by tests and `--verify`)."""
        for entry in self.data["files"]:
            path = self.root / entry["path"]
            if not path.is_file() or path.stat().st_size != entry["bytes"] or sha256_file(path) != entry["sha256"]:
                raise ModelError(f"model file {path} is missing or does not match its manifest checksum")


def load_manifest(model_dir: str | os.PathLike) -> Manifest:
    """Read and validate `molmocap.json`, checking that every listed file is present with its recorded size."""
    root = Path(model_dir)
    path = root / MANIFEST_NAME
    if not root.is_dir():
        raise ModelError(f"model directory not found: {root}")
    if not path.is_file():
        raise ModelError(f"{root} is not a molmocap model (no {MANIFEST_NAME}); create one with `molmocap export`")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != "molmocap":
        raise ModelError(f"{path} is not a molmocap manifest")
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise ModelError(
            f"{path} has manifest format version {version}; this molmocap reads version {FORMAT_VERSION}: "
            "re-export the model with this version"
        )
    missing = [k for k in ("geometry", "tokens", "prompt", "preprocess", "stop_token_ids", "components", "files")
               if k not in data]
    if missing:
        raise ModelError(f"{path} lacks {', '.join(missing)}")
    for entry in data["files"]:
        file = root / entry["path"]
        if not file.is_file() or file.stat().st_size != entry["bytes"]:
            raise ModelError(f"model file {file} is missing or truncated; re-export the model")
    return Manifest(root, data)
