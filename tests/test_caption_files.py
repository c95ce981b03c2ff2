"""Training-set captioning: `--write-txt` caption files beside the images, and Hugging Face imagefolder metadata."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import molmocap, noise_image
from molmocap.runtime.caption_files import REGISTRY_NAME, CaptionFiles
from molmocap.runtime.errors import InputError

FAST = ("--max-new-tokens", "6", "--max-crops", "1", "--threads", "1", "--no-cache")


def make_dataset(root: Path) -> list[Path]:
    images = [root / "a.png", root / "b.jpg", root / "sub" / "c.png"]
    for seed, path in enumerate(images):
        path.parent.mkdir(parents=True, exist_ok=True)
        noise_image(48 + 8 * seed, 64, seed=seed).save(path)
    return images


def captions_by_json(images: list[Path], *args: str) -> dict[str, str]:
    """The captions of the plain per-image path (`--json`, no caption files), keyed by image path."""
    run = molmocap("caption", *map(str, images), "--json", *args, *FAST)
    assert run.returncode == 0, run.stderr
    return {row["image"]: row["text"] for row in map(json.loads, run.stdout.splitlines())}


def mtimes(paths: list[Path]) -> list[int]:
    return [path.stat().st_mtime_ns for path in paths]


def test_write_txt_with_prefix_and_tags_then_resumes(tmp_path):
    images = make_dataset(tmp_path)
    run = molmocap("caption", str(tmp_path), "--write-txt", "--prefix", "sks, ", "--style", "tags", *FAST)
    assert run.returncode == 0, run.stderr
    assert run.stdout == ""
    expected = captions_by_json(images, "--style", "tags")
    txts = [image.with_suffix(".txt") for image in images]
    for image, txt in zip(images, txts):
        tags = json.loads(expected[str(image)])
        assert txt.read_text(encoding="utf-8") == "sks, " + ", ".join(tags)
    before = mtimes(txts)
    again = molmocap("caption", str(tmp_path), "--write-txt", "--prefix", "sks, ", "--style", "tags", *FAST)
    assert again.returncode == 0, again.stderr
    assert "0 captioned" in again.stderr and "3 already done" in again.stderr
    assert mtimes(txts) == before
    other_prefix = molmocap("caption", str(tmp_path), "--write-txt", "--prefix", "xyz, ", "--style", "tags", *FAST)
    assert other_prefix.returncode == 0, other_prefix.stderr
    assert all(txt.read_text(encoding="utf-8").startswith("xyz, ") for txt in txts)


def test_write_txt_extension_and_results_file_resume(tmp_path):
    images = make_dataset(tmp_path)
    out = tmp_path / "results.jsonl"
    args = ("caption", str(tmp_path), "--write-txt", "--caption-ext", ".caption", "-o", str(out), *FAST)
    assert molmocap(*args).returncode == 0
    files = [image.with_suffix(".caption") for image in images]
    expected = captions_by_json(images)
    assert [file.read_text(encoding="utf-8") for file in files] == [expected[str(image)] for image in images]
    assert not any(image.with_suffix(".txt").exists() for image in images)
    before = mtimes(files)
    again = molmocap(*args)
    assert again.returncode == 0 and "3 already in" in again.stderr
    assert mtimes(files) == before
    assert len(out.read_text().splitlines()) == 3


def test_write_txt_refuses_foreign_files_unless_told(tmp_path):
    images = make_dataset(tmp_path)
    foreign = images[1].with_suffix(".txt")
    foreign.write_text("hand-written caption")
    run = molmocap("caption", str(tmp_path), "--write-txt", *FAST)
    assert run.returncode == 2
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and str(foreign) in errors[0] and "Traceback" not in run.stderr
    assert foreign.read_text() == "hand-written caption"
    assert images[0].with_suffix(".txt").exists() and images[2].with_suffix(".txt").exists()

    ours = images[0].with_suffix(".txt")
    ours.write_text("edited by hand")  # no longer what molmocap wrote: protected as well
    skip = molmocap("caption", str(tmp_path), "--write-txt", "--skip-existing", *FAST)
    assert skip.returncode == 0, skip.stderr
    assert "0 captioned" in skip.stderr and "3 already done" in skip.stderr
    assert foreign.read_text() == "hand-written caption" and ours.read_text() == "edited by hand"

    refused = molmocap("caption", str(images[0]), str(images[2]), "--write-txt", *FAST)
    assert refused.returncode == 2 and str(ours) in refused.stderr

    overwrite = molmocap("caption", str(tmp_path), "--write-txt", "--overwrite", *FAST)
    assert overwrite.returncode == 0, overwrite.stderr
    expected = captions_by_json(images)
    assert [image.with_suffix(".txt").read_text() for image in images] == [expected[str(i)] for i in images]
    assert (tmp_path / REGISTRY_NAME).exists() and (tmp_path / "sub" / REGISTRY_NAME).exists()


@pytest.mark.parametrize("args, message", [
    (("--prefix", "sks, "), "--prefix applies"),
    (("--skip-existing",), "apply to --write-txt"),
    (("--write-txt", "--skip-existing", "--overwrite"), "cannot be combined"),
    (("--write-txt", "--caption-ext", "txt"), "--caption-ext 'txt'"),
])
def test_caption_file_usage_errors(tmp_path, args, message):
    make_dataset(tmp_path)
    run = molmocap("caption", str(tmp_path), *args, *FAST)
    assert run.returncode == 2 and message in run.stderr
    assert len(run.stderr.splitlines()) == 1
    assert not list(tmp_path.rglob("*.txt"))


def test_caption_files_text_of_each_answer_shape():
    files = CaptionFiles(prefix="sks, ")
    assert files.text("a red car ") == "sks, a red car"
    assert files.text(["red", "car"]) == files.text('["red", "car"]') == "sks, red, car"
    assert files.text({"title": "T", "caption": "a car", "keywords": ["car"]}) == "sks, a car"
    assert files.path("d/photo.jpg") == Path("d/photo.txt")
    for ext in ("../x", "txt", ".", "..txt", ".PNG", ".xmp"):
        with pytest.raises(InputError):
            CaptionFiles(ext=ext)


def test_imagefolder_metadata(tmp_path):
    images = make_dataset(tmp_path)
    out = tmp_path / "metadata.jsonl"
    args = ("caption", str(tmp_path), "-o", str(out), "--format", "imagefolder", "--prefix", "sks, ", *FAST)
    run = molmocap(*args)
    assert run.returncode == 0, run.stderr
    # Hugging Face's imagefolder: one JSON object per line with file_name relative to the metadata file's folder.
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [row["file_name"] for row in rows] == ["a.png", "b.jpg", "sub/c.png"]
    assert all(set(row) == {"file_name", "text"} for row in rows)
    assert all((tmp_path / row["file_name"]).is_file() for row in rows)
    expected = captions_by_json(images)
    assert [row["text"] for row in rows] == ["sks, " + expected[str(image)] for image in images]

    before = out.read_bytes()
    noise_image(40, 40, seed=9).save(tmp_path / "d.png")
    again = molmocap(*args)
    assert again.returncode == 0 and "1 captioned" in again.stderr and "3 already in" in again.stderr
    data = out.read_bytes()
    assert data.startswith(before) and json.loads(data[len(before):])["file_name"] == "d.png"

    outside = molmocap("caption", str(tmp_path), "-o", str(tmp_path / "sub" / "metadata.jsonl"),
                       "--format", "imagefolder", *FAST)
    assert outside.returncode == 2 and "is not inside" in outside.stderr
    assert len(outside.stderr.splitlines()) == 1
    assert not (tmp_path / "sub" / "metadata.jsonl").exists()
    csv_name = molmocap("caption", str(tmp_path), "-o", str(tmp_path / "metadata.csv"), "--format", "imagefolder",
                        *FAST)
    assert csv_name.returncode == 2 and "name the file metadata.jsonl" in csv_name.stderr
