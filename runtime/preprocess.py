"""Molmo2 image preprocessing in numpy: the same arrays as transformers' `Molmo2ImageProcessor` for one image.

The processor makes one global view (the whole image resized to `crop_size` square) and a set of overlapping
crops of the image resized onto a canvas chosen by `select_tiling`; each view is cut into patches, and
`pooled_patches_idx` says which patches each image token pools. Everything here reproduces the reference
bit for bit, including its float32 arithmetic, so the exported model sees exactly what it was checked against.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
from PIL import Image

from .errors import InputError

_TUPLE_FIELDS = ("overlap_margins", "pooling_size", "image_mean", "image_std")

# Largest max_crops accepted anywhere (Python API, CLI, server). Molmo2 declares no maximum (its processor defaults
# to 8), yet `select_tiling` scans max_crops² tilings and the vision encoder runs once per crop, so an unbounded
# value lets one request stall the model. 64 is eight times Molmo2's default: an 8x8 tiling, about 6,700 image
# tokens, still well inside Molmo2's 36,864 positions; a model with fewer positions refuses a prompt that does not
# fit before its vision encoder runs (see `Captioner.generate`).
MAX_CROPS = 64


@dataclass(frozen=True)
class PreprocessConfig:
    """Preprocessing settings; the defaults are Molmo2's. `pooling_size` is (h, w); margins are in patches."""

    crop_size: int = 378
    patch_size: int = 14
    overlap_margins: tuple[int, int] = (4, 4)
    pooling_size: tuple[int, int] = (2, 2)
    max_crops: int = 8
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    rescale_factor: float = 1 / 255

    def __post_init__(self) -> None:
        if self.crop_size % self.patch_size:
            raise ValueError(f"crop_size {self.crop_size} is not a multiple of patch_size {self.patch_size}")
        if self.crop_size // self.patch_size <= sum(self.overlap_margins):
            raise ValueError(f"overlap_margins {self.overlap_margins} leave no window inside a crop")

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form: tuples become lists."""
        return {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PreprocessConfig:
        """Inverse of `to_dict`; missing keys take the defaults, unknown keys are an error."""
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown preprocess config keys: {', '.join(sorted(unknown))}")
        return cls(**{key: tuple(value) if key in _TUPLE_FIELDS else value for key, value in data.items()})


@dataclass
class ImageInputs:
    """One image's model inputs, equal to the processor's `pixel_values`, `image_token_pooling`, `image_grids[0]`."""

    patches: np.ndarray  # float32 [num_crops, patches_per_crop, patch_size * patch_size * 3], global view first
    pooled_patches_idx: np.ndarray  # int64 [num_tokens, pool_h * pool_w], -1 where a window is padded
    grid: tuple[int, int, int, int]  # (low_res_h, low_res_w, high_res_h, high_res_w) in pooled tokens


def select_tiling(height: int, width: int, patch_size: int, max_num_crops: int) -> tuple[int, int]:
    """Tiling (rows, cols) of at most `max_num_crops` windows for an image; float32 maths and ties as the reference.

    Picks the tiling that needs the least upscaling; if every tiling would downscale, the one that downscales least.
    """
    tilings = [(h, w) for h, w in itertools.product(range(1, max_num_crops + 1), repeat=2) if h * w <= max_num_crops]
    tilings.sort(key=lambda t: (t[0] * t[1], t[0]))
    candidates = np.array(tilings, dtype=np.int32) * np.int32(patch_size)
    with np.errstate(divide="ignore"):
        scales = candidates.astype(np.float32) / np.array([height, width], dtype=np.float32)
    scale = scales.min(axis=-1)
    if np.all(scale < 1):
        return tilings[int(np.argmax(scale))]
    return tilings[int(np.argmin(np.where(scale < 1, np.float32(10e9), scale)))]


def compute_crop_geometry(
    height: int, width: int, max_crops: int, config: PreprocessConfig
) -> tuple[int, int, int, int]:
    """(tiling_h, tiling_w, canvas_height, canvas_width) for an image of `height` x `width` pixels."""
    margin_size = sum(config.overlap_margins) * config.patch_size
    window_size = config.crop_size - margin_size
    tiling_h, tiling_w = select_tiling(height - margin_size, width - margin_size, window_size, max_crops)
    return tiling_h, tiling_w, tiling_h * window_size + margin_size, tiling_w * window_size + margin_size


def resolve_max_crops(max_crops: int | None, config: PreprocessConfig) -> int:
    """`max_crops`, or the config's when None, checked against 1..`MAX_CROPS` (an `InputError` outside)."""
    max_crops = config.max_crops if max_crops is None else max_crops
    if not 1 <= max_crops <= MAX_CROPS:
        raise InputError(f"max_crops must be from 1 to {MAX_CROPS}, got {max_crops}")
    return max_crops


def token_grid(height: int, width: int, config: PreprocessConfig, max_crops: int | None = None,
               ) -> tuple[int, int, int, int]:
    """`ImageInputs.grid` for an image of `height` x `width` pixels, from the tiling alone: no pixel is touched.

    The prompt's length follows from it, so a prompt too long for the model is refused before the image is cut
    into patches and before the vision encoder runs.
    """
    tiling_h, tiling_w, _, _ = compute_crop_geometry(height, width, resolve_max_crops(max_crops, config), config)
    side = config.crop_size // config.patch_size
    margins = sum(config.overlap_margins)
    rows, cols = tiling_h * (side - margins) + margins, tiling_w * (side - margins) + margins
    pool_h, pool_w = config.pooling_size
    return -(-side // pool_h), -(-side // pool_w), -(-rows // pool_h), -(-cols // pool_w)


def _axis_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and weights along one axis, as torch's CPU upsample_bilinear2d (align_corners=False)."""
    if n_in == n_out:
        index = np.arange(n_out)
        return index, index, np.ones(n_out, np.float32), np.zeros(n_out, np.float32)
    ratio = np.float32(n_in) / np.float32(n_out)
    # torch evaluates ratio * (dst + 0.5) - 0.5 as one fused multiply-add: exact in float64, then rounded once.
    src = (np.float64(ratio) * (np.arange(n_out, dtype=np.float32) + np.float32(0.5)) - 0.5).astype(np.float32)
    src = np.maximum(src, np.float32(0))
    index0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    weight1 = np.clip(src - index0.astype(np.float32), np.float32(0), np.float32(1))
    index1 = np.where(index0 < n_in - 1, index0 + 1, index0)
    return index0, index1, np.float32(1) - weight1, weight1


def _lerp(x0: np.ndarray, x1: np.ndarray, w0: np.ndarray, w1: np.ndarray) -> np.ndarray:
    """float32 fma(x0, w0, x1 * w1) as torch computes it: x1 * w1 rounded, x0 * w0 exact (float64), one rounding."""
    return (x0.astype(np.float64) * w0 + (x1.astype(np.float32) * w1)).astype(np.float32)


def resize_bilinear(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize uint8 [H, W, C] like the reference: float bilinear without antialias, then round half-even to uint8.

    Bit-exact with torch's multi-threaded CPU kernel (columns first, then rows); only the input rows that are
    sampled are interpolated, so downscaling a large photo stays cheap.
    """
    rows0, rows1, row_w0, row_w1 = _axis_taps(image.shape[0], height)
    cols0, cols1, col_w0, col_w1 = _axis_taps(image.shape[1], width)
    rows, inverse = np.unique(np.concatenate([rows0, rows1]), return_inverse=True)
    rows_idx = rows[:, None]
    horizontal = _lerp(image[rows_idx, cols0], image[rows_idx, cols1], col_w0[:, None], col_w1[:, None])
    resized = _lerp(
        horizontal[inverse[:height]], horizontal[inverse[height:]], row_w0[:, None, None], row_w1[:, None, None]
    )
    return np.clip(np.rint(resized), 0, 255).astype(np.uint8)


def _normalize(pixels: np.ndarray, config: PreprocessConfig) -> np.ndarray:
    """uint8 -> float32 with rescale and normalize fused as the reference does: (x - mean/r) / (std/r)."""
    inverse_factor = np.float32(1.0 / config.rescale_factor)
    mean = np.array(config.image_mean, dtype=np.float32) * inverse_factor
    std = np.array(config.image_std, dtype=np.float32) * inverse_factor
    return (pixels.astype(np.float32) - mean) / std


def _to_patches(crops: np.ndarray, patch_size: int) -> np.ndarray:
    """[N, S, S, C] -> [N, (S/p)^2, p*p*C], patches in row-major order, each flattened (row, col, channel)."""
    count, size, _, channels = crops.shape
    side = size // patch_size
    grid = crops.reshape(count, side, patch_size, side, patch_size, channels).transpose(0, 1, 3, 2, 4, 5)
    return grid.reshape(count, side * side, patch_size * patch_size * channels)


def _pool_windows(index_grid: np.ndarray, pool_h: int, pool_w: int) -> np.ndarray:
    """Group a patch-index grid into pool_h x pool_w windows, padding with -1 (extra padding at bottom/right)."""
    pad_h = -index_grid.shape[0] % pool_h
    pad_w = -index_grid.shape[1] % pool_w
    padded = np.pad(index_grid, ((pad_h // 2, (pad_h + 1) // 2), (pad_w // 2, (pad_w + 1) // 2)), constant_values=-1)
    rows, cols = padded.shape[0] // pool_h, padded.shape[1] // pool_w
    return padded.reshape(rows, pool_h, cols, pool_w).transpose(0, 2, 1, 3).reshape(rows * cols, pool_h * pool_w)


def _crop_index_grid(tiling_h: int, tiling_w: int, config: PreprocessConfig) -> np.ndarray:
    """Canvas-shaped grid of crop-patch indices: each canvas patch from one crop, overlapping margins dropped."""
    left, right = config.overlap_margins
    side = config.crop_size // config.patch_size
    grid = np.arange(tiling_h * tiling_w * side * side, dtype=np.int64).reshape(tiling_h, tiling_w, side, side)
    if left:
        grid[1:, :, :left, :] = -1
        grid[:, 1:, :, :left] = -1
    if right:
        grid[:-1, :, -right:, :] = -1
        grid[:, :-1, :, -right:] = -1
    kept = grid.transpose(0, 2, 1, 3).reshape(-1)
    kept = kept[kept >= 0]
    window = side - left - right
    return kept.reshape(tiling_h * window + left + right, tiling_w * window + left + right)


def preprocess(image: Image.Image, config: PreprocessConfig, max_crops: int | None = None) -> ImageInputs:
    """Patches, pooling indices and token grid for one RGB image (see `runtime.image_io.load_image`)."""
    max_crops = resolve_max_crops(max_crops, config)
    if image.mode != "RGB":
        raise InputError(f"preprocess expects an RGB image, got mode {image.mode}")
    if image.width == 0 or image.height == 0:
        raise InputError(f"zero-size image ({image.width}x{image.height})")
    pixels = np.asarray(image)
    crop, window = config.crop_size, config.crop_size - sum(config.overlap_margins) * config.patch_size
    pool_h, pool_w = config.pooling_size

    tiling_h, tiling_w, canvas_h, canvas_w = compute_crop_geometry(image.height, image.width, max_crops, config)
    canvas = resize_bilinear(pixels, canvas_h, canvas_w)
    views = [resize_bilinear(pixels, crop, crop)]
    views += [
        canvas[row * window : row * window + crop, col * window : col * window + crop]
        for row in range(tiling_h)
        for col in range(tiling_w)
    ]
    patches = _to_patches(_normalize(np.stack(views), config), config.patch_size)

    side = crop // config.patch_size
    global_idx = _pool_windows(np.arange(side * side, dtype=np.int64).reshape(side, side), pool_h, pool_w)
    crop_grid = _crop_index_grid(tiling_h, tiling_w, config)
    crop_idx = _pool_windows(crop_grid, pool_h, pool_w)
    crop_idx = np.where(crop_idx >= 0, crop_idx + side * side, -1)
    grid = token_grid(image.height, image.width, config, max_crops)
    return ImageInputs(patches=patches, pooled_patches_idx=np.concatenate([global_idx, crop_idx]), grid=grid)
