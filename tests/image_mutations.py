"""Fuzzed image files: valid seeds written by Pillow in every format molmocap reads, and seeded mutations of them.

Shared by tests/test_fuzz_images.py (a few hundred cases) and benchmarks/fuzz_images.py (ten thousand and more).
Case `i` of seed `s` depends only on (s, i), so any reported case can be made again from its index.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image

# Declared sizes that break naive arithmetic: zero, one, sign and 16/24/32-bit edges, near and over the pixel cap.
ABSURD_SIZES = [0, 1, 2, 255, 256, 13_000, 20_000, 65_535, 65_536, 100_000, 2**24 - 1, 2**31 - 1, 2**32 - 1]
# EXIF orientations outside 1..8 and other hostile values for the tags exif_transpose reads.
HOSTILE_ORIENTATIONS = [0, 9, 255, 65_535]
SPECIAL_BYTES = [0x00, 0x01, 0x7F, 0x80, 0xFE, 0xFF]


@dataclass
class Case:
    """One fuzz input: its index, the seed file it came from, the mutations applied, and the bytes."""

    index: int
    seed: str
    mutations: list[str]
    data: bytes


def _noise(height: int, width: int, channels: int = 3) -> np.ndarray:
    rng = np.random.default_rng(height * 1000 + width)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, (x + y) * 4 % 256, x * y % 256][:channels], axis=-1)
    return np.clip(base + rng.normal(0, 30, base.shape), 0, 255).astype(np.uint8)


def _save(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _exif(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = orientation
    exif[0x010F] = "x" * 300  # Make: a long string
    exif[0x0131] = ""  # Software: empty
    return exif


@lru_cache(maxsize=1)
def seed_files() -> dict[str, bytes]:
    """Small valid files: PNG, JPEG, WebP, GIF (animated too), TIFF, BMP, ICO and PGM in many modes."""
    rgb = Image.fromarray(_noise(28, 40))
    rgba = Image.fromarray(_noise(28, 40, 4))
    grey = rgb.convert("L")
    palette = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    grey16 = Image.fromarray(np.asarray(grey, dtype=np.uint16) * 257)
    values = np.asarray(grey, dtype=np.float32) / 200 - 0.1
    values[0, :4] = [np.nan, np.inf, -np.inf, 1e30]
    floats = Image.fromarray(values)
    ints = Image.fromarray(np.asarray(grey, dtype=np.int32) * 100_000 - 2**30)
    frames = [Image.fromarray(np.roll(_noise(28, 40), 7 * i, axis=1)).convert("P") for i in range(3)]
    keyed = palette.copy()
    keyed.info["transparency"] = 3
    alpha_palette = rgba.convert("P")
    alpha_palette.info["transparency"] = bytes(range(0, 256, 16))
    seeds = {
        "png-rgb": _save(rgb, "PNG"), "png-rgba": _save(rgba, "PNG"), "png-l": _save(grey, "PNG"),
        "png-la": _save(rgba.convert("LA"), "PNG"), "png-p-key": _save(keyed, "PNG"),
        "png-p-alpha": _save(alpha_palette, "PNG"), "png-1bit": _save(rgb.convert("1"), "PNG"),
        "png-i16": _save(grey16, "PNG"), "png-i16-key": _save(grey16, "PNG", transparency=30_000),
        "png-rgb-key": _save(rgb, "PNG", transparency=(10, 20, 30)),
        "png-exif": _save(rgb, "PNG", exif=_exif(6)),
        "jpeg-rgb": _save(rgb, "JPEG", quality=85), "jpeg-l": _save(grey, "JPEG"),
        "jpeg-cmyk": _save(rgb.convert("CMYK"), "JPEG"), "jpeg-progressive": _save(rgb, "JPEG", progressive=True),
        "jpeg-444": _save(rgb, "JPEG", subsampling=0), "jpeg-exif": _save(rgb, "JPEG", exif=_exif(8)),
        "webp-lossy": _save(rgb, "WEBP", quality=70), "webp-lossless-rgba": _save(rgba, "WEBP", lossless=True),
        "webp-animated": _save(rgb, "WEBP", save_all=True, append_images=[grey.convert("RGB")], duration=50),
        "gif": _save(palette, "GIF"), "gif-key": _save(keyed, "GIF"),
        "gif-animated": _save(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=40, loop=0,
                              transparency=0, disposal=2),
        "tiff-rgb": _save(rgb, "TIFF"), "tiff-lzw": _save(rgb, "TIFF", compression="tiff_lzw"),
        "tiff-rgba": _save(rgba, "TIFF"), "tiff-cmyk": _save(rgb.convert("CMYK"), "TIFF"),
        "tiff-i16": _save(grey16, "TIFF"), "tiff-float": _save(floats, "TIFF"), "tiff-int32": _save(ints, "TIFF"),
        "tiff-1bit": _save(rgb.convert("1"), "TIFF", compression="group4"),
        "tiff-pages": _save(rgb, "TIFF", save_all=True, append_images=[grey.convert("RGB")]),
        "tiff-exif": _save(rgb, "TIFF", exif=_exif(5)),
        "bmp-rgb": _save(rgb, "BMP"), "bmp-p": _save(palette, "BMP"), "bmp-1bit": _save(rgb.convert("1"), "BMP"),
        "bmp-rgba": _save(rgba, "BMP"),
        "ico": _save(rgba, "ICO", sizes=[(16, 16), (32, 32)]),
        "pgm-16bit": _save(grey16.convert("I"), "PPM"),
    }
    for orientation in HOSTILE_ORIENTATIONS:
        seeds[f"jpeg-orientation-{orientation}"] = _save(rgb, "JPEG", exif=_exif(orientation))
    return seeds


def _flip_bits(data: bytearray, rng: np.random.Generator) -> str:
    count = int(rng.integers(1, 17))
    for position in rng.integers(0, len(data) * 8, count):
        data[position // 8] ^= 1 << (position % 8)
    return f"flip {count} bits"


def _special_bytes(data: bytearray, rng: np.random.Generator) -> str:
    count = int(rng.integers(1, 9))
    for position in rng.integers(0, len(data), count):
        data[position] = SPECIAL_BYTES[int(rng.integers(len(SPECIAL_BYTES)))]
    return f"set {count} bytes"


def _truncate(data: bytearray, rng: np.random.Generator) -> str:
    keep = int(rng.integers(1, len(data)))
    del data[keep:]
    return f"truncate to {keep}"


def _splice(data: bytearray, rng: np.random.Generator) -> str:
    start = int(rng.integers(0, len(data)))
    length = int(rng.integers(1, 65))
    kind = int(rng.integers(3))
    if kind == 0:
        del data[start:start + length]
        return f"delete {length} at {start}"
    if kind == 1:
        data[start:start] = data[start:start + length]
        return f"duplicate {length} at {start}"
    data[start:start] = rng.integers(0, 256, length, dtype=np.uint8).tobytes()
    return f"insert {length} random at {start}"


def _png_chunks(data: bytes) -> list[tuple[bytes, bytes]] | None:
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        return None
    chunks, offset = [], 8
    while offset + 12 <= len(data):
        (length,) = struct.unpack(">I", data[offset:offset + 4])
        kind = data[offset + 4:offset + 8]
        chunks.append((kind, data[offset + 8:offset + 8 + length]))
        offset += 12 + length
    return chunks


def _png_join(chunks: list[tuple[bytes, bytes]]) -> bytes:
    out = b"\x89PNG\r\n\x1a\n"
    for kind, body in chunks:
        out += struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    return out


def _png_chunk(data: bytearray, rng: np.random.Generator) -> str:
    """Chunk-level PNG mutations with valid CRCs, so they reach the decoder rather than the checksum test."""
    chunks = _png_chunks(bytes(data))
    if not chunks:
        return _special_bytes(data, rng)
    i = int(rng.integers(len(chunks)))
    kind, body = chunks[i]
    action = int(rng.integers(5))
    if action == 0 and len(chunks) > 1:
        del chunks[i]
        done = f"drop chunk {kind.decode('latin-1')}"
    elif action == 1:
        chunks.insert(i, chunks[i])
        done = f"duplicate chunk {kind.decode('latin-1')}"
    elif action == 2 and body:
        mutated = bytearray(body)
        _flip_bits(mutated, rng)
        chunks[i] = (kind, bytes(mutated))
        done = f"flip bits in chunk {kind.decode('latin-1')} (CRC fixed)"
    elif action == 3:
        extra = [(b"tRNS", bytes(rng.integers(0, 256, int(rng.integers(0, 300)), dtype=np.uint8))),
                 (b"PLTE", bytes(rng.integers(0, 256, 3 * int(rng.integers(0, 2)), dtype=np.uint8))),
                 (b"eXIf", b"MM\x00*\x00\x00\x00\x08" + bytes(rng.integers(0, 256, 64, dtype=np.uint8))),
                 (b"zTXt", b"k\x00\x00" + zlib.compress(bytes(4_000_000))),
                 (b"iCCP", b"p\x00\x00" + zlib.compress(bytes(rng.integers(0, 256, 500, dtype=np.uint8))))]
        chunk = extra[int(rng.integers(len(extra)))]
        chunks.insert(max(1, i), chunk)
        done = f"insert chunk {chunk[0].decode()}"
    else:
        width, height = (ABSURD_SIZES[int(rng.integers(len(ABSURD_SIZES)))] for _ in range(2))
        ihdr = chunks[0][1]
        chunks[0] = (b"IHDR", struct.pack(">II", width, height) + ihdr[8:])
        done = f"IHDR {width}x{height} (CRC fixed)"
    data[:] = _png_join(chunks)
    return done


def _declared_size(data: bytearray, rng: np.random.Generator) -> str:
    """Absurd declared dimensions where each format keeps them."""
    width, height = (ABSURD_SIZES[int(rng.integers(len(ABSURD_SIZES)))] for _ in range(2))
    head = bytes(data[:4])
    if head.startswith(b"\x89PNG"):
        struct.pack_into(">II", data, 16, width, height)
        return f"PNG IHDR {width}x{height} (bad CRC)"
    if head.startswith(b"\xff\xd8"):
        for marker in (b"\xff\xc0", b"\xff\xc2"):
            at = bytes(data).find(marker)
            if at >= 0:
                struct.pack_into(">HH", data, at + 5, height & 0xFFFF, width & 0xFFFF)
                return f"JPEG SOF {width & 0xFFFF}x{height & 0xFFFF}"
    if head.startswith(b"GIF"):
        struct.pack_into("<HH", data, 6, width & 0xFFFF, height & 0xFFFF)
        at = bytes(data).find(b"\x2c")
        if at >= 0 and at + 9 <= len(data) and rng.integers(2):
            struct.pack_into("<HH", data, at + 5, height & 0xFFFF, width & 0xFFFF)
        return f"GIF screen {width & 0xFFFF}x{height & 0xFFFF}"
    if head.startswith(b"BM") and len(data) >= 30:
        signed = height if rng.integers(2) else -min(height, 2**31 - 1)
        struct.pack_into("<iiHH", data, 18, min(width, 2**31 - 1), max(min(signed, 2**31 - 1), -(2**31)), 1,
                         [1, 4, 8, 16, 24, 32, 64][int(rng.integers(7))])
        return f"BMP {width}x{signed}"
    if head in (b"II*\x00", b"MM\x00*"):
        return _tiff_tags(data, width, height, rng)
    if head == b"\x00\x00\x01\x00":
        for entry in range(struct.unpack_from("<H", data, 4)[0]):
            struct.pack_into("<BB", data, 6 + 16 * entry, width & 0xFF, height & 0xFF)
            struct.pack_into("<I", data, 6 + 16 * entry + 8, width & 0xFFFFFFFF)
        return f"ICO entries {width & 0xFF}x{height & 0xFF}, size {width}"
    if head == b"RIFF" and bytes(data[12:16]) == b"VP8X":
        struct.pack_into("<I", data, 24, (width - 1) & 0xFFFFFF)
        struct.pack_into("<I", data, 27, (height - 1) & 0xFFFFFF)
        return f"WebP canvas {width & 0xFFFFFF}x{height & 0xFFFFFF}"
    return _special_bytes(data, rng)


def _tiff_tags(data: bytearray, width: int, height: int, rng: np.random.Generator) -> str:
    """Rewrite the first IFD's width, height, bits per sample, samples per pixel or strip offsets/counts."""
    order = "<" if data[:2] == b"II" else ">"
    (ifd,) = struct.unpack_from(order + "I", data, 4)
    if ifd + 2 > len(data):
        return _special_bytes(data, rng)
    (count,) = struct.unpack_from(order + "H", data, ifd)
    values = {256: width, 257: height, 258: [0, 3, 12, 16, 64, 65_535][int(rng.integers(6))],
              277: [0, 2, 5, 255][int(rng.integers(4))], 273: width, 279: height}
    tag_chosen = list(values)[int(rng.integers(len(values)))]
    for entry in range(count):
        at = ifd + 2 + 12 * entry
        if at + 12 > len(data):
            break
        tag, kind = struct.unpack_from(order + "HH", data, at)
        if tag == tag_chosen or (tag in (256, 257) and tag_chosen in (256, 257)):
            value = values[tag]
            if kind == 3:
                struct.pack_into(order + "H", data, at + 8, value & 0xFFFF)
            else:
                struct.pack_into(order + "I", data, at + 8, value & 0xFFFFFFFF)
    return f"TIFF tag {tag_chosen} -> {values[tag_chosen]}"


def _exif_region(data: bytearray, rng: np.random.Generator) -> str:
    """Corrupt bytes inside an EXIF block, where `exif_transpose` reads."""
    at = bytes(data).find(b"Exif\x00\x00")
    if at < 0:
        at = bytes(data).find(b"eXIf")
    if at < 0:
        return _flip_bits(data, rng)
    end = min(len(data), at + 120)
    count = int(rng.integers(1, 9))
    for position in rng.integers(at + 6, max(at + 7, end), count):
        if position < len(data):
            data[position] = SPECIAL_BYTES[int(rng.integers(len(SPECIAL_BYTES)))] ^ int(rng.integers(2))
    return f"corrupt {count} EXIF bytes"


MUTATIONS: list[Callable[[bytearray, np.random.Generator], str]] = [
    _flip_bits, _special_bytes, _truncate, _splice, _png_chunk, _declared_size, _exif_region,
]


def make_case(seed: int, index: int) -> Case:
    """Case `index` of run `seed`: the first pass over the seeds unchanged, then one to three mutations each."""
    seeds = seed_files()
    names = sorted(seeds)
    if index < len(names):
        return Case(index, names[index], [], seeds[names[index]])
    rng = np.random.default_rng([seed, index])
    name = names[int(rng.integers(len(names)))]
    data = bytearray(seeds[name])
    applied = []
    for _ in range(int(rng.integers(1, 4))):
        if len(data) < 2:
            break
        mutate = MUTATIONS[int(rng.integers(len(MUTATIONS)))]
        try:
            applied.append(mutate(data, rng))
        except (struct.error, IndexError):  # a structure too short for this mutation: flip bits instead
            applied.append(_flip_bits(data, rng))
    return Case(index, name, applied, bytes(data))


def cases(seed: int, count: int) -> Iterator[Case]:
    """`count` cases of run `seed`, in order."""
    return (make_case(seed, index) for index in range(count))
