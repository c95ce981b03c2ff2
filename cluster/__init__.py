"""Captioning past one machine: `molmocap caption DIR -o OUT_DIR --ray` runs the batch on a Ray cluster.

Ray is an optional extra (`pip install "molmocap[ray]"`). Nothing here imports it until a command asks for `--ray`,
and the runtime (`molmocap.runtime`) never does, so `molmocap` and every other command work without it.
"""

from __future__ import annotations

from molmocap.runtime.errors import InputError

RAY_EXTRA = 'pip install "molmocap[ray]"'


def require_ray() -> None:
    """An `InputError` naming the extra to install when Ray Data is missing, before any work starts."""
    try:
        import ray.data  # noqa: F401
    except ImportError:
        raise InputError(f"--ray needs Ray Data, which is not installed: {RAY_EXTRA}") from None
