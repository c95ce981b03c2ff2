"""A checkpoint's tensors, read one at a time from its safetensors shards, under transformers' parameter names.

Both layouts on disk are understood: the hub's original names (fused `att_proj` = q|k|v, `ff_proj` = up|gate, the
embedding split into `wte.embedding` + `wte.new_embedding`; transformers 5.x also saves these names) and
transformers' own names. Nothing is loaded until asked for, so exporting the 4B model holds about one tensor in
float32 at a time.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from molmocap.runtime.errors import ExportError

from .safetensors_io import TensorEntry, read_header, read_tensor

_T = "model.transformer"
_V = "model.vision_backbone"
_RENAMES = [
    (r"model\.language_model\.norm\.weight", f"{_T}.ln_f.weight"),
    (r"model\.language_model\.layers\.(\d+)\.input_layernorm\.weight", rf"{_T}.blocks.\1.attn_norm.weight"),
    (r"model\.language_model\.layers\.(\d+)\.post_attention_layernorm\.weight", rf"{_T}.blocks.\1.ff_norm.weight"),
    (r"model\.language_model\.layers\.(\d+)\.self_attn\.o_proj\.(\w+)", rf"{_T}.blocks.\1.self_attn.attn_out.\2"),
    (r"model\.language_model\.layers\.(\d+)\.self_attn\.([qk]_norm)\.weight", rf"{_T}.blocks.\1.self_attn.\2.weight"),
    (r"model\.language_model\.layers\.(\d+)\.mlp\.down_proj\.weight", rf"{_T}.blocks.\1.mlp.ff_out.weight"),
    (r"model\.vision_tower\.(positional_embedding|patch_embedding\.\w+)", rf"{_V}.image_vit.\1"),
    (r"model\.vision_tower\.layers\.(\d+)\.self_attn\.([qkvo])_proj\.(\w+)",
     rf"{_V}.image_vit.transformer.resblocks.\1.attention.w\2.\3"),
    (r"model\.vision_tower\.layers\.(\d+)\.layer_norm1\.(\w+)",
     rf"{_V}.image_vit.transformer.resblocks.\1.attention_norm.\2"),
    (r"model\.vision_tower\.layers\.(\d+)\.layer_norm2\.(\w+)",
     rf"{_V}.image_vit.transformer.resblocks.\1.ffn_norm.\2"),
    (r"model\.vision_tower\.layers\.(\d+)\.mlp\.fc([12])\.(\w+)",
     rf"{_V}.image_vit.transformer.resblocks.\1.feed_forward.w\2.\3"),
    (r"model\.multi_modal_projector\.image_pooling_2d\.([qkvo])_proj\.(\w+)", rf"{_V}.image_pooling_2d.w\1.\2"),
    (r"model\.multi_modal_projector\.image_projector\.gate_proj\.weight", f"{_V}.image_projector.w1.weight"),
    (r"model\.multi_modal_projector\.image_projector\.down_proj\.weight", f"{_V}.image_projector.w2.weight"),
    (r"model\.multi_modal_projector\.image_projector\.up_proj\.weight", f"{_V}.image_projector.w3.weight"),
]
_QKV = re.compile(r"model\.language_model\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)")
_UP_GATE = re.compile(r"model\.language_model\.layers\.(\d+)\.mlp\.(up|gate)_proj\.weight")
EMBED = "model.language_model.embed_tokens.weight"


class Weights:
    """Float32 tensors by transformers name, streamed from the safetensors files of a checkpoint directory."""

    def __init__(self, path: Path, text_config) -> None:
        self.path = path
        self.text_config = text_config
        index = path / "model.safetensors.index.json"
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else []
        except (OSError, ValueError, KeyError, AttributeError) as exc:
            raise ExportError(f"cannot load the weights of {path}: bad {index.name}: {exc}") from None
        self._entries: dict[str, tuple[str, TensorEntry]] = {}
        for name in names or ["model.safetensors"]:  # every header is read and checked up front
            self._entries.update((key, (name, entry)) for key, entry in read_header(path / name).items())
        self._fused: tuple[str, np.ndarray] | None = None

    def _shape(self, key: str) -> tuple[int, ...]:
        return self._entries[key][1].shape

    def _read(self, key: str, out: np.ndarray | None = None) -> np.ndarray:
        """One tensor as float32 (into `out` when given). The shard is mapped only while reading, so its pages
        leave this process's memory again, and the dtype conversion writes straight into the result."""
        if key not in self._entries:
            raise ExportError(f"the checkpoint has no tensor {key}")
        name, entry = self._entries[key]
        return read_tensor(self.path / name, entry, out)

    def _read_fused(self, key: str) -> np.ndarray:
        """Read a fused tensor once for its several parts."""
        if self._fused is None or self._fused[0] != key:
            self._fused = (key, self._read(key))
        return self._fused[1]

    def _source(self, name: str) -> str | None:
        """The on-disk key of a plainly renamed tensor, or None."""
        if name in self._entries:
            return name
        for pattern, replacement in _RENAMES:
            if re.fullmatch(pattern, name):
                key = re.sub(pattern, replacement, name)
                return key if key in self._entries else None
        return None

    def has(self, name: str) -> bool:
        if match := _QKV.fullmatch(name):
            return f"{_T}.blocks.{match[1]}.self_attn.att_proj.{match[3]}" in self._entries or name in self._entries
        if match := _UP_GATE.fullmatch(name):
            return f"{_T}.blocks.{match[1]}.mlp.ff_proj.weight" in self._entries or name in self._entries
        return self._source(name) is not None or name in (EMBED, "lm_head.weight")

    def get(self, name: str) -> np.ndarray:
        """The tensor `name` as float32 numpy, assembled from fused or split on-disk tensors where needed."""
        source = self._source(name)
        if source is not None:
            return self._read(source)
        cfg = self.text_config
        if match := _QKV.fullmatch(name):
            fused = self._read_fused(f"{_T}.blocks.{match[1]}.self_attn.att_proj.{match[3]}")
            q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
            start, size = {"q": (0, q), "k": (q, kv), "v": (q + kv, kv)}[match[2]]
            return fused[start:start + size]
        if match := _UP_GATE.fullmatch(name):
            fused = self._read_fused(f"{_T}.blocks.{match[1]}.mlp.ff_proj.weight")
            half = fused.shape[0] // 2
            return fused[:half] if match[2] == "up" else fused[half:]
        if name == EMBED:
            parts = [f"{_T}.wte.embedding", f"{_T}.wte.new_embedding"]
            rows = [self._shape(part)[0] for part in parts]
            table = np.empty((sum(rows), self._shape(parts[0])[1]), dtype=np.float32)
            self._read(parts[0], table[: rows[0]])
            self._read(parts[1], table[rows[0]:])
            return table
        if name == "lm_head.weight":
            return self.get(EMBED)[: cfg.vocab_size]
        raise ExportError(f"the checkpoint has no tensor for {name}")
