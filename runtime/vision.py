"""Crops -> ViT features -> pooled image embeddings, one vector per `<im_patch>` token."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from .preprocess import ImageInputs


def encode_image(vision: ort.InferenceSession, adapter: ort.InferenceSession, inputs: ImageInputs,
                 batch_crops: bool = False) -> np.ndarray:
    """Image embeddings [image tokens, text hidden] in prompt order (global view first, then the tiling).

    On a CPU the ViT sees one crop at a time: crops do not interact, each is already a 729-row product for the
    GEMMs, and the activations of one crop instead of up to nine keep peak memory down. A GPU (`batch_crops`) takes
    all crops in one run, which its many cores need to be busy.
    """
    if batch_crops:
        (features,) = vision.run(None, {"pixel_values": inputs.patches})
    else:
        features = np.concatenate([vision.run(None, {"pixel_values": crop[None]})[0] for crop in inputs.patches])
    (embeddings,) = adapter.run(None, {"image_features": features, "pooled_patches_idx": inputs.pooled_patches_idx})
    return embeddings
