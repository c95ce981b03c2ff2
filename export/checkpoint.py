"""Open a Molmo2 checkpoint (local directory in the hub's or transformers' layout, or a hub id) for export."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from molmocap.runtime.errors import ExportError, InputError

from .weights import Weights

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
STATIC_ROPE_TYPES = ("default", "linear", "yarn", "llama3")


@dataclass
class Checkpoint:
    """A source opened for export: config, processor, generation settings and lazily read weights."""

    config: object
    processor: object
    generation_config: object
    weights: Weights
    source: str
    path: Path

    def rope_tables(self) -> dict[str, tuple[np.ndarray, float]]:
        """inv_freq and attention scaling of the scaled and unscaled RoPE, from transformers' own rotary modules."""
        from transformers.models.molmo2.modeling_molmo2 import Molmo2RotaryEmbedding

        return {
            kind: (module.inv_freq.detach().float().numpy(), float(module.attention_scaling))
            for kind, module in (("scaled", Molmo2RotaryEmbedding(self.config.text_config, scaled=True)),
                                 ("unscaled", Molmo2RotaryEmbedding(self.config.text_config, scaled=False)))
        }


def resolve_source(src: str) -> Path:
    """A local checkpoint directory, or a hub id downloaded now (the only place molmocap touches the network)."""
    path = Path(src).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise InputError(f"{path} has no config.json: not a Molmo2 checkpoint directory")
        return path
    if path.exists():
        raise InputError(f"{path} is not a directory")
    if not HUB_ID.match(src):
        raise InputError(f"checkpoint not found: {src} (give a local directory or a hub id such as allenai/Molmo2-4B)")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(src, allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.txt"]))
    except Exception as exc:  # noqa: BLE001 - any hub failure becomes one clear line
        message = f"could not download {src} from the hub (offline? wrong id?): {exc}"
        raise ExportError(message.splitlines()[0]) from None


def load_checkpoint(path: Path, source: str) -> Checkpoint:
    """Open a resolved checkpoint directory: transformers reads the config (the hub's legacy keys included) and the
    processor; weights stay on disk until the exporter asks for them. `source` is what the user named."""
    from transformers import GenerationConfig, Molmo2Config, Molmo2Processor

    try:
        config = Molmo2Config.from_pretrained(path)
    except Exception as exc:  # noqa: BLE001
        raise ExportError(f"cannot load a Molmo2 config from {path}: {exc}".splitlines()[0]) from None
    try:
        processor = Molmo2Processor.from_pretrained(path)
    except Exception as exc:  # noqa: BLE001
        raise ExportError(f"cannot load the Molmo2 processor/tokenizer from {path}: {exc}".splitlines()[0]) from None
    try:
        generation_config = GenerationConfig.from_pretrained(path)
    except OSError:
        generation_config = GenerationConfig()
    rope_type = config.text_config.rope_parameters.get("rope_type", "default")
    if rope_type not in STATIC_ROPE_TYPES:
        raise ExportError(f"rope_type {rope_type!r} depends on sequence length and is not supported")
    return Checkpoint(config=config, processor=processor, generation_config=generation_config,
                      weights=Weights(path, config.text_config), source=source, path=path)
