"""The results directory of a Ray batch: JSON lines part files that a kill cannot corrupt and a rerun resumes.

Only the driver writes here (the workers send their rows back to it), so OUT_DIR need not be on a shared
filesystem. Each run appends to a part file of its own, `part-<UTC time>-<random>.jsonl`, through the local batch's
`ResultsFile`: every row one whole write, fsynced. A rerun reads every part as the local batch reads its file: a
partial last row is cut off, the error rows of the images being captioned again are dropped, and the keys of the
rows that succeeded are the images to skip. A lock file keeps a second run out of the same directory meanwhile.
"""

from __future__ import annotations

import fcntl
import os
import secrets
import time
from collections.abc import Iterable
from pathlib import Path

from molmocap.runtime.batch import ResultsFile
from molmocap.runtime.errors import InputError

PART_PATTERN = "part-*.jsonl"
LOCK_FILE = ".molmocap.lock"


class ResultsDir:
    """OUT_DIR: `open` it for the keys already done, `append` this run's rows, `close` it."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.part: Path | None = None
        self._results: ResultsFile | None = None
        self._lock: int | None = None

    def open(self, retry: Iterable[str] = ()) -> set[str]:
        """Lock the directory (creating it) and read its parts; returns the keys of the images they hold results
        for, after dropping the error rows of the images in `retry`."""
        if self.path.exists() and not self.path.is_dir():
            raise InputError(f"{self.path} is a file; --ray writes part files into a directory: give -o OUT_DIR")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self._lock = os.open(self.path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.close()
            raise InputError(f"another run is writing into {self.path}; wait for it or choose another -o") from None
        except OSError as exc:
            self.close()
            raise InputError(f"cannot write into {self.path}: {exc.strerror or exc}") from None
        retry = list(retry)
        done: set[str] = set()
        for part in sorted(self.path.glob(PART_PATTERN)):
            with ResultsFile(part, "jsonl") as results:
                done |= results.open(retry=retry)
        return done

    def append(self, row: dict) -> None:
        """Append one row to this run's part file, which the first row creates."""
        if self._results is None:
            stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
            self.part = self.path / f"part-{stamp}-{secrets.token_hex(4)}.jsonl"
            self._results = ResultsFile(self.part, "jsonl")
            self._results.open()
        self._results.append(row)

    def close(self) -> None:
        if self._results is not None:
            self._results.close()
            self._results = None
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def __enter__(self) -> ResultsDir:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
