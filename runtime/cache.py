"""A persistent result cache: one SQLite file maps (image, model, prompt, options) to the generated result.

Greedy decoding is deterministic, so a result computed once can be served again without loading the model. The
key is the sha256 of the image file's bytes, the model id (`Manifest.model_id`: it follows the weights, since
loading a model checks every file against the sha256s its manifest lists), the prompt and every generation option
that changes the output. The file lives at `$MOLMOCAP_CACHE_DIR/results.sqlite`, else
`$XDG_CACHE_HOME/molmocap/results.sqlite`, else `~/.cache/molmocap/results.sqlite`. WAL mode and a busy timeout
let several processes share it. Captioning never fails because of the cache: an unusable file is reported once
and the run goes on without it; only `molmocap cache` (stats, clear) reports it as an error.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .errors import CacheError

CACHE_FILE = "results.sqlite"
SCHEMA_VERSION = 1
BUSY_TIMEOUT_S = 30.0
_SQLITE_CORRUPT, _SQLITE_NOTADB = 11, 26

_SCHEMA = """
CREATE TABLE IF NOT EXISTS results (
    key TEXT PRIMARY KEY,
    image_sha256 TEXT NOT NULL,
    model_id TEXT NOT NULL,
    model_label TEXT NOT NULL,
    prompt TEXT NOT NULL,
    options TEXT NOT NULL,
    text TEXT NOT NULL,
    token_ids TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS results_model ON results (model_id);
"""


def _is_corrupt(exc: sqlite3.Error) -> bool:
    """SQLITE_CORRUPT or SQLITE_NOTADB: the file is damaged or not a database (not merely busy or read-only)."""
    code = getattr(exc, "sqlite_errorcode", None)  # Python 3.11+; before that, SQLite's message
    if code is None:
        return str(exc) in ("file is not a database", "database disk image is malformed")
    return (code & 0xFF) in (_SQLITE_CORRUPT, _SQLITE_NOTADB)


def cache_dir() -> Path:
    """Where molmocap keeps what it can recompute (results, model verification stamps): `$MOLMOCAP_CACHE_DIR`,
    else `$XDG_CACHE_HOME/molmocap`, else `~/.cache/molmocap`."""
    chosen = os.environ.get("MOLMOCAP_CACHE_DIR")
    if chosen:
        return Path(chosen).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "molmocap"


def default_cache_path() -> Path:
    """The result cache file, `results.sqlite` in `cache_dir()`."""
    return cache_dir() / CACHE_FILE


def result_key(image_sha256: str, model: str, prompt: str, options: dict) -> str:
    """One hash of everything that decides the generated tokens (option order does not matter)."""
    material = json.dumps([image_sha256, model, prompt, options], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(material.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class CachedResult:
    """What the cache gives back: the generated text and ids and the prompt length."""

    text: str
    token_ids: list[int]
    prompt_tokens: int


@dataclass(frozen=True)
class CacheStats:
    """Entries, bytes on disk (database plus WAL files) and (model id, label, entries) per model."""

    path: Path
    entries: int
    size_bytes: int
    models: list[tuple[str, str, int]]


class ResultCache:
    """The result cache of one process: one connection, opened on first use.

    `get` and `put` never raise: the first SQLite or OS error is passed to `warn` and the cache is off for the rest
    of the process. `stats` and `clear` raise `CacheError` instead, so `molmocap cache` can say what is wrong.
    """

    def __init__(self, path: str | os.PathLike | None = None, warn: Callable[[str], None] | None = None) -> None:
        self.path = Path(path) if path is not None else default_cache_path()
        self._warn = warn or (lambda message: print(f"warning: {message}", file=sys.stderr))
        self._db: sqlite3.Connection | None = None
        self._disabled = False

    def get(self, key: str) -> CachedResult | None:
        """The stored result for `key`, or None (also when the cache is unusable)."""
        db = self._quiet_connection()
        if db is None:
            return None
        try:
            row = db.execute("SELECT text, token_ids, prompt_tokens FROM results WHERE key = ?", (key,)).fetchone()
            return None if row is None else CachedResult(row[0], json.loads(row[1]), row[2])
        except (sqlite3.Error, ValueError) as exc:
            self._disable(exc)
            return None

    def put(self, key: str, image_sha256: str, model: str, model_label: str, prompt: str, options: dict,
            result: CachedResult) -> None:
        """Store a result (replacing any under the same key); failures only turn the cache off."""
        db = self._quiet_connection()
        if db is None:
            return
        try:
            db.execute("INSERT OR REPLACE INTO results VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (key, image_sha256, model, model_label, prompt, json.dumps(options, sort_keys=True),
                        result.text, json.dumps(result.token_ids), result.prompt_tokens, time.time()))
        except sqlite3.Error as exc:
            self._disable(exc)

    def stats(self) -> CacheStats:
        """Counts for `molmocap cache stats`; a cache that does not exist yet is empty (and is not created)."""
        if not self.path.exists():
            return CacheStats(self.path, 0, 0, [])
        try:
            db = self._connection()
            (entries,) = db.execute("SELECT COUNT(*) FROM results").fetchone()
            models = db.execute("SELECT model_id, MAX(model_label), COUNT(*) FROM results GROUP BY model_id "
                                "ORDER BY COUNT(*) DESC, model_id").fetchall()
        except sqlite3.Error as exc:
            raise CacheError(self._broken_message(exc)) from None
        return CacheStats(self.path, entries, self._size_on_disk(), [tuple(row) for row in models])

    def clear(self, model: str | None = None) -> int | None:
        """Delete every entry, or those of one model id; returns how many went.

        Clearing everything from a file SQLite cannot read deletes the file (and its WAL files) instead, so
        `molmocap cache clear` is the way out of a corrupt cache; that case returns None.
        """
        if not self.path.exists():
            return 0
        try:
            db = self._connection()
            where, args = ("WHERE model_id = ?", (model,)) if model is not None else ("", ())
            removed = db.execute(f"DELETE FROM results {where}", args).rowcount
            db.execute("VACUUM")
            return removed
        except sqlite3.Error as exc:
            if model is not None or not _is_corrupt(exc):
                raise CacheError(self._broken_message(exc)) from None
        self.close()
        for path in self._files():
            path.unlink(missing_ok=True)
        return None

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def _connection(self) -> sqlite3.Connection:
        """Open (creating the file and schema if needed) or raise `sqlite3.Error`/`OSError`."""
        if self._db is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
            try:
                (version,) = db.execute("PRAGMA user_version").fetchone()
                if version > SCHEMA_VERSION:
                    raise sqlite3.DatabaseError(f"schema version {version} is newer than this molmocap's")
                db.execute("PRAGMA journal_mode=WAL")
                db.executescript(_SCHEMA)
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            except BaseException:
                db.close()
                raise
            self._db = db
        return self._db

    def _quiet_connection(self) -> sqlite3.Connection | None:
        if self._disabled:
            return None
        try:
            return self._connection()
        except (sqlite3.Error, OSError) as exc:
            self._disable(exc)
            return None

    def _disable(self, exc: BaseException) -> None:
        """Warn once and stop using the cache for the rest of the process."""
        self._disabled = True
        try:
            self.close()
        except sqlite3.Error:
            self._db = None
        self._warn(f"{self._broken_message(exc)}; continuing without it")

    def _broken_message(self, exc: BaseException) -> str:
        return (f"result cache {self.path} is unusable ({exc}); "
                "`molmocap cache clear` deletes it, --no-cache skips it")

    def _files(self) -> list[Path]:
        return [self.path, self.path.with_name(self.path.name + "-wal"), self.path.with_name(self.path.name + "-shm")]

    def _size_on_disk(self) -> int:
        return sum(path.stat().st_size for path in self._files() if path.exists())
