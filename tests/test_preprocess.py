"""runtime.preprocess against transformers' Molmo2ImageProcessor: the same image must give the same arrays."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers.models.molmo2 import image_processing_molmo2 as reference
from transformers.models.molmo2.image_processing_molmo2 import Molmo2ImageProcessor

from molmocap.runtime.errors import InputError
from molmocap.runtime.image_io import load_image
from molmocap.runtime.preprocess import (
    ImageInputs,
    PreprocessConfig,
    compute_crop_geometry,
    preprocess,
    resize_bilinear,
    select_tiling,
)

CONFIG = PreprocessConfig()
NAMES = ["portrait", "landscape", "square", "1x1", "3000x20", "20x3000", "4032x3024",
         "rgba", "palette_transparent", "grey", "exif_rotated", "webp"]
ONE_STEP = 1 / 127.5 + 1e-6  # one uint8 step after normalisation with mean = std = 0.5


def noisy_gradient(width: int, height: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    """uint8 [height, width, channels]: diagonal gradients plus noise, so resampling lands on every rounding edge."""
    rng = np.random.default_rng(seed)
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None, None]
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
    phase = np.arange(channels, dtype=np.float32)[None, None, :] / max(channels, 1)
    base = (x * (1 - phase) + y * phase + rng.normal(0, 24, (height, width, channels)).astype(np.float32)) % 256
    return base.astype(np.uint8)


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def make_sources() -> dict[str, bytes]:
    """Encoded test images; each goes through load_image, as users' files do."""
    rgba = noisy_gradient(400, 300, 4, seed=5)
    rgba[..., 3] = np.where(np.arange(400)[None, :] < 150, 255, rgba[..., 3])  # opaque strip, then partial alpha
    palette = Image.frombytes("P", (257, 129), noisy_gradient(257, 129, 1, seed=6).tobytes())
    palette.putpalette(noisy_gradient(256, 1, 3, seed=7).tobytes())
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    return {
        "portrait": encode(Image.fromarray(noisy_gradient(300, 500, seed=1)), "PNG"),
        "landscape": encode(Image.fromarray(noisy_gradient(640, 427, seed=2)), "PNG"),
        "square": encode(Image.fromarray(noisy_gradient(512, 512, seed=3)), "PNG"),
        "1x1": encode(Image.fromarray(noisy_gradient(1, 1, seed=4)), "PNG"),
        "3000x20": encode(Image.fromarray(noisy_gradient(3000, 20, seed=8)), "PNG"),
        "20x3000": encode(Image.fromarray(noisy_gradient(20, 3000, seed=9)), "PNG"),
        "4032x3024": encode(Image.fromarray(noisy_gradient(4032, 3024, seed=10)), "JPEG", quality=90),
        "rgba": encode(Image.fromarray(rgba), "PNG"),
        "palette_transparent": encode(palette, "PNG", transparency=7),
        "grey": encode(Image.fromarray(noisy_gradient(333, 222, 1, seed=11)[..., 0]), "PNG"),
        "exif_rotated": encode(Image.fromarray(noisy_gradient(320, 200, seed=12)), "JPEG", quality=92, exif=exif),
        "webp": encode(Image.fromarray(noisy_gradient(300, 200, seed=13)), "WEBP", quality=90),
    }


@pytest.fixture(scope="module")
def processor() -> Molmo2ImageProcessor:
    return Molmo2ImageProcessor()


@pytest.fixture(scope="module")
def images() -> dict[str, Image.Image]:
    return {name: load_image(data) for name, data in make_sources().items()}


def assert_matches_reference(ours: ImageInputs, ref: dict) -> None:
    assert ours.grid == tuple(int(v) for v in ref["image_grids"][0])
    assert ours.pooled_patches_idx.dtype == np.int64
    np.testing.assert_array_equal(ours.pooled_patches_idx, ref["image_token_pooling"])
    assert ours.patches.dtype == np.float32
    assert ours.patches.shape == ref["pixel_values"].shape
    assert ours.patches.shape[0] == int(ref["image_num_crops"][0])
    diff = np.abs(ours.patches - ref["pixel_values"])
    assert diff.max() <= ONE_STEP
    assert np.count_nonzero(diff) < 1e-3 * diff.size


@pytest.mark.parametrize("max_crops", [1, 4, 8])
@pytest.mark.parametrize("name", NAMES)
def test_matches_reference(processor, images, name, max_crops):
    image = images[name]
    assert image.mode == "RGB"
    ref = processor(images=[image], max_crops=max_crops, return_tensors="np")
    assert_matches_reference(preprocess(image, CONFIG, max_crops), ref)


def test_exif_rotated_image_is_upright(images):
    assert images["exif_rotated"].size == (200, 320)


def test_default_max_crops_is_the_config(processor, images):
    ref = processor(images=[images["landscape"]], return_tensors="np")
    assert_matches_reference(preprocess(images["landscape"], CONFIG), ref)
    small = PreprocessConfig(max_crops=2)
    ref = processor(images=[images["landscape"]], max_crops=2, return_tensors="np")
    assert_matches_reference(preprocess(images["landscape"], small), ref)


@pytest.mark.parametrize(
    "config",
    [
        PreprocessConfig(overlap_margins=(2, 3), pooling_size=(3, 2), max_crops=6),
        PreprocessConfig(crop_size=336, overlap_margins=(0, 1), pooling_size=(3, 3), max_crops=5,
                         image_mean=(0.48, 0.46, 0.41), image_std=(0.27, 0.26, 0.28)),
    ],
    ids=["margins-pooling", "crop-mean-std"],
)
def test_other_configs_match_reference(images, config):
    processor = Molmo2ImageProcessor(
        size={"height": config.crop_size, "width": config.crop_size},
        overlap_margins=list(config.overlap_margins),
        pooling_size=list(config.pooling_size),
        max_crops=config.max_crops,
        image_mean=list(config.image_mean),
        image_std=list(config.image_std),
    )
    for name in ("portrait", "landscape", "1x1"):
        ref = processor(images=[images[name]], return_tensors="np")
        assert_matches_reference(preprocess(images[name], config), ref)


@pytest.mark.parametrize("max_crops", [1, 2, 3, 4, 6, 8, 12])
def test_tiling_and_geometry_match_reference(max_crops):
    sides = [1, 20, 111, 112, 113, 266, 300, 378, 379, 500, 644, 910, 1000, 3024, 4032]
    for height in sides:
        for width in sides:
            args = (height, width, max_crops)
            assert compute_crop_geometry(*args, CONFIG) == reference.compute_crop_geometry(
                *args, overlap_margins=[4, 4], crop_size=378, patch_size=14
            )
            assert select_tiling(*args[:2], 266, max_crops) == reference.select_tiling(*args[:2], 266, max_crops)


@pytest.mark.parametrize(
    "size,out",
    [((300, 400), (378, 378)), ((123, 457), (966, 1302)), ((3024, 40), (644, 40)), ((1, 1), (378, 378)),
     ((20, 3000), (378, 2646)), ((500, 500), (1022, 1022))],
)
def test_resize_is_bit_exact_with_torch(size, out):
    """Exact against torch's multi-threaded CPU kernel (single-threaded torch rounds differently)."""
    pixels = noisy_gradient(size[1], size[0], seed=sum(size))
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))
    try:
        tensor = torch.from_numpy(pixels).permute(2, 0, 1)[None].float()
        expected = F.interpolate(tensor, size=out, mode="bilinear", align_corners=False, antialias=False)
    finally:
        torch.set_num_threads(threads)
    expected = expected.round().clamp(0, 255).to(torch.uint8)[0].permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(resize_bilinear(pixels, *out), expected)


@pytest.mark.parametrize("max_crops", [0, -3])
def test_max_crops_below_one_is_an_input_error(images, max_crops):
    with pytest.raises(InputError, match="max_crops"):
        preprocess(images["square"], CONFIG, max_crops)


def test_non_rgb_image_is_an_input_error():
    with pytest.raises(InputError, match="RGB"):
        preprocess(Image.new("L", (10, 10)), CONFIG)


def test_config_defaults_are_the_processors(processor):
    assert CONFIG.crop_size == processor.size["height"] == processor.size["width"]
    assert CONFIG.patch_size == processor.patch_size
    assert list(CONFIG.overlap_margins) == list(processor.overlap_margins)
    assert list(CONFIG.pooling_size) == list(processor.pooling_size)
    assert CONFIG.max_crops == processor.max_crops
    assert list(CONFIG.image_mean) == list(processor.image_mean)
    assert list(CONFIG.image_std) == list(processor.image_std)
    assert CONFIG.rescale_factor == processor.rescale_factor


def test_config_round_trips_through_json():
    config = PreprocessConfig(max_crops=4, overlap_margins=(2, 3))
    data = json.loads(json.dumps(config.to_dict()))
    assert data["overlap_margins"] == [2, 3]
    assert PreprocessConfig.from_dict(data) == config
    assert PreprocessConfig.from_dict({}) == PreprocessConfig()
    with pytest.raises(ValueError, match="bogus"):
        PreprocessConfig.from_dict({"bogus": 1})
