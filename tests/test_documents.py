"""PDF documents: pages rendered with pypdfium2 and captioned one by one into rows with source and page."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from PIL import Image

from conftest import molmocap, noise_image
from molmocap.runtime.documents import PAGE_LONG_SIDE, PdfDocument, parse_pages, select_pages
from molmocap.runtime.errors import InputError

FAST = ("--max-new-tokens", "6", "--max-crops", "1", "--threads", "1", "--no-cache")


def make_pdf(path: Path, pages: int = 3) -> Path:
    """A PDF whose pages are different noise images (Pillow writes one image per page)."""
    images = [noise_image(120 + 20 * page, 160, seed=page) for page in range(pages)]
    images[0].save(path, save_all=True, append_images=images[1:])
    return path


def test_pdf_pages_become_rows_with_source_and_page(tmp_path):
    pdf = make_pdf(tmp_path / "report.pdf")
    out = tmp_path / "pages.jsonl"
    run = molmocap("caption", str(pdf), "-o", str(out), *FAST)
    assert run.returncode == 0, run.stderr
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [(row["source"], row["page"], row["error"]) for row in rows] == [(str(pdf), n, None) for n in (1, 2, 3)]
    assert all("image" not in row for row in rows)

    # Each row holds what the model says about that page, rendered as documented.
    with PdfDocument(pdf) as document:
        assert len(document) == 3
        for page in (1, 2, 3):
            image = document.render(page)
            assert max(image.size) == PAGE_LONG_SIDE and image.mode == "RGB"
            image.save(tmp_path / f"page{page}.png")
    single = molmocap("caption", *(str(tmp_path / f"page{n}.png") for n in (1, 2, 3)), "--json", *FAST)
    assert single.returncode == 0, single.stderr
    assert [row["text"] for row in rows] == [json.loads(line)["text"] for line in single.stdout.splitlines()]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("report") and p != pdf]

    again = molmocap("caption", str(pdf), "-o", str(out), *FAST)
    assert again.returncode == 0 and "3 already in" in again.stderr
    assert len(out.read_text().splitlines()) == 3


def encrypted_pdf(path: Path) -> Path:
    """A one-page PDF under the standard security handler whose user password is not the empty one."""
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>", b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
               b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 200 200] >>",
               b"<< /Filter /Standard /V 1 /R 2 /O <" + b"11" * 32 + b"> /U <" + b"22" * 32 + b"> /P -4 >>"]
    data, offsets = b"%PDF-1.4\n", []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(data))
        data += b"%d 0 obj\n%s\nendobj\n" % (number, body)
    xref = len(data)
    data += b"xref\n0 5\n0000000000 65535 f \n" + b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    data += (b"trailer\n<< /Size 5 /Root 1 0 R /Encrypt 4 0 R /ID [<%s> <%s>] >>\nstartxref\n%d\n%%%%EOF\n"
             % (b"ab" * 16, b"ab" * 16, xref))
    path.write_bytes(data)
    return path


def test_corrupt_pdf_is_an_error_row_and_the_batch_goes_on(tmp_path):
    make_pdf(tmp_path / "a.pdf", pages=2)
    (tmp_path / "b.pdf").write_bytes(b"%PDF-1.4\nnot really a pdf\n")
    noise_image(60, 60).save(tmp_path / "c.png")
    out = tmp_path / "r.jsonl"
    run = molmocap("caption", str(tmp_path), "-o", str(out), *FAST)
    assert run.returncode == 2
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and "b.pdf" in errors[0] and "Traceback" not in run.stderr
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [(Path(row.get("source") or row["image"]).name, row.get("page")) for row in rows] == [
        ("a.pdf", 1), ("a.pdf", 2), ("b.pdf", None), ("c.png", None)]
    bad = rows[2]
    assert bad["error"].startswith("cannot open PDF") and "\n" not in bad["error"]
    assert all(row["error"] is None and row["text"] for row in (rows[0], rows[1], rows[3]))

    encrypted = molmocap("caption", str(encrypted_pdf(tmp_path / "e.pdf")), str(tmp_path / "c.png"), *FAST)
    assert encrypted.returncode == 2 and "c.png: " in encrypted.stdout
    assert f"error: cannot open PDF {tmp_path / 'e.pdf'}: it is encrypted" in encrypted.stderr
    (tmp_path / "e.pdf").unlink()

    (tmp_path / "b.pdf").unlink()
    make_pdf(tmp_path / "b.pdf", pages=1)
    retry = molmocap("caption", str(tmp_path), "-o", str(out), *FAST)
    assert retry.returncode == 0, retry.stderr
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [(Path(row.get("source") or row["image"]).name, row.get("page")) for row in rows] == [
        ("a.pdf", 1), ("a.pdf", 2), ("c.png", None), ("b.pdf", 1)]


def test_pages_selection_csv_and_printed_rows(tmp_path):
    pdf = make_pdf(tmp_path / "doc.pdf")
    out = tmp_path / "r.csv"
    run = molmocap("caption", str(pdf), "--pages", "3,1", "-o", str(out), *FAST)
    assert run.returncode == 0, run.stderr
    with out.open(newline="", encoding="utf-8") as f:
        assert [row["image"] for row in csv.DictReader(f)] == [f"{pdf}#page=1", f"{pdf}#page=3"]
    again = molmocap("caption", str(pdf), "--pages", "1-", "-o", str(out), *FAST)
    assert again.returncode == 0 and "1 captioned" in again.stderr and "2 already in" in again.stderr

    printed = molmocap("caption", str(pdf), "--pages", "2", "--json", *FAST)
    assert printed.returncode == 0, printed.stderr
    rows = [json.loads(line) for line in printed.stdout.splitlines()]
    assert [(row["source"], row["page"]) for row in rows] == [(str(pdf), 2)]

    beyond = molmocap("caption", str(pdf), "--pages", "7-9", "-o", str(tmp_path / "x.jsonl"), *FAST)
    assert beyond.returncode == 2 and "none of them in --pages" in beyond.stderr


@pytest.mark.parametrize("spec", ["0", "3-1", "a", "1,,2", "-2", ""])
def test_bad_pages_are_refused_up_front(tmp_path, spec):
    pdf = make_pdf(tmp_path / "doc.pdf", pages=1)
    run = molmocap("caption", str(pdf), "--pages", spec, "-o", str(tmp_path / "r.jsonl"), *FAST)
    assert run.returncode == 2 and "--pages" in run.stderr and len(run.stderr.splitlines()) == 1
    assert not (tmp_path / "r.jsonl").exists()


def test_parse_and_select_pages():
    assert parse_pages("1-3, 5,7-") == [(1, 3), (5, 5), (7, None)]
    assert select_pages(parse_pages("1-3,5,7-"), 8) == [1, 2, 3, 5, 7, 8]
    assert select_pages(parse_pages("2,2,1"), 3) == [1, 2]
    assert select_pages(None, 2) == [1, 2]
    assert select_pages(parse_pages("4-"), 3) == []
    with pytest.raises(InputError):
        parse_pages("2-1")


def test_pdfs_refuse_caption_files_and_imagefolder(tmp_path):
    pdf = make_pdf(tmp_path / "doc.pdf", pages=1)
    Image.new("RGB", (32, 32)).save(tmp_path / "x.png")
    txt = molmocap("caption", str(pdf), "--write-txt", *FAST)
    assert txt.returncode == 2 and "is a PDF" in txt.stderr
    folder = molmocap("caption", str(pdf), "-o", str(tmp_path / "metadata.jsonl"), "--format", "imagefolder", *FAST)
    assert folder.returncode == 2 and "is a PDF" in folder.stderr
    # In a folder, --write-txt captions the images and leaves the PDFs alone.
    run = molmocap("caption", str(tmp_path), "--write-txt", *FAST)
    assert run.returncode == 0, run.stderr
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["doc.pdf", "x.png", "x.txt"]


def test_without_pypdfium2_a_pdf_names_the_extra(tmp_path):
    blocker = tmp_path / "blocker" / "pypdfium2"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('pypdfium2 is not installed')\n")
    pdf = make_pdf(tmp_path / "doc.pdf", pages=1)
    run = molmocap("caption", str(pdf), *FAST, env={"PYTHONPATH": str(tmp_path / "blocker")})
    assert run.returncode == 2
    assert run.stderr.strip() == 'error: PDFs need pypdfium2: pip install "molmocap[pdf]"'
