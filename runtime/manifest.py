"""The `molmocap.json` manifest: what an exported model directory holds and how to drive it.

The exporter writes it; the runtime reads nothing else to learn the geometry, the special tokens, the prompt layout,
the preprocessing parameters and the files (each with its size and sha256).

Loading checks every file against its sha256, so a damaged or swapped weight file is refused before it runs or a
cached answer is served for it. Hashing a multi-GB model on every start would cost seconds, so each check leaves a
stamp (per file: size, mtime_ns and the sha256 found) and later loads hash only the files whose size or mtime
changed. Stamps live under the cache directory, one per model directory (named by a hash of its resolved path),
because the model directory may be read-only; a stamp that cannot be read or written only costs a full check.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from .cache import cache_dir
from .errors import ModelError
from .files import sha256_file, write_json_atomic
from .manifest_schema import manifest_problem, unlisted_weights

MANIFEST_NAME = "molmocap.json"
FORMAT_VERSION = 2  # 2: the decoder reads and writes a preallocated KV cache (GroupQueryAttention)
COMPONENTS = ("vision", "adapter", "embed", "decoder")
STAMP_DIR = "verified"


def stamp_path(model_dir: str | os.PathLike) -> Path:
    """The verification stamp of a model directory, under the cache directory, named by its resolved path."""
    name = hashlib.sha256(str(Path(model_dir).resolve()).encode("utf-8")).hexdigest()[:32]
    return cache_dir() / STAMP_DIR / f"{name}.json"


def _read_stamp(path: Path) -> dict[str, dict]:
    """The stamp's records by file name; an absent or unreadable stamp vouches for nothing."""
    try:
        files = json.loads(path.read_text(encoding="utf-8"))["files"]
    except (OSError, UnicodeDecodeError, ValueError, TypeError, KeyError):
        return {}
    if not isinstance(files, dict):
        return {}
    return {name: record for name, record in files.items() if isinstance(record, dict)}


def _still_valid(record: dict | None, file: Path) -> bool:
    """Whether a stamp record was taken at the file's current size and mtime (so its sha256 is still the file's)."""
    try:
        stat = file.stat()
    except OSError:
        return False
    return (record is not None and record.get("bytes") == stat.st_size and record.get("mtime_ns") == stat.st_mtime_ns
            and isinstance(record.get("sha256"), str))


def _hash_record(file: Path) -> dict:
    """A stamp record: the file's size and mtime (taken before hashing, so a write during it shows next time)."""
    try:
        stat = file.stat()
        return {"bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha256_file(file)}
    except OSError as exc:
        raise ModelError(f"cannot read model file {file} ({exc.strerror or exc}); re-export or re-download "
                         "the model") from None


@dataclass(frozen=True)
class Manifest:
    """A parsed manifest bound to its directory; `model_id` is the sha256 of the `molmocap.json` bytes read.

    The manifest lists every file's sha256, so its id changes with any re-exported weight, and loading refuses a
    file that no longer matches: the id names the exact weights, which is what the result cache keys on.
    """

    root: Path
    data: dict
    model_id: str

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

    def verify_files(self, trust_stamp: bool = False) -> None:
        """Check every listed file's sha256, or raise a `ModelError` naming the first file that differs.

        With `trust_stamp` (what loading does), a file with the size and mtime it had when last hashed is not
        hashed again. Either way the stamp is updated with what was hashed, mismatches included (`file_states`).
        """
        path = stamp_path(self.root)
        known = _read_stamp(path) if trust_stamp else {}
        stamp = {entry["path"]: known[entry["path"]] for entry in self.data["files"] if entry["path"] in known}
        try:
            for entry in self.data["files"]:
                file = self.root / entry["path"]
                if not _still_valid(known.get(entry["path"]), file):
                    stamp[entry["path"]] = _hash_record(file)
                if stamp[entry["path"]]["sha256"] != entry["sha256"]:
                    raise ModelError(f"model file {file} does not match the sha256 in its manifest (damaged or "
                                     "changed since the export); re-export or re-download the model")
        finally:
            if stamp != known:
                _write_stamp(path, self.root, stamp)

    def file_states(self) -> dict[str, str]:
        """Each listed file's state from the stamp alone (no hashing): "verified", "mismatch" (hashed at its
        current size and mtime, and found different) or "not yet" (never hashed as it is now)."""
        known = _read_stamp(stamp_path(self.root))
        states = {}
        for entry in self.data["files"]:
            record = known.get(entry["path"])
            if not _still_valid(record, self.root / entry["path"]):
                states[entry["path"]] = "not yet"
            else:
                states[entry["path"]] = "verified" if record["sha256"] == entry["sha256"] else "mismatch"
        return states


def _write_stamp(path: Path, model_dir: Path, files: dict[str, dict]) -> None:
    """Save a stamp atomically; a cache directory that cannot be written only means hashing again next time."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, {"model_dir": str(model_dir.resolve()), "files": files})
    except OSError:
        pass


def load_manifest(model_dir: str | os.PathLike) -> Manifest:
    """`read_manifest`, then check every listed file's sha256 (hashing only what changed since the last check).

    Every use of a model (`Captioner.load`, the CLI's batch runner before it serves cached answers, the server)
    goes through here once.
    """
    manifest = read_manifest(model_dir)
    manifest.verify_files(trust_stamp=True)
    return manifest


def read_manifest(model_dir: str | os.PathLike) -> Manifest:
    """Read and validate `molmocap.json` (`manifest_problem`: every field the runtime reads, with its type), checking
    that every listed file is present with its recorded size.

    No file is hashed: for `molmocap info` and `cache clear`, which must also work on a damaged model.
    """
    root = Path(model_dir)
    path = root / MANIFEST_NAME
    if not root.is_dir():
        raise ModelError(f"model directory not found: {root}")
    if not path.is_file():
        raise ModelError(f"{root} is not a molmocap model (no {MANIFEST_NAME}); create one with `molmocap export`")
    try:
        raw = path.read_bytes()
        data = json.loads(raw.decode("utf-8"))
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
    problem = manifest_problem(data)
    if problem:
        raise ModelError(f"{path} is not a valid manifest: {problem}; re-export the model")
    for entry in data["files"]:
        file = root / entry["path"]
        if not file.is_file() or file.stat().st_size != entry["bytes"]:
            raise ModelError(f"model file {file} is missing or truncated; re-export the model")
    unlisted = unlisted_weights(data, {child.name for child in root.iterdir()})
    if unlisted:
        raise ModelError(f"{path} does not list {', '.join(unlisted)} (so no checksum covers it); re-export the model")
    return Manifest(root, data, hashlib.sha256(raw).hexdigest())
