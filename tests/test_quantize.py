"""Weight quantizers and the kernels they feed, against plain numpy matrix products."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto

from molmocap.export.exporter import export
from molmocap.export.onnx_graph import GraphBuilder
from molmocap.export.plan import INT8_BLOCKS, PLANS
from molmocap.export.quantize import QuantLinear, linear_node, quantize_blockwise, quantize_int8_per_channel
from molmocap.runtime.manifest import load_manifest

RNG = np.random.default_rng(0)
WEIGHT = (RNG.standard_normal((48, 96)) * 0.05).astype(np.float32)
BIAS = RNG.standard_normal(48).astype(np.float32)
X = RNG.standard_normal((5, 96)).astype(np.float32)


def dequantize_blockwise(packed: np.ndarray, scales: np.ndarray, bits: int, k: int) -> np.ndarray:
    if bits == 4:
        low, high = packed & 0x0F, packed >> 4
        values = np.stack([low, high], axis=-1).reshape(packed.shape[0], packed.shape[1], -1).astype(np.float32) - 8
    else:
        values = packed.astype(np.float32) - 128
    return (values * scales[..., None]).reshape(packed.shape[0], -1)[:, :k]


def test_int8_per_channel_roundtrip():
    q, scale = quantize_int8_per_channel(WEIGHT)
    assert q.dtype == np.int8 and q.shape == (96, 48)
    np.testing.assert_allclose(q.T * scale[:, None], WEIGHT, atol=scale.max() / 2 + 1e-7)


@pytest.mark.parametrize("bits,block", [(4, 32), (4, 64), (8, 32)])
def test_blockwise_roundtrip(bits, block):
    packed, scales = quantize_blockwise(WEIGHT, bits, block)
    restored = dequantize_blockwise(packed, scales, bits, WEIGHT.shape[1])
    step = np.abs(np.repeat(scales, block, axis=1)[:, : WEIGHT.shape[1]])
    error = np.abs(restored - WEIGHT)
    # ORT maps each block's largest-magnitude value to the most negative code, so the opposite extreme can clip
    # by up to one step; everything else rounds to within half a step.
    assert np.all(error <= step + 1e-6)
    assert np.mean(error <= step / 2 + 1e-6) > 0.97


@pytest.mark.parametrize("how", [QuantLinear("fp32"), QuantLinear("int8"),
                                 QuantLinear("nbits", bits=4, block_size=32, accuracy_level=4),
                                 QuantLinear("nbits", bits=4, block_size=32, accuracy_level=0)])
def test_linear_node_computes_x_wt_plus_b(how, tmp_path):
    g = GraphBuilder(tmp_path / "m.onnx")
    x = g.input("x", TensorProto.FLOAT, ["m", 96])
    g.output(linear_node(g, x, WEIGHT, BIAS, how, "w"), "y", TensorProto.FLOAT, ["m", 48])
    g.save()
    (y,) = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": X})
    expected = X @ WEIGHT.T + BIAS
    tolerance = {"fp32": 1e-5, "int8": 0.03, "nbits": 0.15}[how.kind] * np.abs(expected).max()
    np.testing.assert_allclose(y, expected, atol=tolerance)


def test_manifest_records_the_plan_and_no_fp32_tables_remain(quantized):
    for quant, path in quantized.items():
        manifest = load_manifest(path)
        assert manifest.data["plan"] == PLANS[quant].to_dict(manifest.geometry["text"]["num_layers"])
        assert ("decoder_step" in manifest.data["components"]) == (quant == "mixed")
    int4 = load_manifest(quantized["int4"]).data["plan"]
    assert int4["embed"] == "int8" and int4["lm_head"]["kind"] == "nbits"
    sizes = {q: sum(e["bytes"] for e in load_manifest(p).data["files"]) for q, p in quantized.items()}
    assert sizes["int4"] < sizes["int8"] < sizes["fp32"]
    assert sizes["int4-fp16"] < sizes["fp16"] < 0.6 * sizes["fp32"]


def test_edge_layers_are_kept_at_eight_bits(checkpoints, tmp_path):
    out = export(str(checkpoints["qwen3_gqa"]), tmp_path / "edge", quant="int4-edge1",
                 plan=replace(PLANS["int4"], edge_layers=1, lm_head=INT8_BLOCKS))
    manifest = load_manifest(out)
    layers = manifest.geometry["text"]["num_layers"]
    assert manifest.data["plan"]["decoder_edge_layers"] == {**INT8_BLOCKS.to_dict(), "layers": [0, layers - 1]}
    bits = {}
    for node in onnx.load(str(out / "decoder.onnx"), load_external_data=False).graph.node:
        if node.op_type == "MatMulNBits":
            name = node.input[1]
            part = "lm_head" if name.startswith("lm_head") else int(name.split(".layers.")[1].split(".")[0])
            bits.setdefault(part, set()).add(next(a.i for a in node.attribute if a.name == "bits"))
    assert bits == {"lm_head": {8}, 0: {8}, layers - 1: {8}, **{i: {4} for i in range(1, layers - 1)}}
