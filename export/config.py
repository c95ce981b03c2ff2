"""A Molmo2 `config.json` read without transformers, in either layout: transformers' own (`vision_config`,
`rope_parameters`) or the hub's original one (`vit_config`, `vit_layers`, `rope_theta`/`rope_scaling`, `qkv_bias`).

Defaults and conversions are those of transformers' `Molmo2Config` (5.x), which tests/test_checkpoint.py checks
field by field; only the fields the exporter reads are kept.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from molmocap.runtime.errors import ExportError


def _build(cls, data: dict, renames: dict[str, str]):
    """`cls` from the JSON object `data` (legacy key names renamed), ignoring keys the exporter has no use for."""
    data = {renames.get(key, key): value for key, value in data.items()}
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{key: value for key, value in data.items() if key in names})


@dataclass
class VisionConfig:
    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_hidden_layers: int = 25
    num_attention_heads: int = 16
    num_key_value_heads: int = 16
    head_dim: int = 72
    layer_norm_eps: float = 1e-6
    image_size: list[int] | None = None
    patch_size: int = 14
    num_position_embeddings: int | None = None
    num_channels: int = 3

    def __post_init__(self) -> None:
        if self.image_size is None:
            self.image_size = [378, 378]
        if self.num_position_embeddings is None:
            self.num_position_embeddings = (self.image_size[0] // self.patch_size) * (
                self.image_size[1] // self.patch_size)


@dataclass
class AdapterConfig:
    vision_feature_layer: list[int] | None = None
    hidden_size: int = 1152
    num_attention_heads: int = 16
    num_key_value_heads: int = 16
    head_dim: int = 72
    intermediate_size: int = 18944
    text_hidden_size: int = 3584

    def __post_init__(self) -> None:
        if self.vision_feature_layer is None:
            self.vision_feature_layer = [24, 18]


@dataclass
class TextConfig:
    hidden_size: int = 4096
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int = 128
    vocab_size: int = 151936
    additional_vocab_size: int = 128
    attention_bias: bool = False
    qk_norm_type: str = "qwen3"
    num_hidden_layers: int = 36
    intermediate_size: int = 12288
    max_position_embeddings: int = 36864
    rope_parameters: dict = field(default_factory=dict)
    rope_scaling_layers: list[int] | None = None
    rms_norm_eps: float = 1e-6
    norm_after: bool = False

    def __post_init__(self) -> None:
        if self.rope_scaling_layers is None:
            self.rope_scaling_layers = list(range(self.num_hidden_layers))


@dataclass
class Molmo2Config:
    """The parts of a Molmo2 config the exporter reads, named as transformers names them."""

    text_config: TextConfig
    vision_config: VisionConfig
    adapter_config: AdapterConfig
    image_patch_id: int = 151938
    model_type: str = "molmo2"


def _rope_parameters(text: dict) -> dict:
    """transformers' standardization: `rope_scaling` (legacy) or `rope_parameters`, with `rope_theta` (default
    10000), `rope_type` (from a legacy `type`) and, for yarn/llama3, `original_max_position_embeddings` filled in."""
    params = dict(text.get("rope_scaling") or text.get("rope_parameters") or {})
    params.setdefault("rope_theta", text.get("rope_theta", 10_000.0))
    params.setdefault("rope_type", params.get("type", "default"))
    if params["rope_type"] in ("llama3", "yarn", "longrope"):
        params.setdefault("original_max_position_embeddings", text.get("max_position_embeddings", 36864))
    return params


def parse_config(data: dict) -> Molmo2Config:
    """A config.json object as transformers' Molmo2Config reads it (a checkpoint's ViT declared deeper than its
    weights, in the hub layout, is trimmed to the deepest layer the adapter reads, as transformers does)."""
    legacy = data.get("vision_config") is None and data.get("vit_config") is not None
    vision = _build(VisionConfig, (data.get("vision_config") or data.get("vit_config") or {}),
                    {"image_default_input_size": "image_size", "image_patch_size": "patch_size",
                     "image_num_pos": "num_position_embeddings"})
    adapter = _build(AdapterConfig, data.get("adapter_config") or {}, {"vit_layers": "vision_feature_layer"})
    text_data = data.get("text_config") or {}
    text = _build(TextConfig, {**text_data, "rope_parameters": _rope_parameters(text_data)},
                  {"qkv_bias": "attention_bias", "layer_norm_eps": "rms_norm_eps"})
    if legacy:
        adapter.vision_feature_layer = [layer % vision.num_hidden_layers for layer in adapter.vision_feature_layer]
        vision.num_hidden_layers = max(adapter.vision_feature_layer) + 1
    top = {key: data[key] for key in ("image_patch_id", "model_type") if key in data}
    return Molmo2Config(text_config=text, vision_config=vision, adapter_config=adapter, **top)


def load_config(path: Path) -> Molmo2Config:
    """`path`/config.json, or one ExportError line saying why it cannot be read."""
    file = path / "config.json"
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        return parse_config(data)
    except (OSError, UnicodeDecodeError, ValueError, TypeError, ZeroDivisionError) as exc:
        raise ExportError(f"cannot load a Molmo2 config from {path}: {exc}".splitlines()[0]) from None
