"""Write a Molmo2 checkpoint in the Hugging Face hub's *original* layout.

`allenai/Molmo2-4B` ships AllenAI remote-code files: a `config.json` with `vit_config` /
`adapter_config` / `text_config` sub-configs under their original key names, and weights named
after the original OLMo modules (fused `att_proj` and `ff_proj`, a split `wte` embedding,
`image_vit.transformer.resblocks`, ...). transformers converts that layout on load
(`conversion_mapping.py`, entries "molmo2" and "Molmo2TextModel"). Tests use this writer to build
tiny random checkpoints in that layout, so the loading path that real hub downloads take can be
exercised offline without the multi-GB weights.

The mapping here is written out by hand rather than taken from transformers' reverse
conversion (which `save_pretrained` applies to the weights but not to the config), so it is an
independent reference for the hub layout.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import Molmo2ForConditionalGeneration

_T = "model.transformer"  # original language model prefix
_V = "model.vision_backbone"  # original ViT + adapter prefix
_B = f"{_V}.image_vit.transformer.resblocks"  # original ViT blocks

# transformers key (full match) -> original key. Fused tensors (att_proj, ff_proj, wte) are built
# separately in `hub_state_dict`, because one original tensor covers several transformers tensors.
_RENAMES: list[tuple[str, str]] = [
    (r"lm_head\.weight", "lm_head.weight"),
    (r"model\.language_model\.norm\.weight", f"{_T}.ln_f.weight"),
    (r"model\.language_model\.layers\.(\d+)\.input_layernorm\.weight", rf"{_T}.blocks.\1.attn_norm.weight"),
    (r"model\.language_model\.layers\.(\d+)\.post_attention_layernorm\.weight", rf"{_T}.blocks.\1.ff_norm.weight"),
    (r"model\.language_model\.layers\.(\d+)\.self_attn\.o_proj\.(\w+)", rf"{_T}.blocks.\1.self_attn.attn_out.\2"),
    (r"model\.language_model\.layers\.(\d+)\.self_attn\.([qk]_norm)\.weight", rf"{_T}.blocks.\1.self_attn.\2.weight"),
    (r"model\.language_model\.layers\.(\d+)\.mlp\.down_proj\.weight", rf"{_T}.blocks.\1.mlp.ff_out.weight"),
    (r"model\.vision_tower\.positional_embedding", f"{_V}.image_vit.positional_embedding"),
    (r"model\.vision_tower\.patch_embedding\.(\w+)", rf"{_V}.image_vit.patch_embedding.\1"),
    (r"model\.vision_tower\.layers\.(\d+)\.self_attn\.([qkvo])_proj\.(\w+)", rf"{_B}.\1.attention.w\2.\3"),
    (r"model\.vision_tower\.layers\.(\d+)\.layer_norm1\.(\w+)", rf"{_B}.\1.attention_norm.\2"),
    (r"model\.vision_tower\.layers\.(\d+)\.layer_norm2\.(\w+)", rf"{_B}.\1.ffn_norm.\2"),
    (r"model\.vision_tower\.layers\.(\d+)\.mlp\.fc([12])\.(\w+)", rf"{_B}.\1.feed_forward.w\2.\3"),
    (r"model\.multi_modal_projector\.image_pooling_2d\.([qkvo])_proj\.(\w+)", rf"{_V}.image_pooling_2d.w\1.\2"),
    (r"model\.multi_modal_projector\.image_projector\.gate_proj\.(\w+)", rf"{_V}.image_projector.w1.\1"),
    (r"model\.multi_modal_projector\.image_projector\.down_proj\.(\w+)", rf"{_V}.image_projector.w2.\1"),
    (r"model\.multi_modal_projector\.image_projector\.up_proj\.(\w+)", rf"{_V}.image_projector.w3.\1"),
]

# original fused module -> transformers parts, concatenated on dim 0 in this order (up before gate).
_FUSED: dict[str, tuple[str, ...]] = {
    "self_attn.att_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "mlp.ff_proj": ("mlp.up_proj", "mlp.gate_proj"),
}


def hub_state_dict(model: Molmo2ForConditionalGeneration, vit_depth: int) -> dict[str, torch.Tensor]:
    """Original-named tensors; ViT layers at index >= `vit_depth` are left out, as on the hub."""
    sd = dict(model.state_dict())
    text = model.config.text_config
    out: dict[str, torch.Tensor] = {}

    embed = sd.pop("model.language_model.embed_tokens.weight")
    out[f"{_T}.wte.embedding"] = embed[: text.vocab_size]
    out[f"{_T}.wte.new_embedding"] = embed[text.vocab_size :]

    for i in range(text.num_hidden_layers):
        src = f"model.language_model.layers.{i}"
        for fused, parts in _FUSED.items():
            for leaf in ("weight", "bias"):
                if f"{src}.{parts[0]}.{leaf}" in sd:
                    tensors = [sd.pop(f"{src}.{part}.{leaf}") for part in parts]
                    out[f"{_T}.blocks.{i}.{fused}.{leaf}"] = torch.cat(tensors, dim=0)

    for key, tensor in sd.items():
        layer = re.match(r"model\.vision_tower\.layers\.(\d+)\.", key)
        if layer and int(layer.group(1)) >= vit_depth:
            continue
        for pattern, repl in _RENAMES:
            if re.fullmatch(pattern, key):
                out[re.sub(pattern, repl, key)] = tensor
                break
        else:
            raise KeyError(f"no hub name for {key}")
    return {k: v.detach().contiguous() for k, v in out.items()}


def hub_config(model: Molmo2ForConditionalGeneration, declared_vit_layers: int, used: list[int]) -> dict:
    """`config.json` as the AllenAI remote code writes it (original key names, legacy `vit_config`)."""
    cfg = model.config
    vit, adapter, text = cfg.vision_config, cfg.adapter_config, cfg.text_config
    rope = dict(text.rope_parameters)
    rope_theta = rope.pop("rope_theta")
    return {
        "architectures": ["Molmo2ForConditionalGeneration"],
        "auto_map": {
            "AutoConfig": "configuration_molmo2.Molmo2Config",
            "AutoModelForImageTextToText": "modeling_molmo2.Molmo2ForConditionalGeneration",
        },
        "model_type": "molmo2",
        "vit_config": {
            "model_type": "molmo2",
            "hidden_size": vit.hidden_size,
            "intermediate_size": vit.intermediate_size,
            "num_hidden_layers": declared_vit_layers,
            "num_attention_heads": vit.num_attention_heads,
            "num_key_value_heads": vit.num_key_value_heads,
            "head_dim": vit.head_dim,
            "hidden_act": vit.hidden_act,
            "layer_norm_eps": vit.layer_norm_eps,
            "image_default_input_size": list(vit.image_size),
            "image_patch_size": vit.patch_size,
            "image_num_pos": vit.num_position_embeddings,
            "attention_dropout": vit.attention_dropout,
            "residual_dropout": 0.0,
            "float32_attention": True,
            "initializer_range": vit.initializer_range,
        },
        "adapter_config": {
            "model_type": "molmo2",
            # Negative, relative to the declared depth, like the hub's [-3, -9] over 27 layers.
            "vit_layers": [layer - declared_vit_layers for layer in used],
            "pooling_attention_mask": True,
            "hidden_size": adapter.hidden_size,
            "num_attention_heads": adapter.num_attention_heads,
            "num_key_value_heads": adapter.num_key_value_heads,
            "head_dim": adapter.head_dim,
            "float32_attention": True,
            "attention_dropout": adapter.attention_dropout,
            "residual_dropout": 0.0,
            "hidden_act": adapter.hidden_act,
            "intermediate_size": adapter.intermediate_size,
            "text_hidden_size": adapter.text_hidden_size,
            "image_feature_dropout": 0.0,
            "initializer_range": adapter.initializer_range,
        },
        "text_config": {
            "model_type": "molmo2_text",
            "hidden_size": text.hidden_size,
            "num_attention_heads": text.num_attention_heads,
            "num_key_value_heads": text.num_key_value_heads,
            "head_dim": text.head_dim,
            "vocab_size": text.vocab_size,
            "additional_vocab_size": text.additional_vocab_size,
            "qkv_bias": text.attention_bias,
            "num_hidden_layers": text.num_hidden_layers,
            "intermediate_size": text.intermediate_size,
            "hidden_act": text.hidden_act,
            "embedding_dropout": 0.0,
            "attention_dropout": text.attention_dropout,
            "residual_dropout": 0.0,
            "max_position_embeddings": text.max_position_embeddings,
            "rope_theta": rope_theta,
            "rope_scaling": None if rope.get("rope_type", "default") == "default" else rope,
            "rope_scaling_layers": text.rope_scaling_layers,
            "use_qk_norm": True,
            "qk_norm_type": text.qk_norm_type,
            "layer_norm_eps": text.rms_norm_eps,
            "norm_after": text.norm_after,
            "initializer_range": text.initializer_range,
            "use_cache": text.use_cache,
            "tie_word_embeddings": False,
        },
        "image_start_token_id": cfg.image_start_token_id,
        "low_res_image_start_token_id": cfg.low_res_image_start_token_id,
        "image_end_token_id": cfg.image_end_token_id,
        "image_patch_id": cfg.image_patch_id,
        "frame_start_token_id": cfg.frame_start_token_id,
        "frame_end_token_id": cfg.frame_end_token_id,
        "use_frame_special_tokens": True,
        "initializer_range": cfg.initializer_range,
        "tie_word_embeddings": False,
        "use_cache": True,
        "torch_dtype": str(model.dtype).removeprefix("torch."),
    }


def save_hub_layout(
    model: Molmo2ForConditionalGeneration,
    out_dir: Path,
    declared_vit_layers: int | None = None,
    max_shard_size: int | None = None,
) -> None:
    """Write `model` to `out_dir` as the hub's original-layout `config.json` + safetensors.

    `declared_vit_layers` is the ViT depth put in `config.json` (default: the model's depth); it may
    exceed what is stored: like the hub (27 declared, 25 stored), only ViT layers up to the deepest
    one the adapter reads are written, and `vit_layers` is given as negative indices. With
    `max_shard_size` (bytes), tensors are packed greedily into `model-0000i-of-0000n.safetensors`
    files plus `model.safetensors.index.json`.
    """
    vit_layers = model.config.vision_config.num_hidden_layers
    used = [layer % vit_layers for layer in model.config.adapter_config.vision_feature_layer]
    vit_depth = max(used) + 1
    declared = vit_layers if declared_vit_layers is None else declared_vit_layers
    if declared < vit_depth:
        raise ValueError(f"declared_vit_layers={declared} is below the {vit_depth} ViT layers in use")

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(hub_config(model, declared, used), indent=2) + "\n")

    tensors = hub_state_dict(model, vit_depth)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key in sorted(tensors):
        nbytes = tensors[key].numel() * tensors[key].element_size()
        if max_shard_size is not None and shards[-1] and size + nbytes > max_shard_size:
            shards.append({})
            size = 0
        shards[-1][key] = tensors[key]
        size += nbytes

    if len(shards) == 1:
        save_file(shards[0], str(out_dir / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out_dir / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
