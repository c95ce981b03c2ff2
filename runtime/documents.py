"""PDF documents: each page rendered in memory with pypdfium2 (the optional `pdf` extra) and captioned as an image.

A page is rendered so that its long side is `PAGE_LONG_SIDE` pixels (about 128 dpi for A4): Molmo2 tiles an image
into at most 8 crops of 378 px plus a global view, so a larger render adds pixels the model never sees, and a
smaller one blurs the text it reads. Nothing is written beside the PDF.
"""

from __future__ import annotations

import os
import re

from PIL import Image

from .errors import InputError

PAGE_LONG_SIDE = 1500
PDF_EXTENSION = ".pdf"
_INSTALL_HINT = 'PDFs need pypdfium2: pip install "molmocap[pdf]"'
_PAGE_SPEC = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d*)\s*)?$")


def is_pdf(path: str | os.PathLike) -> bool:
    """Whether `path` names a PDF (by its extension)."""
    return os.path.splitext(str(path))[1].lower() == PDF_EXTENSION


def parse_pages(spec: str) -> list[tuple[int, int | None]]:
    """1-based inclusive page ranges from `--pages` ("1-5", "2,4,7-9", "3-" to the end), or an `InputError`."""
    ranges: list[tuple[int, int | None]] = []
    for part in spec.split(","):
        match = _PAGE_SPEC.match(part)
        if match is None:
            raise InputError(f"--pages {spec!r}: use page numbers and ranges such as 1-5,8,10-")
        first = int(match.group(1))
        last = first if match.group(2) is None else int(match.group(2)) if match.group(2) else None
        if first < 1 or (last is not None and last < first):
            raise InputError(f"--pages {spec!r}: pages count from 1 and a range goes up ({part.strip()})")
        ranges.append((first, last))
    return ranges


def select_pages(ranges: list[tuple[int, int | None]] | None, count: int) -> list[int]:
    """The 1-based pages of a `count`-page document that `ranges` selects (all for None), in order, each once."""
    if ranges is None:
        return list(range(1, count + 1))
    return sorted({page for first, last in ranges for page in range(first, min(count, last or count) + 1)})


def _pdfium():
    try:
        import pypdfium2
    except ImportError:
        raise InputError(_INSTALL_HINT) from None
    return pypdfium2


def require_renderer() -> None:
    """An `InputError` naming the extra to install when pypdfium2 is missing, before any work starts."""
    _pdfium()


class PdfDocument:
    """An open PDF whose pages render to RGB images; a corrupt, encrypted or unreadable file is an `InputError`."""

    def __init__(self, path: str | os.PathLike) -> None:
        pdfium = _pdfium()
        self.path = path
        try:
            self._pdf = pdfium.PdfDocument(os.fspath(path))
        except (pdfium.PdfiumError, OSError) as exc:
            reason = _one_line(exc)
            if "password" in reason.lower():
                reason = "it is encrypted (password protected); decrypt it first"
            raise InputError(f"cannot open PDF {path}: {reason}") from None

    def __len__(self) -> int:
        return len(self._pdf)

    def render(self, page: int, long_side: int = PAGE_LONG_SIDE) -> Image.Image:
        """Page `page` (1-based) as an RGB image whose long side is `long_side` pixels."""
        pdfium = _pdfium()
        try:
            handle = self._pdf[page - 1]
            try:
                width, height = handle.get_size()
                scale = long_side / max(width, height, 1.0)
                return handle.render(scale=scale).to_pil().convert("RGB")
            finally:
                handle.close()
        except pdfium.PdfiumError as exc:
            raise InputError(f"cannot render page {page} of {self.path}: {_one_line(exc)}") from None

    def close(self) -> None:
        self._pdf.close()

    def __enter__(self) -> PdfDocument:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
