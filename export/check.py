"""`molmocap export --check`: what a new export costs in answers, measured against a higher-precision reference.

The new export (the candidate) reads a few images with the model's caption prompt and decodes greedily; its tokens
are then fed to the reference, so both predict every next token under the same context (`fidelity.py`). The
figures (top-1 agreement, logit cosine) go into the manifest's `check` section, where `molmocap info` shows them
and the CLI warns at load when they are poor. The reference is another export of the same checkpoint (`fp32` or
`int8`, made into a temporary folder beside the output and removed after), an exported model directory, or the
source checkpoint itself through transformers (`transformers`, fp32; needs torch and transformers).

One model is loaded at a time (the candidate, then the reference), so the check needs no more memory than the
larger of the two.
"""

from __future__ import annotations

import contextlib
import datetime
import math
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from molmocap.runtime.captioner import Captioner
from molmocap.runtime.errors import InputError
from molmocap.runtime.image_io import load_image
from molmocap.runtime.manifest import Manifest, load_manifest, read_manifest

from .fidelity import compare, teacher_forced_logits, transformers_logits

POSITIONS = 48  # teacher-forced next tokens per image
MAX_CROPS = 1  # the check measures the weights, not the tiling: one crop keeps prompts short (425 tokens at 640x480)
TRANSFORMERS = "transformers"
EXPORT_REFERENCES = ("fp32", "int8")


def default_reference(quant: str) -> str:
    """The reference a plan is checked against when none is given: fp32 for int8 and fp16, transformers for fp32
    (the source itself), int8 for plans with 4-bit parts (an fp32 export of a 4B model needs 20 GB of memory)."""
    return {"fp32": TRANSFORMERS, "int8": "fp32", "fp16": "fp32"}.get(quant, "int8")


def validate_reference(reference: str) -> None:
    """Refuse, before any export work, a reference that cannot be used: transformers not installed, or a directory
    that is not an exported model."""
    if reference == TRANSFORMERS:
        try:
            import torch  # noqa: F401
            import transformers  # noqa: F401
        except ImportError:
            raise InputError("--check-against transformers needs torch and transformers, which are not installed; "
                             "check against fp32, int8 or an exported model directory") from None
    elif reference not in EXPORT_REFERENCES:
        read_manifest(reference)


def drawn_images() -> list[tuple[str, Image.Image]]:
    """Three 640x480 pictures drawn with Pillow (shapes, text on stripes, a textured gradient), so a check needs
    no image files."""
    y, x = np.mgrid[0:480, 0:640]
    rng = np.random.default_rng(0)
    shapes = Image.new("RGB", (640, 480), (200, 200, 200))
    draw = ImageDraw.Draw(shapes)
    draw.ellipse((60, 80, 260, 280), fill=(220, 30, 30))
    draw.polygon([(400, 60), (330, 200), (470, 200)], fill=(30, 160, 60))
    draw.rectangle((360, 260, 560, 420), fill=(30, 60, 220))
    stripes = Image.fromarray(np.where((x // 40) % 2 == 0, 240, 40).astype(np.uint8)[..., None].repeat(3, axis=-1))
    draw = ImageDraw.Draw(stripes)
    draw.rectangle((120, 180, 520, 300), fill=(250, 230, 60))
    draw.text((160, 220), "STOP 42", fill=(0, 0, 0), font_size=48)
    gradient = np.stack([x * 255 / 640, y * 255 / 480, (x + y) % 256], axis=-1) + rng.normal(0, 30, (480, 640, 3))
    texture = Image.fromarray(np.clip(gradient, 0, 255).astype(np.uint8))
    return [("drawn:shapes", shapes), ("drawn:text", stripes), ("drawn:texture", texture)]


def resolve_images(paths: list[str]) -> list[tuple[str, Image.Image]]:
    """The check's images: `paths` loaded (a bad one is an `InputError` before any export), else `drawn_images`."""
    return [(path, load_image(path)) for path in paths] if paths else drawn_images()


def run_check(candidate_dir: Path, reference: str, source: str, images: list[tuple[str, Image.Image]],
              threads: int | None = None, progress: Callable[[str], None] = lambda msg: None) -> dict:
    """Compare the export in `candidate_dir` with `reference` (a plan name in `EXPORT_REFERENCES`, `transformers`,
    or an exported model directory) on `images`; returns the manifest's `check` section."""
    candidate = Captioner(read_manifest(candidate_dir), threads=threads)
    prompt = candidate.manifest.prompt["default_caption_prompt"]
    pictures = [image for _, image in images]
    progress(f"check: the new export reads {len(images)} images")
    ours, fed = [], []
    for image in pictures:
        logits, tokens = teacher_forced_logits(candidate, image, prompt, None, POSITIONS, MAX_CROPS)
        ours.append(logits)
        fed.append(tokens)
    candidate_manifest = candidate.manifest
    del candidate
    if reference == TRANSFORMERS:
        progress(f"check: {source} through transformers (fp32)")
        theirs = transformers_logits(source, pictures, prompt, fed, POSITIONS, MAX_CROPS)
        label, reference_id = "transformers-fp32", None
    else:
        with _reference_dir(reference, source, candidate_dir.parent, progress) as (manifest, label):
            ref = Captioner(manifest, threads=threads)
            _check_same_model(ref.manifest, candidate_manifest)
            progress(f"check: the reference ({label}) reads the same images")
            theirs = [teacher_forced_logits(ref, image, prompt, tokens, POSITIONS, MAX_CROPS)[0]
                      for image, tokens in zip(pictures, fed)]
            reference_id = ref.manifest.model_id
    per_image = [{"image": name, **_rounded(compare(ref_logits, cand_logits))}
                 for (name, _), ref_logits, cand_logits in zip(images, theirs, ours)]
    return {"reference": label, **({"reference_model_id": reference_id} if reference_id else {}),
            **_rounded(compare(np.concatenate(theirs), np.concatenate(ours))), "per_image": per_image,
            "prompt": prompt, "max_crops": MAX_CROPS, "date": datetime.date.today().isoformat()}


def _rounded(figures: dict[str, float]) -> dict[str, float]:
    """Figures to 4 decimals; a cosine that is not a number (an export that computes NaN) counts as 0, so the
    manifest stays valid JSON and the check reads as poor."""
    return {key: round(value if math.isfinite(value) else 0.0, 4) if isinstance(value, float) else value
            for key, value in figures.items()}


@contextlib.contextmanager
def _reference_dir(reference: str, source: str, beside: Path,
                   progress: Callable[[str], None]) -> Iterator[tuple[Manifest, str]]:
    """The reference's manifest and label: an export of `source` made into a temporary folder beside the candidate
    (removed on exit), or a model directory given by the user (its files verified)."""
    if reference not in EXPORT_REFERENCES:
        yield load_manifest(reference), str(Path(reference).resolve())
        return
    from .exporter import export

    temporary = Path(tempfile.mkdtemp(dir=beside, prefix=".check-reference-"))
    try:
        progress(f"check: exporting the {reference} reference")
        yield read_manifest(export(source, temporary / "model", quant=reference, progress=progress)), reference
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def _check_same_model(reference: Manifest, candidate: Manifest) -> None:
    """Refuse a reference that holds another model (another tokenizer or text geometry): its figures would mean
    nothing."""
    def tokenizer_sha(manifest: Manifest) -> str | None:
        return next((entry["sha256"] for entry in manifest.data["files"] if entry["path"] == "tokenizer.json"), None)

    if tokenizer_sha(reference) != tokenizer_sha(candidate) or reference.geometry["text"] != candidate.geometry["text"]:
        raise InputError(f"the check's reference {reference.root} holds another model (its tokenizer or text "
                         "geometry differs from the export's)")
