"""Checkpoint -> ONNX components + tokenizer + manifest, written atomically into one directory."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from PIL import Image
from tokenizers import Tokenizer

from molmocap.runtime.errors import ExportError, InputError
from molmocap.runtime.files import sha256_file, write_json_atomic
from molmocap.runtime.manifest import FORMAT_VERSION, MANIFEST_NAME
from molmocap.runtime.styles import STYLES

from .check import drawn_images, run_check, validate_reference
from .checkpoint import Checkpoint, load_checkpoint, resolve_source
from .plan import PLANS, ExportPlan
from .processing import Processing
from .text import build_decoder, build_embed
from .vision import build_adapter, build_vision

PROMPT_SLOT = "{prompt}"
IMAGE_TOKEN = "<|image|>"
DEFAULT_TEMPLATE = IMAGE_TOKEN + "<|im_start|>user\n" + PROMPT_SLOT + "<|im_end|>\n<|im_start|>assistant\n"
DEFAULT_CAPTION_PROMPT = "Describe this image."
PROMPTS_FILE = "molmocap_prompts.json"
IMAGE_STRUCTURE_TOKENS = ("<im_patch>", "<im_col>", "<im_start>", "<low_res_im_start>", "<frame_start>",
                          "<im_end>", "<frame_end>", "<im_low>")
STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")


def prompt_template(processing: Processing) -> str:
    """The checkpoint's chat template rendered for one image and one user turn, with `{prompt}` as the text slot."""
    if not processing.chat_template:
        return DEFAULT_TEMPLATE
    sentinel = "\x00MOLMOCAP_PROMPT\x00"
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": sentinel}]}]
    rendered = processing.render_chat(messages)
    if rendered.count(sentinel) != 1 or rendered.count(IMAGE_TOKEN) != 1:
        raise ExportError("the checkpoint's chat template does not place one image and one prompt")
    return rendered.replace(sentinel, PROMPT_SLOT)


def prompt_overrides(path: Path) -> dict:
    """Optional `molmocap_prompts.json` beside the checkpoint: {"caption": ..., "styles": {style: prompt}}, for
    models trained on their own phrasings (the demo model)."""
    file = path / PROMPTS_FILE
    if not file.is_file():
        return {}
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ExportError(f"cannot read {file}: {exc}") from None
    unknown = set(data) - {"caption", "styles"} | set(data.get("styles", {})) - set(STYLES)
    if unknown:
        raise ExportError(f"{file} has unknown keys or styles: {', '.join(sorted(unknown))}")
    return data


def _token_ids(tokenizer: Tokenizer, names) -> dict[str, int]:
    ids = {}
    for name in names:
        token_id = tokenizer.token_to_id(name)
        if token_id is None:
            raise ExportError(f"the tokenizer lacks the Molmo2 special token {name}")
        ids[name] = int(token_id)
    return ids


def build_manifest(ckpt: Checkpoint, quant: str, plan: ExportPlan, files: list[Path]) -> dict:
    cfg = ckpt.config
    proc = ckpt.processing
    tok = proc.tokenizer
    ip = proc.image_processor
    text, vision, adapter = cfg.text_config, cfg.vision_config, cfg.adapter_config
    structure = _token_ids(tok, IMAGE_STRUCTURE_TOKENS)
    stop = set(_token_ids(tok, [t for t in STOP_TOKENS if t in tok.get_vocab()]).values())
    eos = proc.eos_token_id
    stop |= set([eos] if isinstance(eos, int) else eos or [])
    bos = proc.bos_token
    if bos is None or tok.token_to_id(bos) is None:
        raise ExportError(f"the tokenizer has no bos or eos token in its vocabulary ({bos!r})")
    single_col = proc.flags["use_single_crop_col_tokens"]
    overrides = prompt_overrides(ckpt.path)
    return {
        "format": "molmocap",
        "format_version": FORMAT_VERSION,
        "source": ckpt.source,
        "model_type": cfg.model_type,
        "quant": quant,
        "plan": plan.to_dict(text.num_hidden_layers),
        "geometry": {
            "vision": {"hidden_size": vision.hidden_size, "num_layers": vision.num_hidden_layers,
                       "num_heads": vision.num_attention_heads, "head_dim": vision.head_dim,
                       "patch_size": vision.patch_size, "image_size": list(vision.image_size),
                       "num_patches": vision.num_position_embeddings},
            "adapter": {"vision_feature_layer": list(adapter.vision_feature_layer),
                        "intermediate_size": adapter.intermediate_size},
            "text": {"hidden_size": text.hidden_size, "num_layers": text.num_hidden_layers,
                     "num_heads": text.num_attention_heads, "num_kv_heads": text.num_key_value_heads,
                     "head_dim": text.head_dim, "intermediate_size": text.intermediate_size,
                     "vocab_size": text.vocab_size, "additional_vocab_size": text.additional_vocab_size,
                     "max_position_embeddings": text.max_position_embeddings,
                     "qk_norm_type": text.qk_norm_type, "norm_after": text.norm_after},
        },
        "tokens": {
            "bos": bos,
            "bos_id": tok.token_to_id(bos),
            "image_patch_id": cfg.image_patch_id,
            "image_structure_ids": sorted(set(structure.values())),
            "named": structure,
        },
        "stop_token_ids": sorted(stop),
        "prompt": {
            "template": prompt_template(proc),
            "image_token": IMAGE_TOKEN,
            "default_caption_prompt": overrides.get("caption", DEFAULT_CAPTION_PROMPT),
            "styles": overrides.get("styles", {}),
            "image_use_col_tokens": bool(proc.flags["image_use_col_tokens"]),
            "use_single_crop_col_tokens": bool(proc.flags["image_use_col_tokens"] if single_col is None
                                               else single_col),
            "use_single_crop_start_token": bool(proc.flags["use_single_crop_start_token"]),
        },
        "preprocess": {
            "crop_size": ip["crop_size"],
            "patch_size": ip["patch_size"],
            "overlap_margins": list(ip["overlap_margins"]),
            "pooling_size": list(ip["pooling_size"]),
            "max_crops": ip["max_crops"],
            "image_mean": list(ip["image_mean"]),
            "image_std": list(ip["image_std"]),
            "rescale_factor": ip["rescale_factor"],
        },
        "components": {"vision": "vision.onnx", "adapter": "adapter.onnx", "embed": "embed.onnx",
                       "decoder": "decoder.onnx", **({"decoder_step": "decoder_step.onnx"} if plan.step else {})},
        "files": [{"path": f.name, "bytes": f.stat().st_size, "sha256": sha256_file(f)} for f in sorted(files)],
    }


def export(src: str, out: Path, quant: str = "fp32", force: bool = False,
           progress: Callable[[str], None] = lambda msg: None, plan: ExportPlan | None = None,
           check: str | None = None, check_images: list[tuple[str, Image.Image]] | None = None) -> Path:
    """Export `src` to `out` under the `quant` plan (one of `PLANS`; or `plan`, recorded under the name `quant`,
    for the benchmarks that measure candidate plans).

    With `check` (a reference: fp32, int8, transformers or a model directory; see `check.py`), the new export is
    compared with it on `check_images` (default: drawn ones) and the figures go into the manifest's `check`.
    The directory appears whole, its check included, or not at all: it is built beside `out` and renamed into place.
    """
    if plan is None and quant not in PLANS:
        raise InputError(f"unsupported quantization {quant!r}; choose one of {', '.join(PLANS)}")
    plan = plan or PLANS[quant]
    if check is not None:
        validate_reference(check)
    out = Path(out)
    if out.exists() and not force and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"{out} already exists and is not empty (use --force to replace it)")
    start = time.perf_counter()
    path = resolve_source(src)
    try:  # before the checkpoint is read: an unwritable output is known at once
        out.parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise InputError(f"cannot write {out}: {out.parent} is not a directory") from None
    except OSError as exc:
        raise InputError(f"cannot write {out}: {exc.strerror or exc}") from None
    if not os.access(out.parent, os.W_OK | os.X_OK):
        raise InputError(f"cannot write {out}: {out.parent} is not writable")
    progress(f"reading {src}")
    ckpt = load_checkpoint(path, src)
    cfg, weights = ckpt.config, ckpt.weights
    try:
        work = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-"))
    except OSError as exc:
        raise InputError(f"cannot write {out}: {exc.strerror or exc}") from None
    floats = plan.floats
    try:
        build_vision(work / "vision.onnx", weights, cfg.vision_config, cfg.adapter_config, plan.vision, progress,
                     floats)
        progress("adapter")
        build_adapter(work / "adapter.onnx", weights, cfg.adapter_config, plan.adapter, floats)
        progress("embeddings")
        build_embed(work / "embed.onnx", weights, cfg.text_config, plan.embed, floats)
        rope = ckpt.rope
        layers = cfg.text_config.num_hidden_layers
        build_decoder(work / "decoder.onnx", weights, cfg.text_config, rope, plan.decoder_layers(plan.prefill, layers),
                      plan.lm_head, progress, floats)
        if plan.step:
            build_decoder(work / "decoder_step.onnx", weights, cfg.text_config, rope,
                          plan.decoder_layers(plan.step, layers), plan.lm_head, progress, floats)
        ckpt.processing.tokenizer.save(str(work / "tokenizer.json"))
        progress("checksums")
        files = [f for f in work.iterdir() if f.is_file()]
        manifest = build_manifest(ckpt, quant, plan, files)
        write_json_atomic(work / MANIFEST_NAME, manifest)
        if check is not None:
            manifest["check"] = run_check(work, check, src, check_images or drawn_images(), progress=progress)
            write_json_atomic(work / MANIFEST_NAME, manifest)
            progress(f"check against {manifest['check']['reference']}: next-token agreement "
                     f"{manifest['check']['top1_agreement']:.1%}, logit cosine {manifest['check']['cosine_mean']:.4f}")
        work.chmod(0o755)
        if out.exists():
            shutil.rmtree(out)
        work.rename(out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    progress(f"exported {src} ({quant}) to {out} in {time.perf_counter() - start:.1f} s")
    return out
