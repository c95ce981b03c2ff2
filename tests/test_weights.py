"""Streaming weight reads give transformers' tensors from either on-disk naming."""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.torch import save_file

import tiny_models
from molmocap.export.weights import Weights


@pytest.mark.parametrize("variant", ["qwen3_gqa", "bias_big_extra_vocab"])
@pytest.mark.parametrize("naming", ["original", "transformers"])
def test_every_tensor_matches_the_model(variant, naming, tmp_path):
    model, _ = tiny_models.build_model(tiny_models.VARIANTS[variant], seed=3)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if naming == "original":
        model.save_pretrained(tmp_path)
    else:
        save_file(state, tmp_path / "model.safetensors")
    weights = Weights(tmp_path, model.config.text_config)
    for name, tensor in state.items():
        assert weights.has(name), name
        np.testing.assert_array_equal(weights.get(name), tensor.numpy(), err_msg=name)
    assert not weights.has("model.language_model.layers.0.self_attn.o_proj.bias")
