"""Dense targets for the image tokens: what each low-resolution token of a scene shows.

Trained from scratch on a few thousand scenes, the answer loss alone leaves the model a blind language model (run 1:
40% question accuracy, chance level on yes/no). A linear probe on the adapter's output, trained jointly to name the
colored shape (or the word) under each of the 14x14 tokens of the global view, gives the vision tower and adapter a
direct signal; the probe is discarded, the saved model is a plain Molmo2.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from .scenes import COLORS, SHAPES, WORDS, Scene, object_map

N_CLASSES = 1 + len(SHAPES) * len(COLORS) + len(WORDS)  # background, each colored shape, each word
BACKGROUND_WEIGHT = 0.2
MIN_COVER = 0.2


def token_regions(crop_size: int, patch_size: int, pool: int) -> list[tuple[int, int]]:
    """Pixel span (in the crop) of each pooled token row/column of the global view: `pool` patches, the last
    window cut short where `Molmo2ImageProcessor` pads it."""
    step = patch_size * pool
    return [(start, min(start + step, crop_size // patch_size * patch_size)) for start in range(0, crop_size, step)]


def token_classes(scene: Scene, crop_size: int = 378, patch_size: int = 14, pool: int = 2) -> torch.Tensor:
    """The class of every global-view token in raster order: the colored shape (or the word) covering at least
    MIN_COVER of the token's pixels (the most covering one), else background."""
    classes = np.zeros(256, dtype=np.int64)
    for i, obj in enumerate(scene.objects):
        classes[i + 1] = 1 + SHAPES.index(obj.shape) * len(COLORS) + list(COLORS).index(obj.color)
    if scene.word:
        classes[255] = 1 + len(SHAPES) * len(COLORS) + WORDS.index(scene.word)
    labels = np.asarray(object_map(scene).resize((crop_size, crop_size), Image.Resampling.NEAREST))
    regions = token_regions(crop_size, patch_size, pool)
    out = []
    for top, bottom in regions:
        for left, right in regions:
            counts = np.bincount(labels[top:bottom, left:right].ravel(), minlength=256)
            counts[0] = 0
            best = int(counts.argmax())
            out.append(classes[best] if counts[best] >= MIN_COVER * (bottom - top) * (right - left) else 0)
    return torch.tensor(out)


def class_weights() -> torch.Tensor:
    weights = torch.ones(N_CLASSES)
    weights[0] = BACKGROUND_WEIGHT
    return weights
