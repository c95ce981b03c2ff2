"""Batch captioning: find the images, serve what the cache holds, and append one durable row per image.

A results file (JSON lines or CSV) survives a kill at any moment: each row is one `write` of a whole line followed
by `fsync`, so at most the row in flight is lost, as a partial last line that the next run cuts off before it
appends; a row that cannot be written whole (a full disk) is cut off at once and stops the batch. A rerun with the
same file skips every image it already holds a result for, keyed by the image's content (sha256), the model id,
the prompt and the generation options; the images it holds error rows for are tried again (their error rows are
dropped first).

PDFs are captioned page by page (`documents`): their rows carry `source` (the PDF) and `page` (1-based) instead of
`image`, keyed by the PDF's sha256 and the page. The `imagefolder` format is Hugging Face's `metadata.jsonl`: rows
`{"file_name", "text"}` only, for the images that succeeded (errors are reported, not written), resumed by
`file_name`, so the file stays loadable with `datasets.load_dataset("imagefolder", ...)`.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .batching import DecodeBatch
from .cache import CachedResult, ResultCache
from .caption_files import CaptionFiles
from .captioner import Captioner, EncodedImage, Generation, ImageSource, Result
from .documents import PAGE_LONG_SIDE, PDF_EXTENSION, PdfDocument, is_pdf, select_pages
from .errors import InputError
from .files import remove_leftovers, replace_atomically, sha256_file
from .manifest import load_manifest
from .request import Answer, Request, rounded_timings
from .styles import StyleOutputError
from .xmp import sidecar_fields, sidecar_path, write_sidecar

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
FORMATS = ("jsonl", "csv", "imagefolder")
CSV_COLUMNS = ("image", "sha256", "text", "prompt_tokens", "cached", "total_s", "error", "model", "prompt",
               "options", "key")


def discover(args: Iterable[str], documents: bool = True) -> list[str]:
    """Image (and, with `documents`, PDF) paths for command-line arguments, so that one command can caption a whole
    photo library.

    A directory is searched recursively and a glob pattern expanded (`**` spans directories), both for files with
    an image extension (or .pdf), sorted, hidden files and directories left out; any other argument is taken as a
    file as it is. Paths seen twice are kept once. A directory without images or a pattern matching none is an
    `InputError`, before any work starts.
    """
    extensions = IMAGE_EXTENSIONS | {PDF_EXTENSION} if documents else IMAGE_EXTENSIONS
    found: list[str] = []
    seen: set[str] = set()
    for arg in args:
        if os.path.isdir(arg):
            paths = _walk_images(arg, extensions)
            if not paths:
                raise InputError(f"no images ({', '.join(sorted(extensions))}) in directory {arg}")
        elif not os.path.exists(arg) and any(char in arg for char in "*?["):
            paths = sorted(p for p in glob.glob(arg, recursive=True)
                           if os.path.isfile(p) and _is_image_name(p, extensions))
            if not paths:
                raise InputError(f"no images match {arg}")
        else:
            paths = [arg]
        for path in paths:
            if os.path.normpath(path) not in seen:
                seen.add(os.path.normpath(path))
                found.append(path)
    return found


def _is_image_name(name: str, extensions: frozenset[str] = IMAGE_EXTENSIONS) -> bool:
    return not os.path.basename(name).startswith(".") and os.path.splitext(name)[1].lower() in extensions


def _walk_images(root: str, extensions: frozenset[str]) -> list[str]:
    """Files with these extensions under `root`, recursively, sorted; hidden directories are not entered."""
    paths = []
    for top, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        paths.extend(os.path.join(top, name) for name in files if _is_image_name(name, extensions))
    return sorted(paths)


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 of an image file's bytes, or an `InputError` naming the file."""
    try:
        return sha256_file(path)
    except FileNotFoundError:
        raise InputError(f"image file not found: {path}") from None
    except IsADirectoryError:
        raise InputError(f"not an image file but a directory: {path}") from None
    except OSError as exc:
        raise InputError(f"cannot read image file {path}: {exc.strerror or exc}") from None


class Runner:
    """A model behind the result cache: its sessions are opened only when the cache lacks a result.

    Its files are checked against the manifest's sha256s on construction (`load_manifest`), so a damaged model is
    refused before any cached answer for it is served. Each call names an image, the sha256 of its file and a
    `Request`, which decides the prompt, the options and the cache key. A cache hit comes back with timings
    `{"cached": True, "total_s": lookup seconds}`; a computed result has the captioner's timings plus
    `"cached": False`.
    """

    def __init__(self, model_dir: str | os.PathLike, threads: int | None = None, device: str = "cpu",
                 cache: ResultCache | None = None) -> None:
        self.manifest = load_manifest(model_dir)
        self.model_id = self.manifest.model_id
        self.model_label = str(self.manifest.data.get("source") or Path(model_dir).resolve().name)
        self.cache = cache
        self._threads, self._device = threads, device
        self._captioner: Captioner | None = None
        self._encoded: tuple[str, int | None, EncodedImage] | None = None

    def key(self, image_sha256: str, request: Request) -> str:
        """The result key of `request` about an image under this model."""
        return request.key(image_sha256, self.manifest)

    def load(self) -> Captioner:
        """The captioner, opening the model's sessions on first use."""
        if self._captioner is None:
            self._captioner = Captioner(self.manifest, threads=self._threads, device=self._device)
        return self._captioner

    def answer(self, image: ImageSource, image_sha256: str, request: Request,
               on_text: Callable[[str], None] | None = None, reuse_image: bool = False) -> Answer:
        """The answer to `request` about `image` (whose file hashes to `image_sha256`), from the cache or the model.

        With `reuse_image`, consecutive calls for the same image share its vision encoding and image-prefix KV
        cache (for several questions about one image). A JSON style's answer that cannot be repaired raises
        `StyleOutputError`.
        """
        t0 = time.perf_counter()
        key = self.key(image_sha256, request)
        hit = self._cached(key, t0)
        if hit is not None:
            if on_text is not None:
                on_text(hit.text)
            return request.answer(hit)
        captioner = self.load()
        prompt = request.prompt_for(self.manifest)
        if reuse_image:
            if self._encoded is None or self._encoded[:2] != (image_sha256, request.max_crops):
                self._encoded = (image_sha256, request.max_crops, captioner.encode_image(image, request.max_crops))
            result = captioner.generate(self._encoded[2], prompt, request.max_new_tokens, on_text=on_text)
        else:
            result = captioner.generate(image, prompt, request.max_new_tokens, request.max_crops, on_text=on_text)
        self._remember(key, image_sha256, request, result)
        return request.answer(result)

    def answer_many(self, items: Sequence[tuple[ImageSource, str]], request: Request
                    ) -> list[Answer | InputError | StyleOutputError]:
        """The answers to `request` about several (image, sha256) items, as `answer` gives each: from the cache, or
        prefilled one by one and decoded together in one `DecodeBatch` (a decode step costs about the same for
        several sequences as for one). An item whose input is refused, or whose answer cannot be held to its
        style, gets that error in its place."""
        if len(items) == 1:
            try:
                return [self.answer(*items[0], request)]
            except (InputError, StyleOutputError) as exc:
                return [exc]
        results: list[Result | InputError | None] = [None] * len(items)
        started: list[tuple[int, str, str, Generation]] = []
        batch: DecodeBatch | None = None
        for index, (image, image_sha256) in enumerate(items):
            key = self.key(image_sha256, request)
            results[index] = self._cached(key, time.perf_counter())
            if results[index] is not None:
                continue
            captioner = self.load()
            batch = batch or DecodeBatch(captioner, len(items))
            try:
                generation = captioner.start(image, request.prompt_for(self.manifest), request.max_new_tokens,
                                             request.max_crops, batch=batch)
            except InputError as exc:
                results[index] = exc
                continue
            started.append((index, key, image_sha256, generation))
        while batch:
            batch.step()
        for index, key, image_sha256, generation in started:
            results[index] = generation.result()
            self._remember(key, image_sha256, request, results[index])
        return [result if isinstance(result, InputError) else _shaped(request, result) for result in results]

    def _cached(self, key: str, t0: float) -> Result | None:
        hit = self.cache.get(key) if self.cache is not None else None
        if hit is None:
            return None
        return Result(hit.text, hit.token_ids, hit.prompt_tokens, {"cached": True, "total_s": time.perf_counter() - t0})

    def _remember(self, key: str, image_sha256: str, request: Request, result: Result) -> None:
        result.timings["cached"] = False
        if self.cache is not None:
            self.cache.put(key, image_sha256, self.model_id, self.model_label, request.prompt_for(self.manifest),
                           request.options_for(self.manifest),
                           CachedResult(result.text, result.token_ids, result.prompt_tokens))


def _shaped(request: Request, result: Result) -> Answer | StyleOutputError:
    try:
        return request.answer(result)
    except StyleOutputError as exc:
        return exc


def output_format(path: str | os.PathLike, fmt: str | None) -> str:
    """`fmt` when given, else from the file name: `.csv` is csv, anything else JSON lines."""
    return fmt or ("csv" if str(path).lower().endswith(".csv") else "jsonl")


class ResultsFile:
    """An append-only results file, JSON lines, CSV or imagefolder metadata, that a kill cannot corrupt and a rerun
    resumes.

    JSON rows carry image, sha256, key, model (id), prompt, options, text, token_ids, prompt_tokens, timings and
    error (null unless the image failed); CSV rows carry `CSV_COLUMNS`, with options as JSON.
    """

    def __init__(self, path: str | os.PathLike, fmt: str) -> None:
        if fmt not in FORMATS:
            raise InputError(f"unknown results format {fmt!r}; use one of {', '.join(FORMATS)}")
        self.path = Path(path)
        self.format = fmt
        self._fd: int | None = None

    def open(self, retry: Iterable[str] = ()) -> set[str]:
        """Ready the file for appending; returns the keys of the images it holds results for.

        A partial last row (a kill during its write) is cut off, the temporary file of a rewrite that was killed is
        removed, and the error rows of the images in `retry` are dropped (the file is rewritten atomically) so that
        those images can be tried again.
        """
        retry = {os.path.normpath(path) for path in retry}
        remove_leftovers([self.path])
        try:
            data = self.path.read_bytes() if self.path.exists() else b""
            end = _complete_end(data, self.format)
            records = self._parse(data[:end])
            kept = [record for record in records
                    if not (record.get("error") and os.path.normpath(_record_path(record)) in retry)]
            if len(kept) < len(records):
                header = [self._encode_header()] if self.format == "csv" else []
                replace_atomically(self.path, b"".join([*header, *map(self._encode, kept)]))
            elif end < len(data):
                os.truncate(self.path, end)
            created = not self.path.exists()
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
            if created:
                _fsync_dir(self.path.parent)
            if self.format == "csv" and os.fstat(self._fd).st_size == 0:
                self._write(self._encode_header())
        except OSError as exc:
            self.close()
            raise InputError(f"cannot write results file {self.path}: {exc.strerror or exc}") from None
        if self.format == "imagefolder":
            return {record["file_name"] for record in kept if isinstance(record.get("file_name"), str)}
        return {record["key"] for record in kept if record.get("key") and not record.get("error")}

    def append(self, row: dict) -> None:
        """Append one row: a single write of the whole line, then fsync."""
        try:
            self._write(self._encode(_csv_record(row) if self.format == "csv" else row))
        except OSError as exc:
            raise InputError(f"cannot write results file {self.path}: {exc.strerror or exc}") from None

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> ResultsFile:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _write(self, data: bytes) -> None:
        """Append `data` whole or not at all: a failed write (a full disk) is cut off again, so that the file never
        holds a torn row, even while the process that failed is still running."""
        size = os.fstat(self._fd).st_size
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self._fd, view):]
            os.fsync(self._fd)
        except OSError:
            try:
                os.ftruncate(self._fd, size)
            except OSError:
                pass  # the next open cuts the partial row instead
            raise

    def _encode(self, record: dict) -> bytes:
        if self.format != "csv":
            return (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        return _csv_line([record.get(column, "") for column in CSV_COLUMNS])

    def _encode_header(self) -> bytes:
        return _csv_line(CSV_COLUMNS)

    def _parse(self, data: bytes) -> list[dict]:
        """The rows of the complete part of the file; anything not written by molmocap is an `InputError`."""
        text = data.decode("utf-8", errors="replace")
        if self.format == "csv":
            reader = csv.DictReader(io.StringIO(text, newline=""))
            if reader.fieldnames is not None and tuple(reader.fieldnames) != CSV_COLUMNS:
                raise InputError(f"{self.path} is not a molmocap csv results file (its columns differ); "
                                 "choose another -o")
            return list(reader)
        rows = []
        for number, line in enumerate(text.split("\n")[:-1], start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                row = None
            if not isinstance(row, dict):
                raise InputError(f"{self.path} line {number} is not a JSON object; choose another -o "
                                 "(or --format csv for a csv file)")
            rows.append(row)
        return rows


def _record_path(record: dict) -> str:
    """The file a results row is about: its image, or its PDF (`source`; in CSV, the image column `doc.pdf#page=N`)."""
    path = str(record.get("source") or record.get("image"))
    base, marker, page = path.rpartition("#page=")
    return base if marker and page.isdigit() and is_pdf(base) else path


def _complete_end(data: bytes, fmt: str) -> int:
    """Length of the part of `data` made of whole rows: up to the last newline that ends a record.

    A CSV newline ends a record only outside quotes, i.e. after an even number of `"` (quotes inside a field
    are doubled, so the parity holds); multi-byte UTF-8 never contains these bytes.
    """
    if fmt != "csv":
        return data.rfind(b"\n") + 1
    end = position = quotes = 0
    for piece in data.split(b"\n")[:-1]:
        position += len(piece) + 1
        quotes += piece.count(b'"')
        if quotes % 2 == 0:
            end = position
    return end


def _csv_line(values: Sequence[object]) -> bytes:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerow(values)
    return buffer.getvalue().encode("utf-8")


def _csv_record(row: dict) -> dict:
    """A JSON row's CSV columns."""
    timings = row.get("timings") or {}
    cached = timings.get("cached")
    image = row.get("image") or (row["source"] if row.get("page") is None else f"{row['source']}#page={row['page']}")
    return {
        "image": image, "sha256": row["sha256"] or "", "text": row.get("text", ""),
        "prompt_tokens": row.get("prompt_tokens", ""), "cached": "" if cached is None else str(cached).lower(),
        "total_s": timings.get("total_s", ""), "error": row["error"] or "", "model": row["model"],
        "prompt": row["prompt"], "options": json.dumps(row["options"], sort_keys=True), "key": row["key"] or "",
    }


def _fsync_dir(path: Path) -> None:
    """Make a new directory entry durable (where the platform allows opening directories)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@dataclass
class Summary:
    """What a batch did: items (images and PDF pages) seen, computed by the model, served by the cache, skipped
    (done, or caption file kept), failed."""

    total: int = 0
    computed: int = 0
    cached: int = 0
    skipped: int = 0
    failed: int = 0


def check_imagefolder(paths: Sequence[str], out: str | os.PathLike) -> None:
    """An `InputError` unless `out` is a .jsonl file (Hugging Face looks for `metadata.jsonl`) and every path is an
    image inside its folder (the `file_name`s are relative to it)."""
    if not str(out).lower().endswith(".jsonl"):
        raise InputError(f"--format imagefolder writes JSON lines: name the file metadata.jsonl, not {out}")
    root = Path(out).resolve().parent
    for path in paths:
        if is_pdf(path):
            raise InputError(f"--format imagefolder lists image files; {path} is a PDF")
        if not Path(path).resolve().is_relative_to(root):
            raise InputError(f"--format imagefolder: {path} is not inside {root}, the folder of {out}; "
                             "write the metadata file at the top of the dataset folder")


def page_identity(pdf_sha256: str, page: int) -> str:
    """What stands for a page's image sha256 in result keys: the PDF's sha256, the page and the render size."""
    return f"{pdf_sha256}#page={page}@{PAGE_LONG_SIDE}px"


class _NoResults:
    """The results sink of a batch without a results file (caption files only, or rows printed)."""

    def open(self, retry: Iterable[str] = ()) -> set[str]:
        return set()

    def append(self, row: dict) -> None:
        pass

    def __enter__(self) -> _NoResults:
        return self

    def __exit__(self, *exc_info: object) -> None:
        pass


def run_batch(paths: Sequence[str], runner: Runner, request: Request, out: str | os.PathLike | None, fmt: str,
              write_xmp: bool = False, force: bool = False, on_error: Callable[[str], None] | None = None,
              on_progress: Callable[[str], None] | None = None, captions: CaptionFiles | None = None,
              pages: list[tuple[int, int | None]] | None = None, prefix: str = "",
              on_row: Callable[[dict], None] | None = None, batch_size: int = 1) -> Summary:
    """Answer `request` about `paths` (images and PDFs) into the results file `out`, skipping the items it holds.

    Without `out` nothing is kept but the caption files and sidecars; `on_row` receives every row that succeeded.
    A failure of one item (an `InputError`: unreadable, corrupt, prompt too long, a sidecar or caption file it must
    not replace, a PDF that does not open; or a `StyleOutputError`) becomes an error row (not in the imagefolder
    format) and a call of `on_error(message)`, and the batch goes on; any other error stops it. `on_progress` is
    called with each path once it is done. `captions` writes a caption file per image (and skips images whose file
    is up to date or kept); `pages` selects PDF pages (all for None); `prefix` starts every imagefolder `text`.
    Leftover temporary files of an earlier killed run are deleted first.

    With `batch_size` N > 1, up to N items that need the model are prefilled one by one and decoded together
    (`Runner.answer_many`); their rows are still written in input order, each once its group is done, so a kill
    loses at most the group in flight.
    """
    if write_xmp or captions is not None:
        documents = [path for path in paths if is_pdf(path)]
        if documents:
            raise InputError(f"{documents[0]} is a PDF: its pages get rows, not caption files or sidecars")
    summary = Summary()
    if write_xmp:
        remove_leftovers(sidecar_path(path) for path in paths)
    if captions is not None:
        captions.remove_leftovers(paths)
    root = Path(out).resolve().parent if out is not None else None

    with ResultsFile(out, fmt) if out is not None else _NoResults() as results:
        done = results.open(retry=paths)

        pending: list[tuple[dict, ImageSource, str, str, str | None]] = []  # item, image, sha, key, resume

        def fail(item: dict, sha: str | None, key: str | None, exc: Exception) -> None:
            flush()  # the rows of the items before this one come first
            summary.failed += 1
            if fmt != "imagefolder":
                results.append(_row(item, sha, key, runner, request, error=str(exc)))
            if on_error is not None:
                on_error(str(exc))

        def caption_item(item: dict, image: Callable[[], ImageSource], sha: str, resume: str | None = None) -> None:
            """One image or page: skip it when done, else queue it for the model (a page is rendered now)."""
            summary.total += 1
            key = None
            try:
                key = runner.key(sha, request)
                if (resume or key) in done or (captions is not None and captions.skip(item.get("image"), key)):
                    summary.skipped += 1
                    return
                pending.append((item, image(), sha, key, resume))
            except (InputError, StyleOutputError) as exc:
                fail(item, sha, key, exc)
                return
            if len(pending) >= batch_size:
                flush()

        def flush() -> None:
            """Answer the queued items together and write their files and rows, in order."""
            group = pending[:]
            pending.clear()
            if group:
                answers = runner.answer_many([(image, sha) for _, image, sha, _, _ in group], request)
                for (item, _, sha, key, resume), answer in zip(group, answers):
                    complete(item, sha, key, resume, answer)

        def complete(item: dict, sha: str, key: str, resume: str | None,
                     answer: Answer | InputError | StyleOutputError) -> None:
            path = item.get("image")
            try:
                if isinstance(answer, Exception):
                    raise answer
                if write_xmp:
                    write_sidecar(path, answer.value, runner.model_id, force)
                if captions is not None:
                    captions.write(path, answer.value, key)
            except (InputError, StyleOutputError) as exc:
                fail(item, sha, key, exc)
                return
            if answer.result.timings["cached"]:
                summary.cached += 1
            else:
                summary.computed += 1
            if fmt == "imagefolder":
                row = {"file_name": resume, "text": prefix + sidecar_fields(answer.value)[0]}
            else:
                row = _row(item, sha, key, runner, request, answer)
            results.append(row)
            if on_row is not None:
                on_row(row)

        for path in paths:
            try:
                if is_pdf(path):
                    _caption_document(path, pages, caption_item, fail, summary)
                    continue
                try:
                    sha = file_sha256(path)
                except InputError as exc:
                    summary.total += 1
                    fail({"image": path}, None, None, exc)
                    continue
                resume = Path(path).resolve().relative_to(root).as_posix() if fmt == "imagefolder" else None
                caption_item({"image": path}, lambda path=path: path, sha, resume)
            finally:
                if on_progress is not None:
                    on_progress(path)
        flush()
    return summary


def image_row(runner: Runner, path: str, request: Request, sha256: str | None = None) -> dict:
    """One image's JSON results row exactly as `run_batch` writes it, for batches run elsewhere (a Ray cluster):
    from the cache or the model, or its error row on an `InputError` or `StyleOutputError`. `sha256` is the file's,
    when already hashed."""
    key = None
    try:
        sha256 = sha256 or file_sha256(path)
        key = runner.key(sha256, request)
        answer = runner.answer(path, sha256, request)
    except (InputError, StyleOutputError) as exc:
        return _row({"image": path}, sha256, key, runner, request, error=str(exc))
    return _row({"image": path}, sha256, key, runner, request, answer)


def _caption_document(path: str, pages: list[tuple[int, int | None]] | None, caption: Callable, fail: Callable,
                      summary: Summary) -> None:
    """Each selected page of the PDF `path`, rendered only when it is not done; a PDF that does not open, or has
    none of the selected pages, is one error row (page null)."""
    sha = None
    try:
        sha = file_sha256(path)
        document = PdfDocument(path)
    except InputError as exc:
        summary.total += 1
        fail({"source": path, "page": None}, sha, None, exc)
        return
    with document:
        numbers = select_pages(pages, len(document))
        if not numbers:
            summary.total += 1
            fail({"source": path, "page": None}, sha, None,
                 InputError(f"{path} has {len(document)} pages, none of them in --pages"))
        for page in numbers:
            caption({"source": path, "page": page}, lambda page=page: document.render(page), page_identity(sha, page))


def _row(item: dict, sha: str | None, key: str | None, runner: Runner, request: Request,
         answer: Answer | None = None, error: str | None = None) -> dict:
    """A results row for `item` (`{"image": path}` or `{"source": pdf, "page": n}`) with the answer's fields (see
    `Answer.fields`). A page's `sha256` is its PDF's."""
    row: dict = {**item, "sha256": sha.partition("#")[0] if sha else sha, "key": key, "model": runner.model_id,
                 "prompt": request.prompt_for(runner.manifest), "options": request.options_for(runner.manifest)}
    if answer is not None:
        result = answer.result
        row.update(answer.fields())
        row.update(token_ids=result.token_ids, prompt_tokens=result.prompt_tokens,
                   timings=rounded_timings(result.timings))
    row["error"] = error
    return row
