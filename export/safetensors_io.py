"""Read safetensors files with numpy alone: the export needs neither torch nor the `safetensors` package.

A file is an 8-byte little-endian header length, a JSON header naming each tensor's dtype, shape and byte range
(relative to the end of the header), then the raw little-endian bytes. Headers are checked when read, so a corrupt
shard fails before any work is done; a tensor's bytes are mapped only while it is converted to float32.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from molmocap.runtime.errors import ExportError

MAX_HEADER_BYTES = 100 << 20
# On-disk dtype -> (numpy dtype of the raw bytes, bytes per element). BF16 is read as uint16 and widened exactly.
DTYPES = {"F32": (np.dtype("<f4"), 4), "F16": (np.dtype("<f2"), 2), "BF16": (np.dtype("<u2"), 2),
          "F64": (np.dtype("<f8"), 8)}


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lies in its file: absolute byte offset, byte count, dtype name and shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int


def read_header(path: Path) -> dict[str, TensorEntry]:
    """Every tensor of one safetensors file, validated against the file's size."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise ValueError("shorter than its 8-byte header length")
            (length,) = struct.unpack("<Q", prefix)
            if length > min(MAX_HEADER_BYTES, size - 8):
                raise ValueError(f"header length {length} does not fit the file's {size} bytes")
            header = json.loads(f.read(length))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        entries = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            entries[name] = _entry(name, info, 8 + length, size)
        return entries
    except (OSError, ValueError, TypeError, KeyError, UnicodeDecodeError) as exc:
        raise ExportError(f"cannot load the weights in {path}: {exc}".splitlines()[0]) from None


def _entry(name: str, info: dict, data_start: int, size: int) -> TensorEntry:
    dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
    if not all(isinstance(n, int) and n >= 0 for n in (*shape, begin, end)) or not isinstance(dtype, str):
        raise ValueError(f"tensor {name} has a malformed entry {info}")
    if not begin <= end <= size - data_start:
        raise ValueError(f"tensor {name} lies outside the file (bytes {begin}..{end})")
    if dtype in DTYPES and (end - begin) != DTYPES[dtype][1] * int(np.prod(shape, dtype=np.int64)):
        raise ValueError(f"tensor {name}: {end - begin} bytes do not hold {dtype} of shape {list(shape)}")
    return TensorEntry(name, dtype, shape, data_start + begin, end - begin)


def read_tensor(path: Path, entry: TensorEntry, out: np.ndarray | None = None) -> np.ndarray:
    """The tensor as float32 (written into `out` when given; BF16 and F16 widen exactly). The file is mapped for
    this call only, so the checkpoint's pages do not stay in this process."""
    if entry.dtype not in DTYPES:
        raise ExportError(f"tensor {entry.name} in {path} has dtype {entry.dtype}; "
                          f"supported: {', '.join(DTYPES)}")
    out = np.empty(entry.shape, dtype=np.float32) if out is None else out
    if out.shape != entry.shape:
        raise ExportError(f"tensor {entry.name} has shape {list(entry.shape)}, expected {list(out.shape)}")
    if entry.nbytes == 0:
        return out
    raw_dtype = DTYPES[entry.dtype][0]
    try:
        raw = np.memmap(path, dtype=raw_dtype, mode="r", offset=entry.offset, shape=entry.shape)
    except (OSError, ValueError) as exc:
        raise ExportError(f"cannot read tensor {entry.name} from {path}: {exc}".splitlines()[0]) from None
    try:
        if entry.dtype == "BF16":  # bfloat16 is the top half of a float32
            np.left_shift(raw, 16, out=out.view(np.uint32), dtype=np.uint32)
        else:
            np.copyto(out, raw, casting="unsafe" if entry.dtype == "F64" else "same_kind")
    finally:
        del raw
    return out
