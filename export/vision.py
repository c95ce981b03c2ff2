"""The vision encoder (ViT) and the adapter (pooling cross-attention + projector) as two ONNX models."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from onnx import TensorProto

from . import layers
from .onnx_graph import GraphBuilder
from .quantize import FP32, QuantLinear
from .weights import Weights

VIT = "model.vision_tower"
ADAPTER = "model.multi_modal_projector"


def feature_layers(vision_feature_layer: list[int], num_layers: int) -> list[int]:
    """Absolute ViT layer indices whose outputs feed the adapter.

    transformers reads `hidden_states[l + 1]` for l >= 0 and `hidden_states[l]` for l < 0, where hidden_states[0] is
    the embedding output: both name the output of layer `l % num_layers`.
    """
    return [layer if layer >= 0 else num_layers + layer for layer in vision_feature_layer]


def build_vision(path: Path, w: Weights, vision_cfg, adapter_cfg, how: QuantLinear = FP32,
                 progress: Callable[[str], None] = lambda msg: None, floats: str = "fp32") -> None:
    """pixel_values [crops, patches, patch*patch*3] -> features [crops, patches, hidden * len(vit_layers)], both
    float32, computed in `floats` (`GraphBuilder`)."""
    g = GraphBuilder(path, floats)
    pixels = g.input("pixel_values", TensorProto.FLOAT, ["crops", vision_cfg.num_position_embeddings,
                                                          vision_cfg.patch_size**2 * vision_cfg.num_channels])
    x = layers.linear(g, pixels, w, f"{VIT}.patch_embedding", how)
    x = g.op("Add", [x, g.weight(f"{VIT}.positional_embedding", w.get(f"{VIT}.positional_embedding"))])
    wanted = feature_layers(adapter_cfg.vision_feature_layer, vision_cfg.num_hidden_layers)
    outputs = {}
    heads, kv_heads, head_dim = (vision_cfg.num_attention_heads, vision_cfg.num_key_value_heads,
                                 vision_cfg.head_dim)
    depth = max(wanted) + 1
    for i in range(depth):
        progress(f"vision encoder layer {i + 1}/{depth}")
        p = f"{VIT}.layers.{i}"
        h = layers.layer_norm(g, x, w, f"{p}.layer_norm1", vision_cfg.layer_norm_eps)
        q = layers.linear(g, h, w, f"{p}.self_attn.q_proj", how)
        k = layers.linear(g, h, w, f"{p}.self_attn.k_proj", how)
        v = layers.linear(g, h, w, f"{p}.self_attn.v_proj", how)
        if heads == kv_heads:
            a = g.op("MultiHeadAttention", [q, k, v], domain="com.microsoft", num_heads=heads)
        else:
            q, k, v = (layers.split_heads(g, t, n, head_dim) for t, n in ((q, heads), (k, kv_heads), (v, kv_heads)))
            a = layers.merge_heads(g, layers.attention(g, q, k, v, heads, kv_heads, head_dim, None), heads, head_dim)
        x = g.op("Add", [x, layers.linear(g, a, w, f"{p}.self_attn.o_proj", how)])
        h = layers.layer_norm(g, x, w, f"{p}.layer_norm2", vision_cfg.layer_norm_eps)
        h = layers.linear(g, layers.gelu_tanh(g, layers.linear(g, h, w, f"{p}.mlp.fc1", how)), w, f"{p}.mlp.fc2", how)
        x = g.op("Add", [x, h], hint=f"vit.layer{i}.out")
        outputs[i] = x
    feats = g.op("Concat", [outputs[i] for i in wanted], axis=-1) if len(wanted) > 1 else outputs[wanted[0]]
    g.output(feats, "image_features", TensorProto.FLOAT,
             ["crops", vision_cfg.num_position_embeddings, vision_cfg.hidden_size * len(wanted)])
    g.save()


def build_adapter(path: Path, w: Weights, adapter_cfg, how: QuantLinear = FP32, floats: str = "fp32") -> None:
    """image_features [crops, patches, D] + pooled_patches_idx [tokens, k] -> image embeddings [valid tokens, H].

    Each output token is a cross-attention whose query is the mean of its valid patches and whose keys and values
    are those patches (padding slots, index -1, masked); tokens with no valid patch are dropped, as the reference does.
    Inputs and outputs are float32, computed in `floats` (`GraphBuilder`).
    """
    g = GraphBuilder(path, floats)
    dim = adapter_cfg.hidden_size * len(adapter_cfg.vision_feature_layer)
    feats = g.input("image_features", TensorProto.FLOAT, ["crops", "patches", dim])
    idx = g.input("pooled_patches_idx", TensorProto.INT64, ["tokens", "pool"])
    flat = g.op("Reshape", [feats, g.const([-1, dim], np.int64)])
    valid = g.op("Greater", [idx, g.const(-1, np.int64)])
    valid_f = g.op("Cast", [valid], to=g.float_type)
    patches = g.op("Gather", [flat, g.op("Max", [idx, g.const(0, np.int64)])], axis=0)
    patches = g.op("Mul", [patches, g.op("Unsqueeze", [valid_f, g.const([-1], np.int64)])])
    count = g.op("ReduceSum", [valid_f, g.const([-1], np.int64)], keepdims=1)
    count = g.op("Max", [count, g.const(1.0)])
    query = g.op("Div", [g.op("ReduceSum", [patches, g.const([1], np.int64)], keepdims=1),
                         g.op("Unsqueeze", [count, g.const([-1], np.int64)])])

    heads, kv_heads, head_dim = (adapter_cfg.num_attention_heads, adapter_cfg.num_key_value_heads,
                                 adapter_cfg.head_dim)
    p = f"{ADAPTER}.image_pooling_2d"
    q = layers.split_heads(g, layers.linear(g, query, w, f"{p}.q_proj", how), heads, head_dim)
    k = layers.split_heads(g, layers.linear(g, patches, w, f"{p}.k_proj", how), kv_heads, head_dim)
    v = layers.split_heads(g, layers.linear(g, patches, w, f"{p}.v_proj", how), kv_heads, head_dim)
    bias = g.op("Where", [valid, g.const(0.0), g.const(layers.NEG_INF)])
    bias = g.op("Reshape", [bias, g.const([0, 1, 1, 1, -1], np.int64)])
    pooled = layers.merge_heads(g, layers.attention(g, q, k, v, heads, kv_heads, head_dim, bias), heads, head_dim)
    pooled = layers.linear(g, pooled, w, f"{p}.o_proj", how)
    pooled = g.op("Squeeze", [pooled, g.const([1], np.int64)])

    p = f"{ADAPTER}.image_projector"
    hidden = g.op("Mul", [layers.silu(g, layers.linear(g, pooled, w, f"{p}.gate_proj", how)),
                          layers.linear(g, pooled, w, f"{p}.up_proj", how)])
    out = layers.linear(g, hidden, w, f"{p}.down_proj", how)
    keep = g.op("Cast", [g.op("ReduceMax", [valid_f], axes=[-1], keepdims=0)], to=TensorProto.BOOL)
    out = g.op("Compress", [out, keep], axis=0)
    g.output(out, "image_embeddings", TensorProto.FLOAT, ["valid_tokens", adapter_cfg.text_hidden_size])
    g.save()
