"""molmocap export: a Molmo2 checkpoint to ONNX components and a manifest (needs the `export` extra: onnx, jinja2;
no torch, no transformers)."""

from __future__ import annotations

import importlib

from molmocap.runtime.errors import InputError

EXTRA_MODULES = ("onnx", "jinja2")


def require_export_extra() -> None:
    """One clear line, before any work, when the packages of `pip install "molmocap[export]"` are missing."""
    missing = []
    for name in EXTRA_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise InputError(f"molmocap export needs {', '.join(missing)}, which are not installed: "
                         'pip install "molmocap[export]"')
