"""Caption files for training sets: `photo.jpg` -> `photo.txt` beside it, as kohya's scripts and taggui read them.

The text is `prefix` + the caption (tags joined by ", ", an seo answer's caption). Which caption files molmocap
wrote is recorded in a registry beside them, `.molmocap-captions.jsonl` (hidden, so image discovery and dataset
loaders skip it): one appended line per write with the file name, the sha256 of the bytes written, the result key
and the prefix. A caption file is molmocap's while its bytes still hash to the last line recorded for it; one that
another tool wrote, or that someone edited by hand since, is not, and is only replaced with `overwrite`. The line is
appended (and fsynced) before the file is replaced, so a kill between the two never turns a foreign file into ours.
A file whose registry line has the same key and prefix is up to date: a rerun skips its image without the model.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

from .errors import InputError
from .files import remove_leftovers, replace_atomically
from .xmp import sidecar_fields

REGISTRY_NAME = ".molmocap-captions.jsonl"
MODES = ("refuse", "skip", "overwrite")


class CaptionFiles:
    """Writes caption files beside images; `mode` says what to do with an existing file molmocap does not own:
    `refuse` (an `InputError` for that image), `skip` (keep any existing file, do not caption the image) or
    `overwrite` (replace any)."""

    def __init__(self, ext: str = ".txt", prefix: str = "", mode: str = "refuse") -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}")
        from .batch import IMAGE_EXTENSIONS  # here: batch imports this module

        if (not ext.startswith(".") or len(ext) < 2 or "/" in ext or os.sep in ext or ext.count(".") > 1
                or ext.lower() in IMAGE_EXTENSIONS | {".pdf", ".xmp"}):
            raise InputError(f"--caption-ext {ext!r}: give an extension such as .txt or .caption")
        self.ext, self.prefix, self.mode = ext, prefix, mode
        self._registries: dict[Path, dict[str, dict]] = {}

    def path(self, image: str | os.PathLike) -> Path:
        """`photo.jpg` -> `photo.txt` (with this extension), beside the image."""
        return Path(image).with_suffix(self.ext)

    def remove_leftovers(self, images: Iterable[str | os.PathLike]) -> None:
        """Delete the temporary files of caption writes that an earlier, killed run left."""
        remove_leftovers(self.path(image) for image in images)

    def text(self, answer: str | list | dict) -> str:
        """The caption file's text for an answer: the prefix, then the caption (tags joined by ", ")."""
        return self.prefix + sidecar_fields(answer)[0]

    def skip(self, image: str | os.PathLike, key: str) -> bool:
        """Whether `image` needs no captioning: its file is up to date (same key and prefix, unchanged since
        molmocap wrote it), or it exists and `mode` is `skip`. An `InputError` when it exists, is not molmocap's
        and `mode` is `refuse`."""
        path = self.path(image)
        if not path.exists():
            return False
        if self.mode == "skip":
            return True
        entry = self._owned(path)
        if entry is not None and entry.get("key") == key and entry.get("prefix") == self.prefix:
            return True
        if entry is None and self.mode == "refuse":
            raise InputError(f"{path} exists and molmocap did not write it (or it was edited since); "
                             "pass --overwrite to replace it or --skip-existing to keep it")
        return False

    def write(self, image: str | os.PathLike, answer: str | list | dict, key: str) -> Path:
        """Record, then atomically write, the caption file of `image`; returns its path."""
        path = self.path(image)
        data = self.text(answer).encode("utf-8")
        entry = {"file": path.name, "sha256": hashlib.sha256(data).hexdigest(), "key": key, "prefix": self.prefix}
        registry = path.parent / REGISTRY_NAME
        try:
            fd = os.open(registry, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
            try:
                os.write(fd, (json.dumps(entry, ensure_ascii=False) + "\n").encode("utf-8"))
                os.fsync(fd)
            finally:
                os.close(fd)
            self._entries(path.parent)[path.name] = entry
            replace_atomically(path, data)
        except OSError as exc:
            raise InputError(f"cannot write caption file {path}: {exc.strerror or exc}") from None
        return path

    def _owned(self, path: Path) -> dict | None:
        """The registry entry of `path` when its bytes are still the ones molmocap wrote, else None."""
        entry = self._entries(path.parent).get(path.name)
        if entry is None:
            return None
        try:
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
        except OSError:
            return None
        return entry if digest == entry.get("sha256") else None

    def _entries(self, folder: Path) -> dict[str, dict]:
        """The last registry entry per file name in `folder`, read once per run; torn or foreign lines ignored."""
        if folder not in self._registries:
            entries: dict[str, dict] = {}
            try:
                lines = (folder / REGISTRY_NAME).read_text(encoding="utf-8", errors="replace").splitlines()
            except OSError:
                lines = []
            for line in lines:
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue
                if isinstance(entry, dict) and isinstance(entry.get("file"), str):
                    entries[entry["file"]] = entry
            self._registries[folder] = entries
        return self._registries[folder]
