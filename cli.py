"""The `molmocap` command: export a Molmo2 checkpoint, caption images and answer questions about them, offline."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from runtime.errors import InputError, ModelError, MolmocapError
from runtime.styles import STYLES

DEFAULT_MODEL = Path(__file__).resolve().parent / "models" / "demo" / "onnx"


def resolve_model(model: str | None) -> Path:
    """--model, else $MOLMOCAP_MODEL, else the embedded demo model."""
    chosen = model or os.environ.get("MOLMOCAP_MODEL")
    if chosen:
        return Path(chosen)
    if (DEFAULT_MODEL / "molmocap.json").is_file():
        return DEFAULT_MODEL
    raise ModelError(
        f"no model given and the embedded default model ({DEFAULT_MODEL}) is not there; "
        "export one with `molmocap export CHECKPOINT -o DIR` and pass --model DIR or set MOLMOCAP_MODEL"
    )


def model_options(f):
    """Options shared by every command that runs the model."""
    for option in reversed([
        click.option("--model", "model", metavar="DIR", help="Exported model directory "
                     "(default: $MOLMOCAP_MODEL, else the embedded demo model)."),
        click.option("--max-new-tokens", type=click.IntRange(min=1), default=128, show_default=True,
                     help="Stop after this many generated tokens."),
        click.option("--max-crops", type=click.IntRange(min=1), default=None,
                     help="High-resolution crops per image (default: the model's, 8 for Molmo2)."),
        click.option("--threads", type=click.IntRange(min=1), default=None,
                     help="CPU threads for ONNX Runtime (default: all cores)."),
        click.option("--device", type=click.Choice(["cpu", "cuda", "auto"]), default="cpu", show_default=True,
                     help="Where to run: auto uses CUDA when onnxruntime-gpu is installed."),
        click.option("--json", "as_json", is_flag=True, help="One JSON object per image per line."),
        click.option("--stream", is_flag=True, help="Print the text as it is generated."),
    ]):
        f = option(f)
    return f


def run_images(images: tuple[str, ...], prompts: list[str | None], model: str | None, max_new_tokens: int,
               max_crops: int | None, threads: int | None, device: str, as_json: bool, stream: bool,
               style: str | None = None, lang: str | None = None) -> None:
    """Answer every prompt about each image in turn; every image is checked before the model runs.

    Several prompts about one image share its vision encoding and the KV cache of the image prefix.
    """
    from runtime import Captioner
    from runtime.image_io import load_image
    from runtime.styles import finish

    if as_json and stream:
        raise click.UsageError("--json and --stream cannot be combined")
    if stream and style in ("alt", "seo", "tags"):
        raise click.UsageError(f"--stream prints raw text; --style {style} cleans the whole answer afterwards")
    loaded = [load_image(image) for image in images]
    captioner = Captioner.load(resolve_model(model), threads=threads, device=device)
    if style and prompts == [None]:
        prompts = [captioner.style_prompt(style, lang)]
    several = len(images) * len(prompts) > 1
    for path, image in zip(images, loaded):
        source = captioner.encode_image(image, max_crops) if len(prompts) > 1 else image
        crops = None if len(prompts) > 1 else max_crops
        for prompt in prompts:
            label = f"{path}: " if len(prompts) == 1 else f"{path}: {prompt}: " if len(images) > 1 else f"{prompt}: "
            if stream:
                click.echo(label if several else "", nl=False)
                captioner.generate(source, prompt, max_new_tokens, crops,
                                   on_text=lambda piece: click.echo(piece, nl=False))
                click.echo()
                continue
            result = captioner.generate(source, prompt, max_new_tokens, crops)
            value = finish(style, result.text) if style else result.text
            text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
            if as_json:
                row = {"image": path, "prompt": prompt, "text": text, "token_ids": result.token_ids,
                       "prompt_tokens": result.prompt_tokens,
                       "timings": {k: round(v, 4) for k, v in result.timings.items()}}
                if style:
                    row.update(style=style, raw_text=result.text)
                    if not isinstance(value, str):
                        row["data"] = value
                click.echo(json.dumps(row, ensure_ascii=False))
            else:
                click.echo(label + text if several else text)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="molmocap")
def main() -> None:
    """Offline image captioning and visual question answering with Molmo2 on ONNX Runtime."""


@main.command()
@click.argument("src")
@click.option("-o", "--output", "out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Directory to write the ONNX model into.")
@click.option("--quant", type=click.Choice(["fp32"]), default="fp32", show_default=True,
              help="Weight precision of the exported model.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
def export(src: str, out: Path, quant: str, force: bool) -> None:
    """Export a Molmo2 checkpoint SRC (a local directory, or a hub id when online) to ONNX.

    Example: molmocap export ./Molmo2-4B -o ./molmo2-4b-onnx
    """
    from export.exporter import export as run_export

    run_export(src, out, quant=quant, force=force, progress=lambda msg: click.echo(msg, err=True))


@main.command()
@click.argument("images", nargs=-1, required=True)
@click.option("--style", type=click.Choice(STYLES), default=None,
              help="short or detailed caption, alt text (<= 125 chars), seo (JSON title/caption/keywords) "
                   "or tags (JSON list). Default: the model's caption prompt.")
@click.option("--lang", default=None, metavar="LANGUAGE", help="Ask for the caption in this language.")
@click.option("--prompt", default=None, help="Instruction to use instead of the style's (overrides --style).")
@model_options
def caption(images: tuple[str, ...], style: str | None, lang: str | None, prompt: str | None, **options) -> None:
    """Caption one or more IMAGES.

    Examples: molmocap caption photo.jpg --json; molmocap caption photo.jpg --style alt
    """
    if lang and not style and not prompt:
        style = "short"
    run_images(images, [prompt], style=None if prompt else style, lang=lang, **options)


@main.command()
@click.argument("image")
@click.argument("question", required=False)
@click.option("-q", "--question", "questions", multiple=True, help="A question; repeat to ask several, "
              "which share the image encoding and the image's KV cache.")
@model_options
def ask(image: str, question: str | None, questions: tuple[str, ...], **options) -> None:
    """Answer QUESTION (or each -q QUESTION) about IMAGE.

    Examples: molmocap ask photo.jpg "How many dogs are there?";
    molmocap ask photo.jpg -q "What color is the car?" -q "Is it raining?"
    """
    asked = ([question] if question is not None else []) + list(questions)
    if not asked:
        raise click.UsageError("give a QUESTION or at least one -q QUESTION")
    if any(not q.strip() for q in asked):
        raise InputError("the question is empty")
    run_images((image,), asked, **options)


def entry() -> None:
    """Run the command, rendering molmocap's errors as one line with their exit status."""
    try:
        main(standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except MolmocapError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    entry()
