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

_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})


def load_image(source: str | os.PathLike | bytes | Image.Image) -> Image.Image:
    """Decode `source` fully, apply its EXIF orientation and convert it to RGB.

    Transparency (an alpha band, or a palette/colour-key `transparency`) is composited onto white and any
    other mode goes through `convert("RGB")`, exactly as transformers' `convert_to_rgb`. Exceptions, where
    Pillow's conversion clips: 16-bit greyscale (`I;16*`, and `I`, which Pillow uses for 16-bit PGM) is
    scaled to 8 bits (v / 257, rounded; values outside 0..65535 clipped), and float greyscale (`F`) is read
    as 0..1 intensity (clipped, times 255, rounded). Any failure is an `InputError` with a one-line message.
    """
    if isinstance(source, Image.Image):
        return _upright_rgb(source, "<image>")
    if isinstance(source, (bytes, bytearray, memoryview)):
        if not len(source):
            raise InputError("empty image data: <bytes>")
        return _upright_rgb(io.BytesIO(bytes(source)), "<bytes>")
    path = Path(os.fspath(source))
    if path.is_dir():
        raise InputError(f"not an image file but a directory: {path}")
    if not path.is_file():
        raise InputError(f"image file not found: {path}")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read image file {path}: {exc.strerror or _one_line(exc)}") from None
    if not data:
        raise InputError(f"empty image file: {path}")
    return _upright_rgb(io.BytesIO(data), str(path))


def _upright_rgb(source: Image.Image | io.BytesIO, name: str) -> Image.Image:
    """Open (unless given an image), check the size, decode, orient and convert; errors become `InputError`."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            if isinstance(source, Image.Image):
                return _decoded_rgb(source, name)
            with Image.open(source) as image:
                return _decoded_rgb(image, name)
    except InputError:
        raise
    except UnidentifiedImageError:
        raise InputError(f"unsupported or unrecognised image format: {name}") from None
    except Image.DecompressionBombError:
        raise InputError(f"image too large (more than {MAX_PIXELS} pixels): {name}") from None
    except Exception as exc:  # noqa: BLE001 - Pillow signals bad data with many exception types
        raise InputError(f"corrupt or truncated image: {name} ({_one_line(exc)})") from None


def _decoded_rgb(image: Image.Image, name: str) -> Image.Image:
    """Size checks, full decode, EXIF orientation, RGB."""
    if image.width * image.height > MAX_PIXELS:
        raise InputError(f"image too large ({image.width}x{image.height}, more than {MAX_PIXELS} pixels): {name}")
    if image.width == 0 or image.height == 0:
        raise InputError(f"zero-size image ({image.width}x{image.height}): {name}")
    image.load()
    try:
        image = ImageOps.exif_transpose(image)
    except Exception:  # noqa: BLE001 - a malformed EXIF block only costs the orientation
        pass
    try:
        return _to_rgb(image)
    except ValueError as exc:
        raise InputError(f"unsupported image mode {image.mode}: {name} ({_one_line(exc)})") from None


def _to_rgb(image: Image.Image) -> Image.Image:
    """transformers' `convert_to_rgb` for PIL images, after rescaling high-bit-depth greyscale to 8 bits."""
    if image.mode in _SIXTEEN_BIT_MODES or image.mode == "F":
        image = _to_8bit(image)
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def _to_8bit(image: Image.Image) -> Image.Image:
    """16-bit or float greyscale -> L (LA where a colour-key `transparency` marks see-through pixels)."""
    values = np.asarray(image)
    if image.mode == "F":
        scaled = np.clip(np.nan_to_num(values), 0, 1) * 255
    else:
        scaled = np.clip(values, 0, 65535) / 257
    grey = np.rint(scaled).astype(np.uint8)
    key = image.info.get("transparency")
    if key is None:
        return Image.fromarray(grey)
    alpha = np.where(values == key, 0, 255).astype(np.uint8)
    return Image.fromarray(np.dstack([grey, alpha]))


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
