"""runtime.image_io: decoding, EXIF orientation, RGB conversion as transformers does it, and one-line InputErrors."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image
from transformers.image_transforms import convert_to_rgb

from molmocap.runtime import image_io
from molmocap.runtime.errors import InputError
from molmocap.runtime.image_io import load_image


def noise(height: int, width: int, channels: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=np.uint8)


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def png_without_pixels(width: int, height: int) -> bytes:
    """A PNG declaring `width` x `height` RGB whose image data is empty: only the header is sound."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def rgba_image() -> Image.Image:
    pixels = noise(30, 40, 4, seed=1)
    pixels[:5, :, 3] = 255
    pixels[5:10, :, 3] = 0
    return Image.fromarray(pixels)


def palette_image(transparency: int | None) -> Image.Image:
    image = Image.frombytes("P", (23, 17), noise(17, 23, 1, seed=2).tobytes())
    image.putpalette(noise(1, 256, 3, seed=3).tobytes())
    if transparency is not None:
        image.info["transparency"] = transparency
    return image


def exif_jpeg(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(Image.fromarray(noise(20, 32, 3, seed=4)), "JPEG", quality=95, exif=exif)


def assert_one_line_input_error(source, *fragments: str) -> None:
    with pytest.raises(InputError) as caught:
        load_image(source)
    message = str(caught.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message


# Modes where the reference conversion is sound: load_image must give exactly transformers' convert_to_rgb.
REFERENCE_MODES = {
    "RGB": lambda: Image.fromarray(noise(17, 23, 3)),
    "RGBA": rgba_image,
    "LA": lambda: Image.fromarray(noise(17, 23, 2, seed=5)),
    "L": lambda: Image.fromarray(noise(17, 23, 1, seed=6)[..., 0]),
    "P": lambda: palette_image(None),
    "P+transparency": lambda: palette_image(7),
    "CMYK": lambda: Image.frombytes("CMYK", (23, 17), noise(17, 23, 4, seed=7).tobytes()),
    "1": lambda: Image.fromarray(noise(17, 23, 1, seed=8)[..., 0] > 127),
}


@pytest.mark.parametrize("mode", list(REFERENCE_MODES))
def test_conversion_matches_transformers(mode):
    image = REFERENCE_MODES[mode]()
    rgb = load_image(image)
    assert rgb.mode == "RGB" and rgb.size == image.size
    np.testing.assert_array_equal(np.asarray(rgb), convert_to_rgb(image, return_numpy=True))


def test_rgba_is_composited_onto_white():
    rgb = np.asarray(load_image(rgba_image()))
    np.testing.assert_array_equal(rgb[5:10], 255)
    np.testing.assert_array_equal(rgb[:5], rgba_image().convert("RGB").crop((0, 0, 40, 5)))


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_encoded_transparency_matches_transformers(fmt):
    data = encode(rgba_image(), fmt, lossless=True) if fmt == "WEBP" else encode(rgba_image(), fmt)
    reference = convert_to_rgb(Image.open(io.BytesIO(data)), return_numpy=True)
    np.testing.assert_array_equal(np.asarray(load_image(data)), reference)


def test_png_palette_transparency_matches_transformers():
    data = encode(palette_image(7), "PNG", transparency=7)
    opened = Image.open(io.BytesIO(data))
    assert opened.mode == "P" and opened.info.get("transparency") is not None
    np.testing.assert_array_equal(np.asarray(load_image(data)), convert_to_rgb(opened, return_numpy=True))


def test_sixteen_bit_grey_is_scaled_not_clipped():
    values = np.array([[0, 128, 257, 32896, 65535]], dtype=np.uint16)
    image = Image.open(io.BytesIO(encode(Image.fromarray(values), "PNG")))
    assert image.mode == "I;16"
    rgb = load_image(image)
    assert rgb.mode == "RGB" and rgb.size == (5, 1)
    np.testing.assert_array_equal(np.asarray(rgb)[0, :, 0], [0, 0, 1, 128, 255])
    np.testing.assert_array_equal(np.asarray(rgb)[..., 0], np.asarray(rgb)[..., 2])


def test_thirty_two_bit_int_is_read_as_sixteen_bit():
    image = Image.fromarray(np.array([[-5, 257, 32896, 70000]], dtype=np.int32), "I")
    np.testing.assert_array_equal(np.asarray(load_image(image))[0, :, 1], [0, 1, 128, 255])


def test_float_grey_is_read_as_unit_range():
    image = Image.fromarray(np.array([[-1.0, 0.0, 0.5, 1.0, 7.0, np.nan]], dtype=np.float32), "F")
    np.testing.assert_array_equal(np.asarray(load_image(image))[0, :, 0], [0, 0, 128, 255, 255, 0])


def test_sixteen_bit_colour_key_becomes_white():
    image = Image.fromarray(np.array([[1000, 2000]], dtype=np.uint16))
    image.info["transparency"] = 2000
    np.testing.assert_array_equal(np.asarray(load_image(image))[0], [[4, 4, 4], [255, 255, 255]])


@pytest.mark.parametrize("orientation,transpose", [(6, Image.Transpose.ROTATE_270), (8, Image.Transpose.ROTATE_90)])
def test_exif_orientation_is_applied(orientation, transpose):
    data = exif_jpeg(orientation)
    stored = Image.open(io.BytesIO(data))
    assert stored.size == (32, 20)
    for source in (data, Image.open(io.BytesIO(data))):
        upright = load_image(source)
        assert upright.size == (20, 32)
        np.testing.assert_array_equal(np.asarray(upright), np.asarray(stored.transpose(transpose)))


def test_path_bytes_and_image_give_the_same_result(tmp_path):
    data = encode(Image.fromarray(noise(21, 34, 3, seed=9)), "PNG")
    path = tmp_path / "photo.png"
    path.write_bytes(data)
    expected = np.asarray(load_image(data))
    for source in (path, str(path), bytearray(data), Image.open(io.BytesIO(data))):
        np.testing.assert_array_equal(np.asarray(load_image(source)), expected)


def test_missing_file(tmp_path):
    assert_one_line_input_error(tmp_path / "absent.jpg", "not found", "absent.jpg")


def test_directory(tmp_path):
    assert_one_line_input_error(tmp_path, "directory", str(tmp_path))


def test_text_file_named_png(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("these are not pixels\nsecond line\n")
    assert_one_line_input_error(path, "unrecognised", "notes.png")


def test_empty_file_and_empty_bytes(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    assert_one_line_input_error(path, "empty", "empty.jpg")
    assert_one_line_input_error(b"", "empty")


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_data(tmp_path, fmt):
    data = encode(Image.fromarray(noise(64, 64, 3, seed=10)), fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(data[: len(data) // 2])
    assert_one_line_input_error(path, "truncated", path.name)
    assert_one_line_input_error(data[: len(data) // 2], "truncated", "<bytes>")


def test_zero_size_image():
    assert_one_line_input_error(Image.new("RGB", (0, 5)), "zero-size")


def test_decompression_bomb():
    assert_one_line_input_error(png_without_pixels(20_000, 20_000), "too large")


def test_pixel_limit_is_checked_before_decoding(monkeypatch):
    monkeypatch.setattr(image_io, "MAX_PIXELS", 100)
    assert_one_line_input_error(png_without_pixels(11, 10), "too large", "11x10")


def test_unconvertible_mode():
    assert_one_line_input_error(Image.new("La", (4, 4)), "unsupported image mode La")


def test_result_is_independent_of_the_file(tmp_path):
    path = tmp_path / "gone.png"
    path.write_bytes(encode(Image.fromarray(noise(8, 8, 3, seed=11)), "PNG"))
    image = load_image(path)
    path.unlink()
    assert np.asarray(image).shape == (8, 8, 3)
