"""Round trip: tiny random Molmo2 -> hub original layout (`save_hub_layout`) -> transformers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import Molmo2Config, Molmo2ForConditionalGeneration

from hub_layout import save_hub_layout


def _tiny_model(qkv_bias: bool, rope_parameters: dict | None) -> Molmo2ForConditionalGeneration:
    text = dict(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=300,
        additional_vocab_size=20, num_hidden_layers=2, intermediate_size=128, qk_norm_type="qwen3",
        max_position_embeddings=512, attention_bias=qkv_bias,
    )
    if rope_parameters is not None:
        text["rope_parameters"] = rope_parameters
    config = Molmo2Config(
        text_config=text,
        vision_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=4, head_dim=8, image_size=[378, 378], patch_size=14,
        ),
        adapter_config=dict(
            vision_feature_layer=[-1, -3], hidden_size=32, num_attention_heads=4, num_key_value_heads=4,
            head_dim=8, intermediate_size=96, text_hidden_size=64,
        ),
    )
    torch.manual_seed(0)
    return Molmo2ForConditionalGeneration(config).eval()


@pytest.mark.parametrize(
    ("qkv_bias", "rope_parameters", "declared", "sharded"),
    [
        (False, None, 6, False),
        (True, dict(rope_type="yarn", factor=2.0, rope_theta=5e5, original_max_position_embeddings=256), 27, True),
    ],
    ids=["single-file", "sharded-bias-yarn"],
)
def test_hub_layout_round_trip(
    tmp_path: Path, qkv_bias: bool, rope_parameters: dict | None, declared: int, sharded: bool
) -> None:
    model = _tiny_model(qkv_bias, rope_parameters)
    original = model.state_dict()
    max_shard_size = None
    if sharded:  # fits in exactly two shards
        sizes = [t.numel() * t.element_size() for t in original.values()]
        max_shard_size = sum(sizes) // 2 + max(sizes)

    save_hub_layout(model, tmp_path, declared_vit_layers=declared, max_shard_size=max_shard_size)

    hub = json.loads((tmp_path / "config.json").read_text())
    assert {"vit_config", "adapter_config", "text_config"} <= hub.keys() and "vision_config" not in hub
    assert hub["vit_config"]["num_hidden_layers"] == declared
    assert hub["adapter_config"]["vit_layers"] == [3 - declared, 1 - declared]  # negative, like [-3, -9]
    shards = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    if sharded:
        assert shards == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
        weight_map = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
        assert "model.transformer.blocks.0.self_attn.att_proj.bias" in weight_map
        assert "model.vision_backbone.image_vit.transformer.resblocks.3.attention.wq.weight" in weight_map
        assert not any(".resblocks.4." in key for key in weight_map)
    else:
        assert shards == ["model.safetensors"]

    reloaded, info = Molmo2ForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]

    # The declared-deeper ViT is trimmed back to the layers in use; indices come back non-negative.
    assert reloaded.config.vision_config.num_hidden_layers == 4
    assert reloaded.config.adapter_config.vision_feature_layer == [3, 1]
    assert reloaded.config.text_config.attention_bias is qkv_bias
    assert reloaded.config.text_config.rope_parameters == model.config.text_config.rope_parameters

    loaded = reloaded.state_dict()
    assert loaded.keys() == original.keys()
    for key, tensor in loaded.items():
        assert torch.equal(tensor, original[key]), key
