"""Open a Molmo2 checkpoint (local directory in the hub's or transformers' layout, or a hub id) for export."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from molmocap.runtime.errors import ExportError, InputError

from .config import Molmo2Config, load_config
from .processing import Processing, load_processing
from .rope import rope_tables
from .weights import Weights

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class Checkpoint:
    """A source opened for export: config, tokenizer and processor settings, and lazily read weights."""

    config: Molmo2Config
    processing: Processing
    weights: Weights
    rope: dict[str, tuple[np.ndarray, float]]  # "scaled"/"unscaled" -> (inv_freq, attention scaling)
    source: str
    path: Path


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
    """Open a resolved checkpoint directory from its files alone (no torch, no transformers): the config (the
    hub's legacy keys included), tokenizer and processor settings; weights stay on disk until the exporter asks
    for them. `source` is what the user named."""
    config = load_config(path)
    tables = rope_tables(config.text_config)  # an unsupported RoPE fails before anything is read
    return Checkpoint(config=config, processing=load_processing(path), weights=Weights(path, config.text_config),
                      rope=tables, source=source, path=path)
