"""Weight quantization of linear layers: which kernel each projection uses and how its weight is stored.

Three kernels, chosen per layer by the export plan (`export/plan.py`):
- float `MatMul` (fp32, or fp16 in a float16 graph);
- int8 per-output-channel symmetric weights with `DynamicQuantizeMatMul` (activations quantized per call): fast GEMM
  (VNNI/AMX) for prefill and the vision encoder, whose cost is arithmetic;
- `MatMulNBits` block-wise 4- or 8-bit weights: fewest bytes per decode step, whose cost is reading weights (its
  scales and activations in the graph's float type, float32 or float16).
Block quantization uses ONNX Runtime's own C++ quantizers, the ones its `MatMulNBitsQuantizer` calls.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

from .onnx_graph import GraphBuilder

MS = "com.microsoft"


@dataclass(frozen=True)
class QuantLinear:
    """How one linear layer is stored and computed."""

    kind: str  # "fp32", "fp16", "int8" or "nbits"
    bits: int = 4
    block_size: int = 32
    accuracy_level: int = 4

    @property
    def label(self) -> str:
        if self.kind != "nbits":
            return self.kind
        return f"int{self.bits}-block{self.block_size}-acc{self.accuracy_level}"

    def to_dict(self) -> dict:
        if self.kind != "nbits":
            return {"kind": self.kind}
        return {"kind": self.kind, "bits": self.bits, "block_size": self.block_size,
                "accuracy_level": self.accuracy_level}


FP32 = QuantLinear("fp32")
FP16 = QuantLinear("fp16")
FLOAT_KINDS = ("fp32", "fp16")  # a plain MatMul over the weight in the graph's float type


CHUNK_ROWS = 8192  # rows quantized at a time, so temporaries stay small for the 152k-row tables


def quantize_int8_rows(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[rows, cols] float -> int8 [rows, cols] and per-row scales [rows] (symmetric, max-abs over the row)."""
    q = np.empty(weight.shape, dtype=np.int8)
    scale = np.empty(weight.shape[0], dtype=np.float32)
    for start in range(0, weight.shape[0], CHUNK_ROWS):
        rows = weight[start:start + CHUNK_ROWS]
        s = np.abs(rows).max(axis=1) / np.float32(127.0)
        s[s == 0] = 1.0
        scale[start:start + CHUNK_ROWS] = s
        q[start:start + CHUNK_ROWS] = np.clip(np.rint(rows / s[:, None]), -127, 127)
    return q, scale


def quantize_int8_per_channel(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[out, in] float weight -> int8 [in, out] and per-output-channel scales [out] (symmetric)."""
    q, scale = quantize_int8_rows(weight)
    return np.ascontiguousarray(q.T), scale


def quantize_blockwise(weight: np.ndarray, bits: int, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """[out, in] float weight -> MatMulNBits' packed [out, blocks, blob] uint8 and scales [out, blocks] (symmetric)."""
    n, k = weight.shape
    blocks = (k + block_size - 1) // block_size
    packed = np.zeros((n, blocks, block_size * bits // 8), dtype=np.uint8)
    scales = np.zeros((n, blocks), dtype=np.float32)
    quantize = quantize_matmul_4bits if bits == 4 else quantize_matmul_8bits
    for start in range(0, n, CHUNK_ROWS):
        rows = weight[start:start + CHUNK_ROWS]
        kernel_input = np.zeros((blocks * block_size, len(rows)), dtype=np.float32)
        kernel_input[:k] = rows.T
        zero_points = np.zeros((len(rows), (blocks * bits + 7) // 8), dtype=np.uint8)
        chunk_packed = np.zeros((len(rows), blocks, block_size * bits // 8), dtype=np.uint8)
        chunk_scales = np.zeros((len(rows), blocks), dtype=np.float32)
        quantize(chunk_packed, kernel_input, chunk_scales, zero_points, block_size, len(rows), blocks * block_size,
                 True)
        packed[start:start + len(rows)] = chunk_packed
        scales[start:start + len(rows)] = chunk_scales
    return packed, scales


def linear_node(g: GraphBuilder, x: str, weight: np.ndarray, bias: np.ndarray | None, how: QuantLinear,
                name: str) -> str:
    """`x @ weight.T (+ bias)` for a torch-layout [out, in] weight, stored and computed as `how` says.

    The quantized kernels take the bias as an input, which saves a pass over the output.
    """
    out_features, in_features = weight.shape
    bias_name = g.weight(f"{name}.bias", bias) if bias is not None else None
    if how.kind in FLOAT_KINDS:
        y = g.op("MatMul", [x, g.weight(f"{name}.weight_t", weight.T)], hint=f"{name}.out")
        return y if bias_name is None else g.op("Add", [y, bias_name], hint=f"{name}.out")
    if how.kind == "int8":
        q, scale = quantize_int8_per_channel(weight)
        inputs = [x, g.weight(f"{name}.weight_q8", q), g.weight(f"{name}.scale", scale)]
        return g.op("DynamicQuantizeMatMul", inputs + (["", bias_name] if bias_name else []), domain=MS,
                    hint=f"{name}.out")
    if how.kind == "nbits":
        packed, scales = quantize_blockwise(weight, how.bits, how.block_size)
        attrs = {"K": in_features, "N": out_features, "bits": how.bits, "block_size": how.block_size}
        if how.accuracy_level:
            attrs["accuracy_level"] = how.accuracy_level
        inputs = [x, g.weight(f"{name}.weight_q{how.bits}", packed), g.weight(f"{name}.scales", scales)]
        return g.op("MatMulNBits", inputs + (["", "", bias_name] if bias_name else []), domain=MS,
                    hint=f"{name}.out", **attrs)
    raise ValueError(f"unknown linear kind {how.kind!r}")
