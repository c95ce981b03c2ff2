"""The `molmocap` command: export a Molmo2 checkpoint, caption images and answer questions about them, offline."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import click

from molmocap.runtime.batching import DEFAULT_MAX_BATCH
from molmocap.runtime.demo import DEMO_MODEL_DIR, DEMO_NOTICE, is_demo_model
from molmocap.runtime.errors import InputError, ModelError, MolmocapError
from molmocap.runtime.preprocess import MAX_CROPS
from molmocap.runtime.request import DEFAULT_MAX_NEW_TOKENS, Request, rounded_timings
from molmocap.runtime.styles import STYLES

if TYPE_CHECKING:
    from molmocap.runtime.caption_files import CaptionFiles

DEFAULT_MODEL = DEMO_MODEL_DIR
POINT_MAX_NEW_TOKENS = 256  # a point answer lists coordinates for every instance: longer than a caption


def resolve_model(model: str | None, notice: bool = True) -> Path:
    """--model, else $MOLMOCAP_MODEL, else the embedded demo model; with `notice`, a model whose export check was
    poor is said once on stderr (`check_notice`)."""
    chosen = model or os.environ.get("MOLMOCAP_MODEL")
    if chosen:
        if notice:
            check_notice(Path(chosen))
        return Path(chosen)
    if (DEFAULT_MODEL / "molmocap.json").is_file():
        return DEFAULT_MODEL
    raise ModelError(
        f"no model given and the embedded default model ({DEFAULT_MODEL}) is not there; "
        "export one with `molmocap export CHECKPOINT -o DIR` and pass --model DIR or set MOLMOCAP_MODEL"
    )


def check_notice(model_dir: Path) -> None:
    """One stderr line when `molmocap export --check` found this model's next tokens far from its reference's."""
    from molmocap.runtime.manifest import read_manifest
    from molmocap.runtime.quality import poor_check_notice

    try:
        message = poor_check_notice(read_manifest(model_dir).data.get("check"))
    except ModelError:
        return  # loading the model reports it, in its own words
    if message:
        click.echo(message, err=True)


def demo_notice(demo: bool) -> None:
    """After the demo model answered: say on stderr what it is and how to get a real model, unless --quiet."""
    if demo and not click.get_current_context().find_root().params["quiet"]:
        click.echo(DEMO_NOTICE, err=True)


def _options(options: list) -> Callable:
    def decorate(f):
        for option in reversed(options):
            f = option(f)
        return f
    return decorate


# Where the model comes from and where it runs: every command that loads one.
engine_options = _options([
    click.option("--model", "model", metavar="DIR", help="Exported model directory "
                 "(default: $MOLMOCAP_MODEL, else the embedded demo model)."),
    click.option("--threads", type=click.IntRange(min=1), default=None,
                 help="CPU threads for ONNX Runtime (default: all cores)."),
    click.option("--device", type=click.Choice(["cpu", "cuda", "auto"]), default="cpu", show_default=True,
                 help="Where to run: auto uses CUDA when onnxruntime-gpu is installed."),
])


def generation_options(max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> Callable:
    """--max-new-tokens and --max-crops, the generation options of a `Request`."""
    return _options([
        click.option("--max-new-tokens", type=click.IntRange(min=1), default=max_new_tokens, show_default=True,
                     help="Stop after this many generated tokens."),
        click.option("--max-crops", type=click.IntRange(1, MAX_CROPS), default=None,
                     help=f"High-resolution crops per image, at most {MAX_CROPS} "
                          "(default: the model's, 8 for Molmo2)."),
    ])


# Options shared by caption and ask.
model_options = _options([
    engine_options,
    generation_options(),
    click.option("--json", "as_json", is_flag=True, help="One JSON object per image per line."),
    click.option("--stream", is_flag=True, help="Print the text as it is generated."),
    click.option("--no-cache", is_flag=True, help="Neither read nor write the result cache "
                 "($MOLMOCAP_CACHE_DIR, default ~/.cache/molmocap)."),
])


def run_images(images: tuple[str, ...], requests: list[Request], model: str | None, threads: int | None,
               device: str, as_json: bool, stream: bool, no_cache: bool = False, write_xmp: bool = False,
               force: bool = False) -> None:
    """Answer every request about each image in turn, streaming: each image is read, checked and decoded just before
    its turn, so memory does not grow with the number of images and the first answer comes at once.

    With several images a bad one (unreadable, corrupt, its prompt too long, a sidecar it must not replace) is
    reported as one `error:` line and the others go on; the command then ends with exit status 2, as `-o` does.
    With one image its error is the command's. Several questions about one image share its vision encoding and the
    KV cache of the image prefix. Results come from the result cache when it has them (the model is then not even
    loaded).
    """
    from molmocap.runtime.batch import Runner, file_sha256
    from molmocap.runtime.cache import ResultCache
    from molmocap.runtime.files import remove_leftovers
    from molmocap.runtime.image_io import load_image
    from molmocap.runtime.styles import StyleOutputError
    from molmocap.runtime.xmp import check_sidecar, sidecar_path, write_sidecar

    if as_json and stream:
        raise click.UsageError("--json and --stream cannot be combined")
    reshaped = next((r for r in requests if r.reshaped), None)
    if stream and reshaped is not None:
        raise click.UsageError(f"--stream prints raw text; --style {reshaped.style} cleans the whole answer afterwards")
    runner = Runner(resolve_model(model), threads=threads, device=device, cache=None if no_cache else ResultCache())
    demo = is_demo_model(runner.manifest)
    several = len(images) * len(requests) > 1
    failed = 0
    if write_xmp:
        remove_leftovers(sidecar_path(path) for path in images)  # of an earlier run killed mid-write
    for path in images:
        try:
            image, digest = load_image(path), file_sha256(path)
            if write_xmp:
                check_sidecar(path, force)
            for request in requests:
                prompt = request.prompt_for(runner.manifest)
                label = (f"{path}: " if len(requests) == 1 else f"{path}: {prompt}: " if len(images) > 1
                         else f"{prompt}: ")
                on_text = None
                if stream:
                    click.echo(label if several else "", nl=False)
                    on_text = lambda piece: click.echo(piece, nl=False)  # noqa: E731
                try:
                    answer = runner.answer(image, digest, request, on_text, reuse_image=len(requests) > 1)
                finally:
                    if stream:
                        click.echo()
                if write_xmp:
                    write_sidecar(path, answer.value, runner.model_id, force)
                if stream:
                    continue
                if as_json:
                    result = answer.result
                    row = {"image": path, "prompt": prompt, **answer.fields(), "token_ids": result.token_ids,
                           "prompt_tokens": result.prompt_tokens, "timings": rounded_timings(result.timings),
                           "demo_model": demo}
                    click.echo(json.dumps(row, ensure_ascii=False))
                else:
                    click.echo(label + answer.text if several else answer.text)
        except (InputError, StyleOutputError) as exc:
            if len(images) == 1:
                raise
            failed += 1
            click.echo(f"error: {exc}", err=True)
    demo_notice(demo)
    if failed:
        raise InputError(f"{failed} of {len(images)} images failed (each error is above)")


class MolmocapGroup(click.Group):
    """The command group; run standalone, it renders every error once, as one line on stderr, and exits with its
    status: 2 for usage and input errors, so scripts and users never see a traceback or click's usage block."""

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except click.exceptions.NoArgsIsHelpError as exc:  # a bare group: its help is the answer
            exc.show()
            sys.exit(exc.exit_code)
        except click.UsageError as exc:
            hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
            message = exc.format_message().rstrip(".")
            click.echo(f"error: {message[:1].lower()}{message[1:]}{hint}", err=True)
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            click.echo(f"error: {exc.format_message()}", err=True)
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
        except Exception as exc:  # noqa: BLE001 - a bug: one line, and the traceback only when asked for
            if os.environ.get("MOLMOCAP_DEBUG"):
                raise
            click.echo(f"error: internal error ({type(exc).__name__}: {exc}); please report it with "
                       "`molmocap info` (MOLMOCAP_DEBUG=1 shows the traceback)", err=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


@click.group(cls=MolmocapGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="molmocap")
@click.option("--quiet", is_flag=True, help="Do not print the embedded demo model's notice on stderr.")
def main(quiet: bool) -> None:
    """Offline image captioning and visual question answering with Molmo2 on ONNX Runtime.

    Without --model or $MOLMOCAP_MODEL the embedded demo model answers: a tiny model trained on synthetic colored
    shapes. It says so in one line on stderr (unless --quiet) and in --json output (demo_model: true).
    """


@main.command()
@click.argument("src")
@click.option("-o", "--output", "out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Directory to write the ONNX model into.")
@click.option("--quant", type=click.Choice(["fp32", "int8", "int4", "mixed", "fp16", "int4-fp16"]), default="fp32",
              show_default=True,
              help="Weight precision: int8 everywhere; int4 decoder with int8 vision (least memory); mixed adds an "
                   "int8 prefill copy of the decoder for a fast first token; fp16 (for GPUs) computes in float16 "
                   "with a float16 KV cache, int4-fp16 with the int4 decoder.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--check", is_flag=True, help="After the export, compare its next-token predictions with a "
              "higher-precision reference on a few images and record the figures in the model (molmocap info "
              "shows them).")
@click.option("--check-against", metavar="fp32|int8|transformers|DIR", default=None,
              help="The check's reference: an export of SRC made for the check (fp32, int8), SRC through "
                   "transformers (fp32; needs torch), or an exported model directory of the same checkpoint. "
                   "Default: int8 for 4-bit plans, fp32 for int8 and fp16, transformers for fp32.")
@click.option("--check-images", "check_images", multiple=True, metavar="IMAGE",
              help="An image for the check (repeat for several; default: three drawn pictures).")
def export(src: str, out: Path, quant: str, force: bool, check: bool, check_against: str | None,
           check_images: tuple[str, ...]) -> None:
    """Export a Molmo2 checkpoint SRC (a local directory, or a hub id when online) to ONNX.

    Examples: molmocap export ./Molmo2-4B -o ./molmo2-4b-onnx;
    molmocap export ./Molmo2-4B -o ./molmo2-4b-int4 --quant int4 --check
    """
    from molmocap.export import require_export_extra

    if (check_against or check_images) and not check:
        raise click.UsageError("--check-against and --check-images apply to --check")
    require_export_extra()
    from molmocap.export.check import default_reference, resolve_images
    from molmocap.export.exporter import export as run_export

    images = resolve_images(list(check_images)) if check else None  # a bad image is refused before the export
    run_export(src, out, quant=quant, force=force, progress=lambda msg: click.echo(msg, err=True),
               check=(check_against or default_reference(quant)) if check else None, check_images=images)


@main.command()
@click.argument("images", nargs=-1, required=True)
@click.option("--style", type=click.Choice(STYLES), default=None,
              help="short or detailed caption, alt text (<= 125 chars), seo (JSON title/caption/keywords) "
                   "or tags (JSON list). Default: the model's caption prompt.")
@click.option("--lang", default=None, metavar="LANGUAGE", help="Ask for the caption in this language.")
@click.option("--prompt", default=None, help="Instruction to use instead of the style's (overrides --style).")
@click.option("-o", "--output", "out", type=click.Path(path_type=Path), default=None,
              help="Append one row per image to this results file (with --ray: part files in this directory); a "
                   "rerun skips the images it holds, a bad image becomes an error row (exit status 2 at the end).")
@click.option("--format", "fmt", type=click.Choice(["jsonl", "csv", "imagefolder"]), default=None,
              help="Results file format (default: csv for a .csv file, else jsonl); imagefolder: Hugging Face's "
                   "metadata.jsonl (file_name, text), written at the top of the dataset folder.")
@click.option("--write-xmp", is_flag=True, help="Write an XMP sidecar (photo.jpg -> photo.xmp) per image.")
@click.option("--force", is_flag=True, help="With --write-xmp: replace sidecars molmocap did not write.")
@click.option("--write-txt", is_flag=True, help="Write a caption file (photo.jpg -> photo.txt) per image, for "
              "training sets; a rerun skips images whose file is up to date.")
@click.option("--caption-ext", default=".txt", show_default=True, metavar=".EXT",
              help="With --write-txt: the caption files' extension.")
@click.option("--prefix", default="", metavar="TEXT", help="With --write-txt or --format imagefolder: text put "
              "before every caption, such as a trigger word (\"sks, \").")
@click.option("--skip-existing", is_flag=True, help="With --write-txt: keep existing caption files and do not "
              "caption their images.")
@click.option("--overwrite", is_flag=True, help="With --write-txt: replace existing caption files, also those "
              "molmocap did not write (by default they are refused).")
@click.option("--pages", default=None, metavar="RANGES", help="PDF pages to caption, such as 1-5,8,10- "
              "(default: all).")
@click.option("--batch-size", type=click.IntRange(min=1), default=None, metavar="N",
              help="With -o, --write-txt or PDFs: decode N images together (rows still in order). Default "
                   f"{DEFAULT_MAX_BATCH}: measured fastest on 2-core CPUs (benchmarks/bench_batch.py).")
@click.option("--ray", "on_ray", is_flag=True, help="Caption on a Ray cluster into the directory -o OUT_DIR "
              "(JSON lines part files); --threads is then per worker (default 1). Needs: pip install "
              "\"molmocap[ray]\".")
@click.option("--ray-address", default=None, metavar="ADDR", help="With --ray: the cluster to join (the address "
              "`ray start --head` printed, or auto; default: $RAY_ADDRESS, else Ray on this machine alone).")
@click.option("--workers", type=click.IntRange(min=1), default=None, help="With --ray: model replicas (Ray actors), "
              "each loading the model once (default: the cluster's CPUs divided by --threads).")
@model_options
def caption(images: tuple[str, ...], style: str | None, lang: str | None, prompt: str | None, out: Path | None,
            fmt: str | None, write_xmp: bool, force: bool, write_txt: bool, caption_ext: str, prefix: str,
            skip_existing: bool, overwrite: bool, pages: str | None, batch_size: int | None, on_ray: bool,
            ray_address: str | None, workers: int | None, max_new_tokens: int, max_crops: int | None,
            **options) -> None:
    """Caption IMAGES: files, directories (searched recursively) or quoted glob patterns ("photos/**/*.jpg").
    PDFs among them are captioned page by page (needs the pdf extra: pip install "molmocap[pdf]").

    Examples: molmocap caption photo.jpg --json; molmocap caption photo.jpg --style alt;
    molmocap caption photos/ -o results.jsonl --write-xmp; molmocap caption dataset/ --write-txt --prefix "sks, ";
    molmocap caption report.pdf --pages 1-5 -o pages.jsonl; molmocap caption archive/ -o captions/ --ray
    """
    from molmocap.runtime.batch import discover
    from molmocap.runtime.caption_files import CaptionFiles
    from molmocap.runtime.documents import is_pdf, parse_pages, require_renderer

    request = Request(prompt, None if prompt else style, None if prompt else lang, max_new_tokens, max_crops)
    if fmt and out is None:
        raise click.UsageError("--format applies to the results file: give -o FILE")
    if force and not write_xmp:
        raise click.UsageError("--force applies to --write-xmp")
    if (skip_existing or overwrite or caption_ext != ".txt") and not write_txt:
        raise click.UsageError("--skip-existing, --overwrite and --caption-ext apply to --write-txt")
    if skip_existing and overwrite:
        raise click.UsageError("--skip-existing and --overwrite cannot be combined")
    if prefix and not (write_txt or fmt == "imagefolder"):
        raise click.UsageError("--prefix applies to --write-txt and --format imagefolder")
    if (ray_address or workers) and not on_ray:
        raise click.UsageError("--ray-address and --workers apply to --ray")
    if on_ray:
        if out is None:
            raise click.UsageError("--ray writes part files into a directory: give -o OUT_DIR")
        if write_xmp or write_txt or pages or fmt not in (None, "jsonl"):
            raise click.UsageError("--ray writes JSON lines rows only: --write-xmp, --write-txt, --pages and "
                                   "--format do not apply")
        caption_on_ray(discover(images, documents=False), out, request, ray_address, workers, **options)
        return
    if out is not None and out.is_dir():
        raise click.UsageError(f"-o {out} is a directory; name a results file (or add --ray for part files)")
    ranges = parse_pages(pages) if pages is not None else None
    paths = discover(images, documents=not (write_txt or write_xmp or fmt == "imagefolder"))
    documents = any(is_pdf(path) for path in paths)
    if ranges is not None and not documents:
        raise click.UsageError("--pages applies to PDFs, and none is among IMAGES")
    if documents:
        require_renderer()
    if out is not None or write_txt or documents:
        mode = "skip" if skip_existing else "overwrite" if overwrite else "refuse"
        captions = CaptionFiles(caption_ext, prefix, mode) if write_txt else None
        caption_to_file(paths, out, fmt, request, write_xmp, force, captions=captions, pages=ranges, prefix=prefix,
                        batch_size=batch_size or DEFAULT_MAX_BATCH, **options)
        return
    if batch_size is not None:
        raise click.UsageError("--batch-size applies to -o, --write-txt and PDFs")
    run_images(tuple(paths), [request], write_xmp=write_xmp, force=force, **options)


def caption_to_file(images: list[str], out: Path | None, fmt: str | None, request: Request, write_xmp: bool,
                    force: bool, model: str | None, threads: int | None, device: str, as_json: bool, stream: bool,
                    no_cache: bool, captions: CaptionFiles | None = None,
                    pages: list[tuple[int, int | None]] | None = None, prefix: str = "",
                    batch_size: int = 1) -> None:
    """`caption -o`, `--write-txt` and PDFs: a resumable batch into a results file (without -o, the rows that
    succeed are printed: text, or JSON with --json), with a progress bar when stderr is a terminal."""
    from molmocap.runtime.batch import Runner, check_imagefolder, output_format, run_batch
    from molmocap.runtime.cache import ResultCache
    from molmocap.runtime.documents import is_pdf

    if out is not None and (as_json or stream):
        raise click.UsageError("-o writes a results file: --json and --stream do not apply (see --format)")
    if stream:
        raise click.UsageError("--stream applies to images only, without --write-txt")
    fmt = output_format(out, fmt) if out is not None else "jsonl"
    if fmt == "imagefolder":
        check_imagefolder(images, out)
    runner = Runner(resolve_model(model), threads=threads, device=device, cache=None if no_cache else ResultCache())

    tty = sys.stderr.isatty()
    clear_bar = "\r\x1b[K" if tty else ""  # an error line replaces the progress bar, which redraws below it

    def report(message: str) -> None:
        click.echo(f"{clear_bar}error: {message}", err=True)

    def show(row: dict) -> None:
        if as_json:
            click.echo(json.dumps(row, ensure_ascii=False))
        elif captions is None:
            label = f"{row['source']} page {row['page']}" if "source" in row else row["image"]
            click.echo(f"{label}: {row['text']}")

    batch = {"captions": captions, "pages": pages, "prefix": prefix, "on_error": report,
             "on_row": show if out is None else None, "batch_size": batch_size}
    if tty:
        with click.progressbar(length=len(images), label="captioning", file=sys.stderr) as bar:
            summary = run_batch(images, runner, request, out, fmt, write_xmp, force,
                                on_progress=lambda _: bar.update(1), **batch)
    else:
        summary = run_batch(images, runner, request, out, fmt, write_xmp, force, **batch)
    printing = out is None and captions is None  # rows on stdout, as without PDFs: no summary line
    done = f"already in {out}" if out is not None else "already done"
    items = "images and pages" if pages is not None or any(is_pdf(path) for path in images) else "images"
    if not printing:
        click.echo(f"{summary.total} {items}: {summary.computed} captioned, {summary.cached} from the cache, "
                   f"{summary.skipped} {done}, {summary.failed} failed", err=True)
    demo_notice(is_demo_model(runner.manifest))
    if printing and summary.failed == summary.total == 1:
        click.get_current_context().exit(2)  # its one error line is already out
    if summary.failed:
        where = f"; their rows in {out} hold the errors" if out is not None and fmt != "imagefolder" else ""
        raise InputError(f"{summary.failed} of {summary.total} {items} failed{where}")


def caption_on_ray(images: list[str], out: Path, request: Request, address: str | None, workers: int | None,
                   model: str | None, threads: int | None, device: str, as_json: bool, stream: bool,
                   no_cache: bool) -> None:
    """`caption --ray`: the batch on a Ray cluster, into part files in OUT; Ray shows its progress on stderr."""
    from molmocap.cluster import require_ray

    require_ray()
    from molmocap.cluster.ray_batch import run_on_ray
    from molmocap.runtime.batch import Runner

    if as_json or stream:
        raise click.UsageError("-o writes results files: --json and --stream do not apply")
    threads = threads or 1
    args = {"model_dir": str(resolve_model(model).resolve()), "threads": threads, "device": device}
    runner = Runner(**args)
    summary = run_on_ray(images, out, runner, args, request, use_cache=not no_cache, address=address,
                         workers=workers, threads=threads, on_error=lambda message: click.echo(f"error: {message}",
                                                                                                err=True))
    click.echo(f"{summary.total} images: {summary.computed} captioned, {summary.cached} from the cache, "
               f"{summary.skipped} already in {out}, {summary.failed} failed", err=True)
    demo_notice(is_demo_model(runner.manifest))
    if summary.failed:
        raise InputError(f"{summary.failed} of {summary.total} images failed; their rows in {out} hold the errors")


@main.command()
@click.argument("image")
@click.argument("question", required=False)
@click.option("-q", "--question", "questions", multiple=True, help="A question; repeat to ask several, "
              "which share the image encoding and the image's KV cache.")
@model_options
def ask(image: str, question: str | None, questions: tuple[str, ...], max_new_tokens: int, max_crops: int | None,
        **options) -> None:
    """Answer QUESTION (or each -q QUESTION) about IMAGE.

    Examples: molmocap ask photo.jpg "How many dogs are there?";
    molmocap ask photo.jpg -q "What color is the car?" -q "Is it raining?"
    """
    asked = ([question] if question is not None else []) + list(questions)
    if not asked:
        raise click.UsageError("give a QUESTION or at least one -q QUESTION")
    if any(not q.strip() for q in asked):
        raise InputError("the question is empty")
    run_images((image,), [Request(q, max_new_tokens=max_new_tokens, max_crops=max_crops) for q in asked], **options)


@main.command()
@click.argument("image")
@click.argument("label")
@click.option("--draw", type=click.Path(dir_okay=False, path_type=Path), default=None, metavar="OUT.png",
              help="Also save the image with the points marked (.png, .jpg or .webp).")
@engine_options
@generation_options(POINT_MAX_NEW_TOKENS)
@click.option("--json", "as_json", is_flag=True, help="One JSON object: count, points in pixels, raw text.")
def point(image: str, label: str, draw: Path | None, model: str | None, max_new_tokens: int,
          max_crops: int | None, threads: int | None, device: str, as_json: bool) -> None:
    """Point at every LABEL in IMAGE: pixel coordinates and a count, from Molmo2's point output.

    Examples: molmocap point photo.jpg "red car"; molmocap point photo.jpg person --json --draw marked.png
    """
    from molmocap.runtime import Captioner
    from molmocap.runtime.image_io import load_image
    from molmocap.runtime.pointing import check_draw_target, draw_points, parse_points, point_prompt

    request = Request(point_prompt(label), max_new_tokens=max_new_tokens, max_crops=max_crops)
    picture = load_image(image)
    if draw is not None:
        check_draw_target(draw)
    captioner = Captioner.load(resolve_model(model), threads=threads, device=device)
    demo = is_demo_model(captioner.manifest)
    result = captioner.answer(picture, request).result
    points = parse_points(result.text, *picture.size)
    if draw is not None:
        draw_points(picture, points, draw)
    if as_json:
        click.echo(json.dumps({"image": image, "label": label, "count": len(points),
                               "points": [p.to_dict() for p in points], "text": result.text,
                               "size": list(picture.size), "demo_model": demo}, ensure_ascii=False))
    else:
        where = " ".join(f"({p.x:.0f}, {p.y:.0f})" for p in points)
        click.echo(f"{len(points)} {label}" + (f": {where}" if points else ""))
    demo_notice(demo)


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; the default takes connections from this machine only.")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True, help="TCP port.")
@click.option("--api-key", envvar="MOLMOCAP_API_KEY", default=None, metavar="KEY",
              help="Require `Authorization: Bearer KEY` on every route but /health and the Ollama probes / and "
              "/api/version (default: $MOLMOCAP_API_KEY).")
@engine_options
@click.option("--max-request-mb", type=click.IntRange(min=1), default=20, show_default=True,
              help="Largest request body accepted, in MiB (413 beyond it).")
@click.option("--max-queue", type=click.IntRange(min=1), default=16, show_default=True,
              help="Generations that may wait for the model; past it a request gets 503 with Retry-After.")
@click.option("--request-timeout", type=click.FloatRange(min=0, min_open=True), default=300.0, show_default=True,
              metavar="S", help="Seconds a request may wait and generate before it is cancelled (504).")
@click.option("--max-batch", type=click.IntRange(min=1), default=DEFAULT_MAX_BATCH, show_default=True, metavar="N",
              help="Generations decoded together: a request arriving while others decode joins them at the next "
                   "step (1: one at a time). The default measured best on 2-core CPUs (benchmarks/bench_batch.py).")
def serve(host: str, port: int, api_key: str | None, model: str | None, threads: int | None, device: str,
          max_request_mb: int, max_queue: int, request_timeout: float, max_batch: int) -> None:
    """Serve the model over HTTP: /v1/caption, /v1/ask, OpenAI-compatible /v1/chat/completions, /health, /metrics.

    Ollama's API too (/api/generate, /api/chat, /api/tags, /api/show, /api/version), for tools such as PhotoPrism,
    Home Assistant's LLM Vision and Open WebUI: point their Ollama URL at http://HOST:PORT.

    Requests queue on the one model and decode together (--max-batch). Images travel inline (base64 or data
    URIs); remote URLs are refused.

    Example: molmocap serve --model ./molmo2-4b-onnx --api-key KEY
    """
    try:
        import uvicorn

        from molmocap.serve import create_app
    except ImportError as exc:
        raise click.ClickException(f"serve needs starlette and uvicorn ({exc}); "
                                   "install them with: pip install 'molmocap[serve]'") from None
    from molmocap.runtime import Captioner

    captioner = Captioner.load(resolve_model(model), threads=threads, device=device)
    app = create_app(captioner, api_key=api_key, max_request_bytes=max_request_mb * 1024 * 1024,
                     max_queue=max_queue, request_timeout_s=request_timeout, max_batch=max_batch)
    demo_notice(is_demo_model(captioner.manifest))
    if not api_key and host not in ("127.0.0.1", "localhost", "::1"):
        click.echo(f"warning: listening on {host} without --api-key: anyone who can reach this port can use "
                   "the model", err=True)
    uvicorn.run(app, host=host, port=port, log_level="info")


@main.command()
@click.argument("model", required=False, metavar="[MODEL]")
@click.option("--verify", is_flag=True, help="Hash every model file now (else: the state of the last check).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
def info(model: str | None, verify: bool, as_json: bool) -> None:
    """Print what a question or bug report needs: the model (default: $MOLMOCAP_MODEL, else the embedded demo
    model), its files and their verification, ONNX Runtime, the CPU, the result cache and the versions."""
    from molmocap.runtime.info import gather, render_text

    try:
        model_dir = resolve_model(model, notice=False)  # the check's figures are in the report
    except ModelError:
        model_dir = None  # no model anywhere: the environment part is still worth printing
    report = gather(model_dir, verify)
    click.echo(json.dumps(report, ensure_ascii=False) if as_json else render_text(report))
    if report["model"] is not None and report["model"]["error"]:
        raise ModelError(report["model"]["error"])


@main.group("cache")
def cache_group() -> None:
    """Inspect or empty the result cache ($MOLMOCAP_CACHE_DIR/results.sqlite, default ~/.cache/molmocap)."""


@cache_group.command("stats")
def cache_stats() -> None:
    """Print the cache's path, entries, size on disk and entries per model."""
    from molmocap.runtime.cache import ResultCache

    stats = ResultCache().stats()
    click.echo(f"path: {stats.path}\nentries: {stats.entries}\nsize: {stats.size_bytes} bytes")
    for model_id, label, entries in stats.models:
        click.echo(f"model {model_id[:16]} ({label}): {entries} entries")


@cache_group.command("clear")
@click.option("--model", "model", metavar="DIR", default=None, help="Clear only this model's entries.")
def cache_clear(model: str | None) -> None:
    """Delete the cached results (all, or one model's); a corrupt cache file is deleted."""
    from molmocap.runtime.cache import ResultCache
    from molmocap.runtime.manifest import read_manifest

    model_id = read_manifest(model).model_id if model is not None else None  # no hashing: works on a damaged model
    cache = ResultCache()
    removed = cache.clear(model_id)
    click.echo(f"deleted the unreadable cache file {cache.path}" if removed is None else f"removed {removed} entries")


def entry() -> None:
    """The console script (pyproject) and `python -m molmocap`: errors render as in `MolmocapGroup.main`."""
    main()


if __name__ == "__main__":
    entry()
