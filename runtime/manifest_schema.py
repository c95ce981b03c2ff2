"""The shape of a `molmocap.json` manifest: every field the runtime reads, with its type, checked once at load.

A manifest edited by hand, cut short or written by another tool would otherwise fail deep inside captioning (a
KeyError in the decoder, numpy comparing a string with an int) with a traceback, or not fail at all and run with
nonsense; checked here, it is one `ModelError` line naming the field. Fields the runtime does not read (source,
plan, quant, geometry.vision, the check's details) are not checked, nor are unknown ones; `check` (the figures of
`molmocap export --check`) is optional, so manifests written before it stay valid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from .preprocess import PreprocessConfig


@dataclass(frozen=True)
class Integer:
    """An int (not a bool) of at least `minimum`."""

    minimum: int = 0


@dataclass(frozen=True)
class ListOf:
    """A list of `item`s, of exactly `length` items when given."""

    item: Any
    length: int | None = None


@dataclass(frozen=True)
class MapOf:
    """An object whose keys are free and whose values are all `value`s."""

    value: Any


@dataclass(frozen=True)
class Optional:
    """A field that may be absent (a default applies); when present it is `spec`."""

    spec: Any


NUMBER = float  # an int or a finite float
_NAMES = {str: "a string", bool: "true or false"}
POSITIVE = Integer(1)
INDEX = Integer(0)

SCHEMA = {
    "geometry": {"text": {"hidden_size": POSITIVE, "num_layers": POSITIVE, "num_kv_heads": POSITIVE,
                          "head_dim": POSITIVE, "max_position_embeddings": POSITIVE}},
    "tokens": {"bos": str, "image_patch_id": INDEX, "image_structure_ids": ListOf(INDEX), "named": MapOf(INDEX)},
    "prompt": {"template": str, "image_token": str, "default_caption_prompt": str, "image_use_col_tokens": bool,
               "use_single_crop_col_tokens": bool, "use_single_crop_start_token": bool,
               "styles": Optional(MapOf(str))},
    "preprocess": {"crop_size": Optional(POSITIVE), "patch_size": Optional(POSITIVE),
                   "overlap_margins": Optional(ListOf(INDEX, 2)), "pooling_size": Optional(ListOf(POSITIVE, 2)),
                   "max_crops": Optional(POSITIVE), "image_mean": Optional(ListOf(NUMBER, 3)),
                   "image_std": Optional(ListOf(NUMBER, 3)), "rescale_factor": Optional(NUMBER)},
    "stop_token_ids": ListOf(INDEX),
    "components": {"vision": str, "adapter": str, "embed": str, "decoder": str, "decoder_step": Optional(str)},
    "files": ListOf({"path": str, "bytes": INDEX, "sha256": str}),
    "check": Optional({"reference": str, "positions": POSITIVE, "top1_agreement": NUMBER, "cosine_mean": NUMBER}),
}


def manifest_problem(data: Any) -> str | None:
    """What is wrong with a parsed manifest, in a few words naming the field; None when the runtime can use it.

    Beyond the types: the prompt template holds `{prompt}` once, the preprocessing settings make a valid
    `PreprocessConfig`, every listed path stays inside the model directory, and every file the runtime opens
    (tokenizer.json, each component and its `.data` weights file) is listed, so that its sha256 is checked.
    """
    problem = _problem(data, SCHEMA, "")
    if problem:
        return problem
    if data["prompt"]["template"].count("{prompt}") != 1:
        return "prompt.template must hold {prompt} exactly once"
    if set(data["components"]) - set(SCHEMA["components"]):
        return f"unknown components {', '.join(sorted(set(data['components']) - set(SCHEMA['components'])))}"
    try:
        PreprocessConfig.from_dict(data["preprocess"])
    except ValueError as exc:
        return f"preprocess: {exc}"
    listed = set()
    for entry in data["files"]:
        path = PurePosixPath(entry["path"])
        if path.is_absolute() or not path.parts or ".." in path.parts or "\\" in entry["path"]:
            return f"files lists {entry['path']!r}, which is not a path inside the model directory"
        listed.add(str(path))
    for name in ("tokenizer.json", *data["components"].values()):
        if str(PurePosixPath(name)) not in listed:
            return f"{name} is used but not listed in files (so no checksum covers it)"
    return None


def unlisted_weights(data: dict, present: set[str]) -> list[str]:
    """The components' `.data` weights files that are in the directory (`present`) but not listed in files."""
    listed = {str(PurePosixPath(entry["path"])) for entry in data["files"]}
    return [f"{name}.data" for name in data["components"].values()
            if f"{name}.data" in present and f"{name}.data" not in listed]


def _problem(value: Any, spec: Any, where: str) -> str | None:
    """The first place where `value` does not fit `spec`, as `field: what it should be`; None when it fits."""
    if isinstance(spec, dict):
        if not isinstance(value, dict):
            return f"{where or 'the manifest'} must be an object"
        for key, inner in spec.items():
            field = f"{where}.{key}" if where else key
            if key not in value:
                if isinstance(inner, Optional):
                    continue
                return f"{field} is missing"
            problem = _problem(value[key], inner.spec if isinstance(inner, Optional) else inner, field)
            if problem:
                return problem
        return None
    if isinstance(spec, ListOf):
        if not isinstance(value, list) or (spec.length is not None and len(value) != spec.length):
            return f"{where} must be a list" + (f" of {spec.length} items" if spec.length is not None else "")
        return next(filter(None, (_problem(item, spec.item, f"{where}[{i}]") for i, item in enumerate(value))), None)
    if isinstance(spec, MapOf):
        if not isinstance(value, dict):
            return f"{where} must be an object"
        return next(filter(None, (_problem(item, spec.value, f"{where}.{key}") for key, item in value.items())), None)
    if isinstance(spec, Integer):
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= spec.minimum
        return None if ok else f"{where} must be an integer of at least {spec.minimum}, not {value!r:.40}"
    if spec is NUMBER:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        return None if ok else f"{where} must be a number, not {value!r:.40}"
    return None if isinstance(value, spec) else f"{where} must be {_NAMES[spec]}, not {value!r:.40}"
