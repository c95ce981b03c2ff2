"""Image loading: a path, bytes or PIL image -> an upright RGB PIL image, or an `InputError` naming the input.

The RGB conversion is transformers' `convert_to_rgb` (what `Molmo2ImageProcessor` applies to PIL images), so
preprocessing our output gives the reference's arrays. Two deliberate differences: EXIF orientation is
applied (the reference leaves a given PIL image as stored), and high-bit-depth greyscale is rescaled rather
than clipped (see `load_image`).
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import InputError

# Largest image accepted: about 179 megapixels, Pillow's own hard limit; larger ones may be decompression bombs.
MAX_PIXELS = 2 * 89_478_485

# Largest encoded image accepted, checked (with stat for a file) before any byte is read: 64 MiB is far beyond a
# camera JPEG or a lossless 48-megapixel PNG, and keeps one input from filling memory before decoding even starts.
MAX_FILE_BYTES = 64 * 1024 * 1024

_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
# v / 257 rounded, for every 16-bit value: one table look-up per pixel instead of float arithmetic.
_SIXTEEN_TO_EIGHT = np.rint(np.arange(65536) / 257).astype(np.uint8)


def load_image(source: str | os.PathLike | bytes | Image.Image) -> Image.Image:
    """Decode `source` fully, apply its EXIF orientation and convert it to RGB.

    Transparency (an alpha band, or a palette/colour-key `transparency`) is composited onto white and any
    other mode goes through `convert("RGB")`, exactly as transformers' `convert_to_rgb`. Exceptions, where
    Pillow's conversion clips: 16-bit greyscale (`I;16*`, and `I`, which Pillow uses for 16-bit PGM) is
    scaled to 8 bits (v / 257, rounded; values outside 0..65535 clipped), and float greyscale (`F`) is read
    as 0..1 intensity (clipped, times 255, rounded). Data over `MAX_FILE_BYTES` or images over `MAX_PIXELS` are
    refused before decoding. Any failure is an `InputError` with a one-line message.
    """
    if isinstance(source, Image.Image):
        return _upright_rgb(source, "<image>")
    if isinstance(source, (bytes, bytearray, memoryview)):
        if not len(source):
            raise InputError("empty image data: <bytes>")
        _check_file_size(len(source), "<bytes>")
        return _upright_rgb(io.BytesIO(bytes(source)), "<bytes>")
    path = Path(os.fspath(source))
    if path.is_dir():
        raise InputError(f"not an image file but a directory: {path}")
    if not path.is_file():
        raise InputError(f"image file not found: {path}")
    try:
        _check_file_size(path.stat().st_size, str(path))
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read image file {path}: {exc.strerror or _one_line(exc)}") from None
    if not data:
        raise InputError(f"empty image file: {path}")
    return _upright_rgb(io.BytesIO(data), str(path))


def _check_file_size(size: int, name: str) -> None:
    if size > MAX_FILE_BYTES:
        raise InputError(f"image file too large ({size} bytes, more than {MAX_FILE_BYTES}): {name}")


def _upright_rgb(source: Image.Image | io.BytesIO, name: str) -> Image.Image:
    """Open (unless given an image), check the size, decode, orient and convert; errors become `InputError`."""
    try:
        with warnings.catch_warnings():
            # Pillow warns (corrupt EXIF, skipped TIFF tags, decompression bombs) on stderr; the image either
            # decodes or fails as one InputError, so a warning would only add stray lines to one-line output.
            warnings.simplefilter("ignore")
            if isinstance(source, Image.Image):
                return _decoded_rgb(source, name, owned=False)
            return _decoded_rgb(Image.open(source), name, owned=True)  # in-memory data: no file to close
    except InputError:
        raise
    except UnidentifiedImageError:
        raise InputError(f"unsupported or unrecognised image format: {name}") from None
    except Image.DecompressionBombError:
        raise InputError(f"image too large (more than {MAX_PIXELS} pixels): {name}") from None
    except Exception as exc:  # noqa: BLE001 - Pillow signals bad data with many exception types
        raise InputError(f"corrupt or truncated image: {name} ({_one_line(exc)})") from None


def _decoded_rgb(image: Image.Image, name: str, owned: bool) -> Image.Image:
    """Size checks, full decode, EXIF orientation, RGB.

    An image we `owned` (opened ourselves, or a copy) is changed in place: at the pixel cap each copy costs
    about half a second, and the caller's own image is never changed.
    """
    if image.width * image.height > MAX_PIXELS:
        raise InputError(f"image too large ({image.width}x{image.height}, more than {MAX_PIXELS} pixels): {name}")
    if image.width == 0 or image.height == 0:
        raise InputError(f"zero-size image ({image.width}x{image.height}): {name}")
    image.load()
    try:
        transposed = ImageOps.exif_transpose(image, in_place=owned)
    except Exception:  # noqa: BLE001 - a malformed EXIF block only costs the orientation
        transposed = None
    if transposed is not None:
        image, owned = transposed, True
    try:
        return _to_rgb(image, owned)
    except ValueError as exc:
        raise InputError(f"unsupported image mode {image.mode}: {name} ({_one_line(exc)})") from None


def _to_rgb(image: Image.Image, owned: bool) -> Image.Image:
    """transformers' `convert_to_rgb` for PIL images, after rescaling high-bit-depth greyscale to 8 bits.

    An RGB image without transparency is returned as is when `owned` (`convert("RGB")` would only copy it).
    """
    if image.mode in _SIXTEEN_BIT_MODES or image.mode == "F":
        image = _to_8bit(image)
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")
    return image if owned and image.mode == "RGB" else image.convert("RGB")


def _to_8bit(image: Image.Image) -> Image.Image:
    """16-bit or float greyscale -> L (LA where a colour-key `transparency` marks see-through pixels)."""
    values = np.asarray(image)
    if image.mode == "F":
        grey = np.rint(np.clip(np.nan_to_num(values), 0, 1) * 255).astype(np.uint8)
    else:
        grey = _SIXTEEN_TO_EIGHT[values if values.dtype.itemsize == 2 else np.clip(values, 0, 65535)]
    key = image.info.get("transparency")
    if key is None:
        return Image.fromarray(grey)
    alpha = np.where(values == key, 0, 255).astype(np.uint8)
    return Image.fromarray(np.dstack([grey, alpha]))


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
