"""Named float32 weights of a Molmo2 checkpoint, under transformers' parameter names."""

from __future__ import annotations

import numpy as np


class Weights:
    """Read-only access to a model's tensors as numpy float32, by transformers name.

    The exporter asks for one tensor at a time, so a streaming source can replace the in-memory one without
    touching the graph code.
    """

    def __init__(self, state_dict: dict) -> None:
        self._tensors = state_dict

    def has(self, name: str) -> bool:
        return name in self._tensors

    def get(self, name: str) -> np.ndarray:
        tensor = self._tensors[name]
        return tensor.detach().float().cpu().numpy()
