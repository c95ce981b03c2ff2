"""The embedded demo model: which model directories hold it, and the one notice every front end shows for it.

The demo model is a tiny Molmo2 trained on synthetic colored shapes, shipped so the pipeline runs with nothing to
download; its answers about real photos are wrong. Whatever answers with it (the CLI, the server) says so, in the
same words and under the same JSON field name, `demo_model`.
"""

from __future__ import annotations

import functools
from pathlib import Path

from .errors import ModelError
from .manifest import Manifest, read_manifest

DEMO_MODEL_DIR = Path(__file__).resolve().parent.parent / "models" / "demo" / "onnx"
DEMO_MODEL_NAME = "molmocap-demo"
DEMO_NOTICE = ("note: this is molmocap's embedded demo model, a tiny model trained on synthetic colored shapes: a "
               "pipeline check, not a real captioner. For real captions export allenai/Molmo2-4B on a machine with "
               "internet (molmocap export allenai/Molmo2-4B -o DIR --quant int4) and pass --model DIR or set "
               "MOLMOCAP_MODEL")


@functools.cache
def _demo_model_id() -> str | None:
    try:
        return read_manifest(DEMO_MODEL_DIR).model_id
    except ModelError:
        return None  # not shipped in this install: no model is the demo model


def is_demo_model(manifest: Manifest) -> bool:
    """Whether `manifest` is the embedded demo model's, wherever its directory is (a copy is still the demo)."""
    return manifest.model_id == _demo_model_id()
