"""Transformer building blocks emitted as ONNX nodes, written to mirror transformers' Molmo2 forward op for op.

Every weight product goes through `linear`, which stores and computes it as the export plan says.
"""

from __future__ import annotations

import numpy as np

from .onnx_graph import GraphBuilder
from .quantize import FP32, QuantLinear, linear_node
from .weights import Weights

NEG_INF = float(np.finfo(np.float32).min)


def linear(g: GraphBuilder, x: str, w: Weights, prefix: str, how: QuantLinear = FP32) -> str:
    """`x @ W.T + b` for the torch Linear stored under `prefix` (bias only where the checkpoint has one)."""
    bias = w.get(f"{prefix}.bias") if w.has(f"{prefix}.bias") else None
    return linear_node(g, x, w.get(f"{prefix}.weight"), bias, how, prefix)


def fused_linear(g: GraphBuilder, x: str, w: Weights, prefixes: list[str], name: str,
                 how: QuantLinear = FP32) -> str:
    """One product for several torch Linears that read the same input (q|k|v, gate|up): their weights stacked by
    output rows, so the input is read (and, for int8, quantized) once and a decode step runs one kernel, not three.
    The output is the parts' outputs side by side, in the order of `prefixes`."""
    weight = np.concatenate([w.get(f"{p}.weight") for p in prefixes])
    biases = [w.get(f"{p}.bias") for p in prefixes if w.has(f"{p}.bias")]
    if biases and len(biases) != len(prefixes):
        raise ValueError(f"only some of {prefixes} have a bias")
    return linear_node(g, x, weight, np.concatenate(biases) if biases else None, how, name)


def rms_norm(g: GraphBuilder, x: str, weight: np.ndarray, eps: float, name: str) -> str:
    """RMSNorm over the last axis like `Molmo2RMSNorm` (its statistics in float32 whatever the graph's float type),
    as ONNX Runtime's one fused kernel."""
    return g.op("SimplifiedLayerNormalization", [x, g.weight(f"{name}.weight", weight)], axis=-1, epsilon=eps,
                stash_type=1, hint=f"{name}.out")


def layer_norm(g: GraphBuilder, x: str, w: Weights, prefix: str, eps: float) -> str:
    """LayerNorm over the last axis, its mean and variance in float32 whatever the graph's float type."""
    scale = g.weight(f"{prefix}.weight", w.get(f"{prefix}.weight"))
    shift = g.weight(f"{prefix}.bias", w.get(f"{prefix}.bias"))
    return g.op("LayerNormalization", [x, scale, shift], axis=-1, epsilon=eps, stash_type=1, hint=f"{prefix}.out")


def gelu_tanh(g: GraphBuilder, x: str) -> str:
    """0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), torch's `gelu(approximate="tanh")`, as one fused kernel."""
    return g.op("FastGelu", [x], domain="com.microsoft")


def silu(g: GraphBuilder, x: str) -> str:
    return g.op("Mul", [x, g.op("Sigmoid", [x])])


def split_heads(g: GraphBuilder, x: str, heads: int, head_dim: int) -> str:
    """[B, S, heads*head_dim] -> [B, heads, S, head_dim]."""
    x = g.op("Reshape", [x, g.const([0, 0, heads, head_dim], np.int64)])
    return g.op("Transpose", [x], perm=[0, 2, 1, 3])


def merge_heads(g: GraphBuilder, x: str, heads: int, head_dim: int) -> str:
    """[B, heads, S, head_dim] -> [B, S, heads*head_dim]."""
    x = g.op("Transpose", [x], perm=[0, 2, 1, 3])
    return g.op("Reshape", [x, g.const([0, 0, heads * head_dim], np.int64)])


def attention(g: GraphBuilder, q: str, k: str, v: str, heads: int, kv_heads: int, head_dim: int,
              bias: str | None) -> str:
    """Softmax(q k^T * scale + bias) v with grouped KV heads, without materialising repeated keys.

    q: [B, heads, S, D]; k, v: [B, kv_heads, T, D]; bias: additive, broadcastable to [B, 1, 1, S, T].
    Query head h reads KV head h // (heads // kv_heads), as transformers' `repeat_kv` does.
    """
    group = heads // kv_heads
    qg = g.op("Reshape", [q, g.const([0, kv_heads, group, -1, head_dim], np.int64)])
    kt = g.op("Transpose", [g.op("Unsqueeze", [k, g.const([2], np.int64)])], perm=[0, 1, 2, 4, 3])
    scores = g.op("Mul", [g.op("MatMul", [qg, kt]), g.const(head_dim**-0.5)])
    if bias is not None:
        scores = g.op("Add", [scores, bias])
    probs = g.op("Softmax", [scores], axis=-1)
    out = g.op("MatMul", [probs, g.op("Unsqueeze", [v, g.const([2], np.int64)])])
    return g.op("Reshape", [out, g.const([0, heads, -1, head_dim], np.int64)])
