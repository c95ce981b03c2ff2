"""File helpers every writer shares: the sha256 of a file, and all-or-nothing writes with their leftovers cleaned.

Results files, sidecars, caption files, marked images, manifests and verification stamps are all written through
`replace_atomically`, so a reader never sees half a file and a killed writer leaves only a temporary file that
`remove_leftovers` recognises.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path


def sha256_file(path: str | os.PathLike) -> str:
    """The sha256 of a file's bytes, read a megabyte at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_json_atomic(path: Path, data: dict) -> None:
    """Write `data` as indented JSON (mode 0644) through `replace_atomically`."""
    text = json.dumps(data, indent=2, sort_keys=False) + "\n"
    replace_atomically(Path(path), text.encode("utf-8"), mode=0o644)


def temporary_prefix(path: Path) -> str:
    """The name prefix of `replace_atomically`'s temporary files for `path` (hidden, so discovery skips them)."""
    return f".{path.name}."


def remove_leftovers(paths: Iterable[str | os.PathLike]) -> None:
    """Delete the temporary files that `replace_atomically` left beside `paths` when it was killed before its rename.

    Only names it makes for these very paths are touched (`.NAME.<random>.tmp`), and each directory is listed once,
    so a batch cleans up after an earlier killed one in one pass. Two processes writing the same file at once are
    not supported anyway (they would also race on the rename).
    """
    targets: dict[Path, set[str]] = {}
    for path in map(Path, paths):
        targets.setdefault(path.parent, set()).add(path.name)
    for folder, names in targets.items():
        try:
            entries = os.listdir(folder)
        except OSError:
            continue
        for entry in entries:
            target, dot, random_part = entry[1:-len(".tmp")].rpartition(".")
            if (entry.startswith(".") and entry.endswith(".tmp") and dot and target in names and random_part
                    and "." not in random_part):
                try:
                    os.unlink(folder / entry)
                except OSError:
                    pass


def replace_atomically(path: Path, data: bytes, mode: int | None = None) -> None:
    """Write `data` to a temporary file beside `path`, fsync it and rename it over `path`: all or nothing.

    The file gets `mode` when given, else keeps the mode of the one it replaces, else gets the usual one (0666 less
    the umask), not mkstemp's 0600.
    A kill before the rename leaves the temporary file behind; `remove_leftovers` deletes such files.
    """
    if mode is None:
        try:
            mode = path.stat().st_mode & 0o777
        except FileNotFoundError:
            umask = os.umask(0)
            os.umask(umask)
            mode = 0o666 & ~umask
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=temporary_prefix(path), suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.chmod(tmp, mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
