"""ONNX Runtime sessions for the four components, on CPU or CUDA, each checked to be the graph its role needs.

The manifest's checksums say the files are the exported bytes, not that each file is the right graph: a model
assembled by hand (vision.onnx holding the adapter, a decoder from a model of other sizes, checksums updated to
match) would load and then fail inside ONNX Runtime with a traceback on the first image. So each session's input
and output names, element types and fixed dimensions are compared with what the runtime will feed it and read from
it, derived from the manifest's geometry and preprocessing, and a mismatch is one `ModelError` before any image.
The KV cache is the one place with a choice of element type (float32, or float16 from the GPU plans), the same in
every layer and every decoder graph, since the runtime allocates it once for both.
"""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort

from .errors import ModelError
from .manifest import Manifest
from .preprocess import PreprocessConfig

FLOAT, FLOAT16, INT64, INT32 = "tensor(float)", "tensor(float16)", "tensor(int64)", "tensor(int32)"
KV_TYPES = (FLOAT, FLOAT16)  # what a KV cache buffer may hold
# name -> (element type or the types allowed, dimensions: an int where fixed, None where free; None for no rank check)
Signature = dict[str, tuple[str | tuple[str, ...], list[int | None] | None]]


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


_arena_shared = False  # set once this process's ONNX Runtime environment holds the shared CPU arena


def share_cpu_arena() -> None:
    """Give this process's sessions one CPU memory arena, registered once in ONNX Runtime's environment.

    A model's sessions run one after another (vision, adapter, embedding, decoder), never at once on one request;
    with an arena each, every one keeps the peak of its own temporaries for the life of the process, and the
    process holds their sum. Shared, they reuse one another's freed blocks (measured on the 4B int4 at max_crops
    8: benchmarks/profile_engine.py, part memory).
    """
    global _arena_shared
    if _arena_shared:
        return
    info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
    try:
        ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, 0, -1, -1))  # ONNX Runtime's default arena
    except Exception:  # noqa: BLE001 - the host application registered one already: share that one
        pass
    _arena_shared = True


def open_session(path: Path, threads: int | None, device: str) -> ort.InferenceSession:
    share_cpu_arena()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    options.add_session_config_entry("session.use_env_allocators", "1")
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


def signatures(manifest: Manifest, config: PreprocessConfig) -> dict[str, tuple[Signature, Signature]]:
    """(inputs, outputs) each component must have, from what `vision`, `decoder` and `Captioner` feed and read."""
    text = manifest.geometry["text"]
    hidden, kv = text["hidden_size"], [None, text["num_kv_heads"], None, text["head_dim"]]
    patches = (config.crop_size // config.patch_size) ** 2
    past = {f"past_key_values.{i}.{kind}": (KV_TYPES, kv)
            for i in range(text["num_layers"]) for kind in ("key", "value")}
    decoder = ({"inputs_embeds": (FLOAT, [None, None, hidden]), "attention_bias": (FLOAT, [None, 1, None, None]),
                "seqlens_k": (INT32, [None]), "total_sequence_length": (INT32, []), **past},
               {"logits": (FLOAT, None), **{name.replace("past_key_values.", "present."): value
                                           for name, value in past.items()}})
    return {
        "vision": ({"pixel_values": (FLOAT, [None, patches, config.patch_size ** 2 * 3])},
                   {"image_features": (FLOAT, [None, patches, None])}),
        "adapter": ({"image_features": (FLOAT, [None, None, None]),
                     "pooled_patches_idx": (INT64, [None, config.pooling_size[0] * config.pooling_size[1]])},
                    {"image_embeddings": (FLOAT, [None, hidden])}),
        "embed": ({"input_ids": (INT64, [None, None])}, {"inputs_embeds": (FLOAT, [None, None, hidden])}),
        "decoder": decoder,
        "decoder_step": decoder,
    }


def signature_problem(session: ort.InferenceSession, inputs: Signature, outputs: Signature) -> str | None:
    """How a session's inputs and outputs differ from `inputs` (exactly these) and `outputs` (at least these)."""
    have_inputs = {arg.name: arg for arg in session.get_inputs()}
    have_outputs = {arg.name: arg for arg in session.get_outputs()}
    for what, names in (("lacks the inputs", set(inputs) - set(have_inputs)),
                        ("lacks the outputs", set(outputs) - set(have_outputs)),
                        ("has unexpected inputs", set(have_inputs) - set(inputs))):
        if names:
            return f"it {what} {', '.join(sorted(names)[:4])}"
    for kind, have, wanted in (("input", have_inputs, inputs), ("output", have_outputs, outputs)):
        for name, (element, dims) in wanted.items():
            arg = have[name]
            allowed = element if isinstance(element, tuple) else (element,)
            if arg.type not in allowed:
                return f"its {kind} {name} is {arg.type}, not {' or '.join(allowed)}"
            if dims is None:
                continue
            if len(arg.shape) != len(dims) or any(isinstance(got, int) and want is not None and got != want
                                                  for got, want in zip(arg.shape, dims)):
                shown = [d if isinstance(d, int) else "?" for d in arg.shape]
                return f"its {kind} {name} has shape {shown}, not {[d if d is not None else '?' for d in dims]}"
    return None


def open_components(manifest: Manifest, config: PreprocessConfig, threads: int | None,
                    device: str) -> dict[str, ort.InferenceSession]:
    """A session per component of the manifest, each checked against `signatures`; a `ModelError` names the
    first file that is not the graph its role needs. The vision encoder's features must also be what the adapter
    takes, and the KV cache one element type in every layer of every decoder graph."""
    expected = signatures(manifest, config)
    sessions = {}
    for name, file in manifest.data["components"].items():
        path = manifest.root / file
        sessions[name] = open_session(path, threads, device)
        problem = signature_problem(sessions[name], *expected[name])
        if problem:
            raise ModelError(f"{path} is not the {name} graph this model needs ({problem}); re-export the model")
    produced = next(arg for arg in sessions["vision"].get_outputs() if arg.name == "image_features").shape[-1]
    taken = next(arg for arg in sessions["adapter"].get_inputs() if arg.name == "image_features").shape[-1]
    if isinstance(produced, int) and isinstance(taken, int) and produced != taken:
        raise ModelError(f"{manifest.component('vision')} gives {produced} features per patch, but "
                         f"{manifest.component('adapter')} takes {taken}; re-export the model")
    kv_types = {arg.type for name in ("decoder", "decoder_step") if name in sessions
                for arg in (*sessions[name].get_inputs(), *sessions[name].get_outputs())
                if arg.name.startswith(("past_key_values.", "present."))}
    if len(kv_types) > 1:
        raise ModelError(f"the decoder's KV cache mixes {' and '.join(sorted(kv_types))} between layers or graphs; "
                         "re-export the model")
    return sessions
