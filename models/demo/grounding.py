"""Dense targets for the image tokens and the ViT patches: what each of them shows.

Trained from scratch on a few thousand scenes, the answer loss alone leaves the model a blind language model (run 1:
40% question accuracy, chance level on yes/no). A linear probe on the adapter's output, trained jointly to name the
colored shape (or the word) under every image token, gives the vision tower and adapter a direct signal; a second
probe on the vision tower's patches gives the ViT its own (run 6, which added it together with `train.init_adapter`
and ran 3000 steps instead of 4000: 27% exact captions against 18%; runs 7 and 8, the same at 4000 and 5000 steps:
40% and 48%; run 10, the same scenes two a step: 50%). The probes are discarded, the saved model is a plain Molmo2.

The targets come from the image processor itself: each object's mask is drawn as an image channel and run through
the same `Molmo2ImageProcessor` as the scene, so the global view and every high-resolution crop, with their resizing
and overlap margins, get each token's coverage by each object exactly where the model's tokens see it. (Run 2
probed the 14x14 global-view tokens only: there a 3:1 scene is squeezed to a third of its width and shapes blur;
run 2 reached 38% on "what shape is the red object?".)
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from .scenes import COLORS, SHAPES, WORDS, Scene, SceneObject, object_map

N_CLASSES = 1 + len(SHAPES) * len(COLORS) + len(WORDS)  # background, each colored shape, each word
BACKGROUND_WEIGHT = 0.2
MIN_COVER = 0.2  # share of a token's pixels an object must cover to name the token


def object_class(obj: SceneObject) -> int:
    """The class naming `obj`'s colored shape (1 .. len(SHAPES) * len(COLORS))."""
    return 1 + SHAPES.index(obj.shape) * len(COLORS) + list(COLORS).index(obj.color)


def _masks(scene: Scene) -> tuple[list[Image.Image], list[int]]:
    """One 0/255 mask per object (and for the printed word's box) with its class."""
    labels = np.asarray(object_map(scene))
    masks, classes = [], []
    for i, obj in enumerate(scene.objects):
        masks.append(labels == i + 1)
        classes.append(object_class(obj))
    if scene.word:
        masks.append(labels == 255)
        classes.append(1 + len(SHAPES) * len(COLORS) + WORDS.index(scene.word))
    return [Image.fromarray(m.astype(np.uint8) * 255) for m in masks], classes


def _coverage(image_processor, masks: list[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
    """([patches, masks], [tokens, masks]): the share of each ViT patch's and each kept image token's pixels inside
    each mask (patches of every crop in order; tokens global view first, then the crops; tokens whose pooling window
    is all padding are dropped, as the model does)."""
    mean = torch.tensor(image_processor.image_mean)
    std = torch.tensor(image_processor.image_std)
    blank = Image.new("L", masks[0].size, 0)
    patch_columns, token_columns = [], []
    for start in range(0, len(masks), 3):  # three masks per RGB image
        channels = (masks[start:start + 3] + [blank, blank])[:3]
        out = image_processor(images=[Image.merge("RGB", channels)], return_tensors="pt")
        pixels = out["pixel_values"].reshape(-1, image_processor.patch_size ** 2, 3) * std + mean
        per_patch = pixels.mean(dim=1)  # [crops * patches, 3]
        idx = out["image_token_pooling"].reshape(-1, out["image_token_pooling"].shape[-1])
        valid = idx >= 0
        per_token = (per_patch[idx.clamp(min=0)] * valid[..., None]).sum(1) / valid.sum(1).clamp(min=1)[:, None]
        patch_columns.append(per_patch)
        token_columns.append(per_token[valid.any(1)])
    return (torch.cat(patch_columns, dim=1)[:, : len(masks)], torch.cat(token_columns, dim=1)[:, : len(masks)])


def _classes(coverage: torch.Tensor, classes: list[int]) -> torch.Tensor:
    """The most covering mask's class where it covers at least MIN_COVER, else background."""
    named = torch.tensor(classes)[coverage.argmax(dim=1)]
    return torch.where(coverage.max(dim=1).values >= MIN_COVER, named, torch.zeros_like(named))


def patch_and_token_classes(scene: Scene, image_processor) -> tuple[torch.Tensor, torch.Tensor]:
    """The class of every ViT patch (all crops, in order) and of every kept image token: the colored shape (or the
    word) covering at least MIN_COVER of its pixels (the most covering one), else background."""
    masks, classes = _masks(scene)
    if not masks:
        masks, classes = [Image.new("L", scene.image.size, 0)], [0]
    patches, tokens = _coverage(image_processor, masks)
    return _classes(patches, classes), _classes(tokens, classes)


def token_classes(scene: Scene, image_processor) -> torch.Tensor:
    """The class of every kept image token (see `patch_and_token_classes`)."""
    return patch_and_token_classes(scene, image_processor)[1]


def class_weights() -> torch.Tensor:
    weights = torch.ones(N_CLASSES)
    weights[0] = BACKGROUND_WEIGHT
    return weights
