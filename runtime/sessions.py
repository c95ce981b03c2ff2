"""ONNX Runtime sessions for the four components, on CPU or CUDA."""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort

from .errors import ModelError


def providers(device: str) -> list[str]:
    """Execution providers for `device` ("cpu", "cuda" or "auto": CUDA when this onnxruntime has it)."""
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" in ort.get_available_providers():
        if hasattr(ort, "preload_dlls"):
            ort.preload_dlls()  # CUDA and cuDNN from the nvidia-* wheels, where onnxruntime-gpu expects them
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device == "cuda":
        raise ModelError("CUDA was asked for, but this onnxruntime has no CUDAExecutionProvider "
                         "(install onnxruntime-gpu)")
    return ["CPUExecutionProvider"]


def open_session(path: Path, threads: int | None, device: str) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    chosen = providers(device)
    try:
        session = ort.InferenceSession(str(path), sess_options=options, providers=chosen)
    except Exception as exc:  # noqa: BLE001 - a corrupt or foreign file becomes one clear line
        raise ModelError(f"cannot load {path}: {str(exc).splitlines()[0]}") from None
    if device == "cuda" and session.get_providers()[0] != "CUDAExecutionProvider":
        raise ModelError("CUDA was asked for, but ONNX Runtime's CUDA provider did not start (check the CUDA and "
                         "cuDNN libraries onnxruntime-gpu needs)")
    return session
