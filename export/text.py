"""The token embedding table and the KV-cached text decoder as ONNX models."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper

from . import layers
from .onnx_graph import GraphBuilder
from .quantize import FP32, MS, QuantLinear, quantize_int8_rows
from .weights import Weights

LM = "model.language_model"


def kv_names(layer: int) -> tuple[str, str, str, str]:
    """(past key, past value, present key, present value) tensor names of one decoder layer."""
    return (f"past_key_values.{layer}.key", f"past_key_values.{layer}.value",
            f"present.{layer}.key", f"present.{layer}.value")


def build_embed(path: Path, w: Weights, text_cfg, precision: str = "fp32", floats: str = "fp32") -> None:
    """input_ids [batch, seq] -> inputs_embeds [batch, seq, hidden] (float32) over base + additional vocabulary rows.

    `int8` stores each row as int8 with its own scale (a quarter of the bytes; rows are dequantized on lookup);
    `fp16` stores the table in float16. `floats` is the graph's float type (`GraphBuilder`).
    """
    g = GraphBuilder(path, floats)
    ids = g.input("input_ids", TensorProto.INT64, ["batch", "seq"])
    table = w.get(f"{LM}.embed_tokens.weight")
    if precision == "int8":
        q, scale = quantize_int8_rows(table)
        del table
        rows = g.op("Cast", [g.op("Gather", [g.weight(f"{LM}.embed_tokens.weight_q8", q), ids], axis=0)],
                    to=g.float_type)
        scales = g.op("Gather", [g.weight(f"{LM}.embed_tokens.scale", scale), ids], axis=0)
        embeds = g.op("Mul", [rows, g.op("Unsqueeze", [scales, g.const([-1], np.int64)])])
    else:
        embeds = g.op("Gather", [g.weight(f"{LM}.embed_tokens.weight", table), ids], axis=0)
    g.output(embeds, "inputs_embeds", TensorProto.FLOAT, ["batch", "seq", text_cfg.hidden_size])
    g.save()


def _rope_caches(g: GraphBuilder, inv_freq: np.ndarray, scaling: float, positions: int,
                 name: str) -> tuple[str, str]:
    """cos, sin [positions, head_dim / 2] for GroupQueryAttention's rotary: `Molmo2RotaryEmbedding`'s float32
    values (position times inverse frequency, then cos/sin, times the attention scaling), one row per position."""
    freqs = np.arange(positions, dtype=np.float32)[:, None] * inv_freq.astype(np.float32)[None]
    cos, sin = np.cos(freqs), np.sin(freqs)
    if scaling != 1.0:
        cos, sin = cos * np.float32(scaling), sin * np.float32(scaling)
    return g.weight(f"{name}.cos_cache", cos), g.weight(f"{name}.sin_cache", sin)


def _head_rms_norm(g: GraphBuilder, x: str, heads: int, head_dim: int, weight: np.ndarray, eps: float,
                   name: str) -> str:
    """Qwen3's q/k norm: RMSNorm over each head's own head_dim values. [B, S, heads*D] -> same shape."""
    x = g.op("Reshape", [x, g.const([0, 0, heads, head_dim], np.int64)])  # [B, S, heads, D]
    x = layers.rms_norm(g, x, weight, eps, name)
    return g.op("Reshape", [x, g.const([0, 0, heads * head_dim], np.int64)])


def _biased_attention(g: GraphBuilder, length: str, q: str, keys: str, values: str, bias: str, total: str, cos: str,
                      sin: str, causal: str, heads: int, kv_heads: int, head_dim: int, name: str) -> str:
    """Attention of a prefill's queries under the additive bias, for a graph whose GroupQueryAttention is causal.

    An `If` on the new positions (`length`, [1]): one (a decode step) keeps GroupQueryAttention's output `causal`;
    more (a prefill, batch 1) compute softmax(q k^T * scale + bias) v from the keys and values GroupQueryAttention
    has just written (`keys`, `values`: the present buffers, read up to `total`), with q rotated at positions
    total - seq .. total - 1 as GroupQueryAttention rotates it. Query heads are grouped by key/value head,
    [B, kv_heads, group * seq, D], so no key or value is repeated; the softmax runs in float32.
    [B, S, heads*D] -> same shape.
    """
    group = heads // kv_heads
    outer, g.nodes = g.nodes, []
    end = g.op("Reshape", [g.op("Cast", [total], to=TensorProto.INT64), g.const([1], np.int64)])
    positions = g.op("Unsqueeze", [g.op("Range", [g.op("Sub", [end, length]), end, g.const([1], np.int64)]),
                                   g.const([0], np.int64)])  # [1, S]
    rotated = g.op("RotaryEmbedding", [q, positions, cos, sin], domain=MS)  # [B, S, heads*D]
    grouped = g.op("Reshape", [rotated, g.const([0, 0, kv_heads, group, head_dim], np.int64)])
    grouped = g.op("Reshape", [g.op("Transpose", [grouped], perm=[0, 2, 3, 1, 4]),
                               g.const([0, 0, -1, head_dim], np.int64)])  # [B, kv, group*S, D], row g*S + s
    zero, axis = g.const([0], np.int64), g.const([2], np.int64)
    k = g.op("Slice", [keys, zero, end, axis])  # [B, kv, T, D]
    v = g.op("Slice", [values, zero, end, axis])
    scores = g.op("Mul", [g.op("MatMul", [grouped, g.op("Transpose", [k], perm=[0, 1, 3, 2])]),
                          g.const(head_dim**-0.5)])  # [B, kv, group*S, T]
    scores = g.op("Add", [scores, g.op("Tile", [bias, g.const([1, 1, group, 1], np.int64)])])
    probs = g.op("Cast", [g.op("Softmax", [g.op("Cast", [scores], to=TensorProto.FLOAT)], axis=-1)],
                 to=g.float_type)
    out = g.op("Reshape", [g.op("MatMul", [probs, v]), g.const([0, 0, group, -1, head_dim], np.int64)])
    out = g.op("Reshape", [g.op("Transpose", [out], perm=[0, 3, 1, 2, 4]),
                           g.const([0, 0, heads * head_dim], np.int64)], hint=f"{name}.biased")
    prefill_nodes, g.nodes = g.nodes, outer
    kept = g.fresh(f"{name}.causal")
    branch = [helper.make_tensor_value_info(out, g.float_type, None)]
    step = [helper.make_tensor_value_info(kept, g.float_type, None)]
    prefill = g.op("Greater", [length, g.const([1], np.int64)])
    return g.op("If", [prefill], hint=f"{name}.attention",
                then_branch=helper.make_graph(prefill_nodes, f"{name}.prefill", [], branch),
                else_branch=helper.make_graph([helper.make_node("Identity", [causal], [kept])], f"{name}.step", [],
                                              step))


def build_decoder(path: Path, w: Weights, text_cfg, rope: dict[str, tuple[np.ndarray, float]],
                  layers_how: list[QuantLinear], lm_head: QuantLinear = FP32,
                  progress: Callable[[str], None] = lambda msg: None, floats: str = "fp32") -> None:
    """The language model over `seq` new positions, reading and writing a preallocated KV cache in place.

    `layers_how[i]` is the precision of layer i's projections (`ExportPlan.decoder_layers`).

    Inputs: inputs_embeds [batch, seq, hidden]; attention_bias [batch, 1, seq, total] (additive: 0 where attention
    is allowed, float32 min elsewhere; the runtime builds the Molmo2 image-block rule into it, zeros for a decode
    step); seqlens_k [batch] int32 (total - 1) and total_sequence_length int32 (past + seq, the positions in use);
    and per layer the key/value buffers [batch, kv_heads, capacity, head_dim]. Outputs: next-token logits of the last
    position [batch, vocab] and per layer the same buffers with the new positions written (bind each present output
    to its past input's buffer: GroupQueryAttention then writes the `seq` new rows in place and copies nothing), and
    `next_token` [batch] int64, the greedy choice (the first highest logit), so a GPU run need not send the logits
    back.

    The graph computes in `floats` (`GraphBuilder`): inputs_embeds, attention_bias and logits stay float32 at the
    boundary, the key/value buffers are in `floats` (float16 halves the bytes a step reads from them). In float16,
    float32 min in the bias becomes -inf, harmless because every row of the runtime's bias allows its own position.

    Attention is ONNX Runtime's GroupQueryAttention with its rotary (RoPE on positions past .. total - 1, which it
    derives from seqlens_k) and `causal=0`, so the bias alone decides what each position sees.

    A float16 graph (the GPU plans) gives GroupQueryAttention no bias: ONNX Runtime's CUDA kernel refuses one. Its
    attention is then causal, which is all a decode step needs (each row's end comes from seqlens_k), and it still
    writes the new keys and values in place; a prefill (seq > 1) takes its attention from `_biased_attention` instead,
    the same product with the bias, so that Molmo2's image block stays bidirectional.
    """
    cfg = text_cfg
    heads, kv_heads, head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    q_size, kv_size = heads * head_dim, kv_heads * head_dim
    g = GraphBuilder(path, floats)
    x = g.input("inputs_embeds", TensorProto.FLOAT, ["batch", "seq", cfg.hidden_size])
    bias = g.input("attention_bias", TensorProto.FLOAT, ["batch", 1, "seq", "total"])
    seqlens = g.input("seqlens_k", TensorProto.INT32, ["batch"])
    total = g.input("total_sequence_length", TensorProto.INT32, [])
    kinds = {"scaled" if i in cfg.rope_scaling_layers else "unscaled" for i in range(cfg.num_hidden_layers)}
    caches = {kind: _rope_caches(g, *rope[kind], cfg.max_position_embeddings, f"rope_{kind}") for kind in kinds}
    split_qkv = g.const([q_size, kv_size, kv_size], np.int64)
    half = floats == "fp16"  # the GPU plans: GroupQueryAttention without the bias (see above)
    new_positions = g.op("Shape", [x], start=1, end=2) if half else ""  # [1]

    for i in range(cfg.num_hidden_layers):
        progress(f"{path.stem} layer {i + 1}/{cfg.num_hidden_layers}")
        p = f"{LM}.layers.{i}"
        how = layers_how[i]
        past_k, past_v, present_k, present_v = kv_names(i)
        for name in (past_k, past_v):
            g.input(name, g.float_type, ["batch", kv_heads, "capacity", head_dim])
        in_norm = w.get(f"{p}.input_layernorm.weight")
        post_norm = w.get(f"{p}.post_attention_layernorm.weight")

        h = x if cfg.norm_after else layers.rms_norm(g, x, in_norm, cfg.rms_norm_eps, f"{p}.input_layernorm")
        qkv = layers.fused_linear(g, h, w, [f"{p}.self_attn.{n}_proj" for n in "qkv"], f"{p}.self_attn.qkv_proj", how)
        q, k, v = g.op("Split", [qkv, split_qkv], outputs=3, axis=-1)  # [B, S, heads*D], 2x [B, S, kv_heads*D]
        q_norm, k_norm = w.get(f"{p}.self_attn.q_norm.weight"), w.get(f"{p}.self_attn.k_norm.weight")
        if cfg.qk_norm_type == "olmo":
            q = layers.rms_norm(g, q, q_norm, cfg.rms_norm_eps, f"{p}.self_attn.q_norm")
            k = layers.rms_norm(g, k, k_norm, cfg.rms_norm_eps, f"{p}.self_attn.k_norm")
        elif cfg.qk_norm_type == "qwen3":
            q = _head_rms_norm(g, q, heads, head_dim, q_norm, cfg.rms_norm_eps, f"{p}.self_attn.q_norm")
            k = _head_rms_norm(g, k, kv_heads, head_dim, k_norm, cfg.rms_norm_eps, f"{p}.self_attn.k_norm")
        cos, sin = caches["scaled" if i in cfg.rope_scaling_layers else "unscaled"]
        a = g.fresh(f"{p}.self_attn.out")
        biased = {} if half else {"causal": 0}  # bias input and attribute: a float32 graph's GQA applies the bias
        g.nodes.append(helper.make_node(
            "GroupQueryAttention", [q, k, v, past_k, past_v, seqlens, total, cos, sin, *(() if half else ("", bias))],
            [a, present_k, present_v], domain=MS, num_heads=heads, kv_num_heads=kv_heads, do_rotary=1,
            scale=head_dim**-0.5, **biased))  # a: [B, S, heads*D]
        if half:
            a = _biased_attention(g, new_positions, q, present_k, present_v, bias, total, cos, sin, a, heads,
                                  kv_heads, head_dim, f"{p}.self_attn")
        g.output(present_k, present_k, g.float_type, ["batch", kv_heads, "capacity", head_dim])
        g.output(present_v, present_v, g.float_type, ["batch", kv_heads, "capacity", head_dim])

        a = layers.linear(g, a, w, f"{p}.self_attn.o_proj", how)
        if cfg.norm_after:
            a = layers.rms_norm(g, a, in_norm, cfg.rms_norm_eps, f"{p}.input_layernorm")
        x = g.op("Add", [x, a])

        h = x if cfg.norm_after else layers.rms_norm(g, x, post_norm, cfg.rms_norm_eps,
                                                      f"{p}.post_attention_layernorm")
        gate_up = layers.fused_linear(g, h, w, [f"{p}.mlp.gate_proj", f"{p}.mlp.up_proj"], f"{p}.mlp.gate_up_proj",
                                      how)
        gate, up = g.op("Split", [gate_up], outputs=2, axis=-1)  # [B, S, intermediate] each
        h = layers.linear(g, g.op("Mul", [layers.silu(g, gate), up]), w, f"{p}.mlp.down_proj", how)
        if cfg.norm_after:
            h = layers.rms_norm(g, h, post_norm, cfg.rms_norm_eps, f"{p}.post_attention_layernorm")
        x = g.op("Add", [x, h], hint=f"decoder.layer{i}.out")

    last = g.op("Gather", [x, g.const(-1, np.int64)], axis=1)
    last = layers.rms_norm(g, last, w.get(f"{LM}.norm.weight"), cfg.rms_norm_eps, f"{LM}.norm")
    logits = layers.linear(g, last, w, "lm_head", lm_head)
    g.output(logits, "logits", TensorProto.FLOAT, ["batch", cfg.vocab_size])
    g.output(g.op("ArgMax", [logits], axis=-1, keepdims=0), "next_token", TensorProto.INT64, ["batch"])
    g.save()
