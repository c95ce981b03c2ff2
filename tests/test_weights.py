"""Streaming weight reads (numpy only) give transformers' tensors from either on-disk naming and torch's float32
conversion of every supported dtype; a corrupt or unsupported file is one ExportError line."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import tiny_models
from molmocap.export.weights import Weights
from molmocap.runtime.errors import ExportError


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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_dtypes_widen_as_torch_does(dtype, tmp_path):
    """The numpy reader gives torch's own float32 conversion of every supported on-disk dtype, sharded or not."""
    generator = torch.Generator().manual_seed(0)
    tensors = {"a": (torch.randn(37, 5, generator=generator) * 1e3).to(dtype),
               "b": torch.tensor([0.0, -0.0, float("inf"), float("-inf"), 1e-40, 65504.0]).to(dtype),
               "empty": torch.zeros(0, 3, dtype=dtype)}
    save_file({"a": tensors["a"]}, tmp_path / "model-1.safetensors")
    save_file({k: tensors[k] for k in ("b", "empty")}, tmp_path / "model-2.safetensors")
    weight_map = {"a": "model-1.safetensors", "b": "model-2.safetensors", "empty": "model-2.safetensors"}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    weights = Weights(tmp_path, None)
    for name, tensor in tensors.items():
        got = weights.get(name)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, tensor.float().numpy(), err_msg=name)


def _write(path, header: bytes, data: bytes = b"") -> None:
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)


@pytest.mark.parametrize("case", ["truncated", "bad_length", "bad_json", "past_end", "wrong_size", "unknown_dtype"])
def test_corrupt_or_unsupported_files_are_one_export_error(case, tmp_path):
    file = tmp_path / "model.safetensors"
    entry = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
    if case == "truncated":
        file.write_bytes(b"\x10\x00")
    elif case == "bad_length":
        file.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    elif case == "bad_json":
        _write(file, b"{not json", b"\x00" * 8)
    elif case == "past_end":
        _write(file, json.dumps({"w": entry}).encode(), b"\x00" * 4)
    elif case == "wrong_size":
        _write(file, json.dumps({"w": {**entry, "shape": [3]}}).encode(), b"\x00" * 8)
    else:
        _write(file, json.dumps({"w": {**entry, "dtype": "F8_E4M3"}}).encode(), b"\x00" * 8)
    with pytest.raises(ExportError) as info:
        Weights(tmp_path, None).get("w")
    assert len(str(info.value).splitlines()) == 1
    if case == "unknown_dtype":
        assert "F8_E4M3" in str(info.value)
