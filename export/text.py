"""The token embedding table and the KV-cached text decoder as ONNX models."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from onnx import TensorProto

from . import layers
from .onnx_graph import GraphBuilder
from .quantize import FP32, QuantLinear, quantize_int8_rows
from .weights import Weights

LM = "model.language_model"


def kv_names(layer: int) -> tuple[str, str, str, str]:
    """(past key, past value, present key, present value) tensor names of one decoder layer."""
    return (f"past_key_values.{layer}.key", f"past_key_values.{layer}.value",
            f"present.{layer}.key", f"present.{layer}.value")


def build_embed(path: Path, w: Weights, text_cfg, precision: str = "fp32") -> None:
    """input_ids [batch, seq] -> inputs_embeds [batch, seq, hidden] over base + additional vocabulary rows.

    `int8` stores each row as int8 with its own scale (a quarter of the bytes; rows are dequantized on lookup).
    """
    g = GraphBuilder(path)
    ids = g.input("input_ids", TensorProto.INT64, ["batch", "seq"])
    table = w.get(f"{LM}.embed_tokens.weight")
    if precision == "int8":
        q, scale = quantize_int8_rows(table)
        del table
        rows = g.op("Cast", [g.op("Gather", [g.weight(f"{LM}.embed_tokens.weight_q8", q), ids], axis=0)],
                    to=TensorProto.FLOAT)
        scales = g.op("Gather", [g.weight(f"{LM}.embed_tokens.scale", scale), ids], axis=0)
        embeds = g.op("Mul", [rows, g.op("Unsqueeze", [scales, g.const([-1], np.int64)])])
    else:
        embeds = g.op("Gather", [g.weight(f"{LM}.embed_tokens.weight", table), ids], axis=0)
    g.output(embeds, "inputs_embeds", TensorProto.FLOAT, ["batch", "seq", text_cfg.hidden_size])
    g.save()


def _rope_tables(g: GraphBuilder, positions: str, inv_freq: np.ndarray, scaling: float, name: str) -> tuple[str, str]:
    """cos, sin of shape [batch, 1, seq, head_dim], as `Molmo2RotaryEmbedding` computes them in float32."""
    pos = g.op("Unsqueeze", [g.op("Cast", [positions], to=TensorProto.FLOAT), g.const([-1], np.int64)])
    freqs = g.op("Mul", [pos, g.weight(f"{name}.inv_freq", inv_freq.astype(np.float32))])
    emb = g.op("Unsqueeze", [g.op("Concat", [freqs, freqs], axis=-1), g.const([1], np.int64)])
    cos, sin = g.op("Cos", [emb]), g.op("Sin", [emb])
    if scaling != 1.0:
        cos, sin = g.op("Mul", [cos, g.const(scaling)]), g.op("Mul", [sin, g.const(scaling)])
    return cos, sin


def _apply_rope(g: GraphBuilder, x: str, cos: str, sin: str) -> str:
    x1, x2 = g.op("Split", [x], outputs=2, axis=-1)
    rotated = g.op("Concat", [g.op("Neg", [x2]), x1], axis=-1)
    return g.op("Add", [g.op("Mul", [x, cos]), g.op("Mul", [rotated, sin])])


def build_decoder(path: Path, w: Weights, text_cfg, rope: dict[str, tuple[np.ndarray, float]],
                  how: QuantLinear = FP32, lm_head: QuantLinear = FP32,
                  progress: Callable[[str], None] = lambda msg: None) -> None:
    """One step of the language model over `seq` new positions with a KV cache of `past` positions.

    Inputs: inputs_embeds [batch, seq, hidden], position_ids [batch, seq], attention_bias [batch, 1, seq, past+seq]
    (additive: 0 where attention is allowed, float32 min elsewhere; the runtime builds the Molmo2 image-block rule
    into it), and the per-layer past keys/values. Outputs: next-token logits of the last position [batch, vocab]
    and the per-layer present keys/values (past + new).
    """
    cfg = text_cfg
    heads, kv_heads, head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    g = GraphBuilder(path)
    x = g.input("inputs_embeds", TensorProto.FLOAT, ["batch", "seq", cfg.hidden_size])
    positions = g.input("position_ids", TensorProto.INT64, ["batch", "seq"])
    bias = g.input("attention_bias", TensorProto.FLOAT, ["batch", 1, "seq", "total"])
    bias = g.op("Unsqueeze", [bias, g.const([1], np.int64)])
    tables = {kind: _rope_tables(g, positions, inv_freq, scaling, f"rope_{kind}")
              for kind, (inv_freq, scaling) in rope.items()}

    for i in range(cfg.num_hidden_layers):
        progress(f"{path.stem} layer {i + 1}/{cfg.num_hidden_layers}")
        p = f"{LM}.layers.{i}"
        past_k, past_v, present_k, present_v = kv_names(i)
        g.input(past_k, TensorProto.FLOAT, ["batch", kv_heads, "past", head_dim])
        g.input(past_v, TensorProto.FLOAT, ["batch", kv_heads, "past", head_dim])
        in_norm = w.get(f"{p}.input_layernorm.weight")
        post_norm = w.get(f"{p}.post_attention_layernorm.weight")

        h = x if cfg.norm_after else layers.rms_norm(g, x, in_norm, cfg.rms_norm_eps, f"{p}.input_layernorm")
        q = layers.linear(g, h, w, f"{p}.self_attn.q_proj", how)
        k = layers.linear(g, h, w, f"{p}.self_attn.k_proj", how)
        v = layers.split_heads(g, layers.linear(g, h, w, f"{p}.self_attn.v_proj", how), kv_heads, head_dim)
        q_norm, k_norm = w.get(f"{p}.self_attn.q_norm.weight"), w.get(f"{p}.self_attn.k_norm.weight")
        if cfg.qk_norm_type == "olmo":
            q = layers.rms_norm(g, q, q_norm, cfg.rms_norm_eps, f"{p}.self_attn.q_norm")
            k = layers.rms_norm(g, k, k_norm, cfg.rms_norm_eps, f"{p}.self_attn.k_norm")
        q, k = layers.split_heads(g, q, heads, head_dim), layers.split_heads(g, k, kv_heads, head_dim)
        if cfg.qk_norm_type == "qwen3":
            q = layers.rms_norm(g, q, q_norm, cfg.rms_norm_eps, f"{p}.self_attn.q_norm")
            k = layers.rms_norm(g, k, k_norm, cfg.rms_norm_eps, f"{p}.self_attn.k_norm")
        cos, sin = tables["scaled" if i in cfg.rope_scaling_layers else "unscaled"]
        q, k = _apply_rope(g, q, cos, sin), _apply_rope(g, k, cos, sin)
        k = g.op("Concat", [past_k, k], axis=2, hint=present_k)
        v = g.op("Concat", [past_v, v], axis=2, hint=present_v)
        g.output(k, present_k, TensorProto.FLOAT, ["batch", kv_heads, "total", head_dim])
        g.output(v, present_v, TensorProto.FLOAT, ["batch", kv_heads, "total", head_dim])

        a = layers.attention(g, q, present_k, present_v, heads, kv_heads, head_dim, bias)
        a = layers.linear(g, layers.merge_heads(g, a, heads, head_dim), w, f"{p}.self_attn.o_proj", how)
        if cfg.norm_after:
            a = layers.rms_norm(g, a, in_norm, cfg.rms_norm_eps, f"{p}.input_layernorm")
        x = g.op("Add", [x, a])

        h = x if cfg.norm_after else layers.rms_norm(g, x, post_norm, cfg.rms_norm_eps,
                                                      f"{p}.post_attention_layernorm")
        gate = layers.silu(g, layers.linear(g, h, w, f"{p}.mlp.gate_proj", how))
        h = layers.linear(g, g.op("Mul", [gate, layers.linear(g, h, w, f"{p}.mlp.up_proj", how)]), w,
                          f"{p}.mlp.down_proj", how)
        if cfg.norm_after:
            h = layers.rms_norm(g, h, post_norm, cfg.rms_norm_eps, f"{p}.post_attention_layernorm")
        x = g.op("Add", [x, h], hint=f"decoder.layer{i}.out")

    last = g.op("Gather", [x, g.const(-1, np.int64)], axis=1)
    last = layers.rms_norm(g, last, w.get(f"{LM}.norm.weight"), cfg.rms_norm_eps, f"{LM}.norm")
    logits = layers.linear(g, last, w, "lm_head", lm_head)
    g.output(logits, "logits", TensorProto.FLOAT, ["batch", cfg.vocab_size])
    g.save()
