"""Batch captioning: image discovery, kill-safe results files, resume, csv output and error rows."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from conftest import molmocap, noise_image
from molmocap.runtime.batch import CSV_COLUMNS, ResultsFile, discover, output_format
from molmocap.runtime.errors import InputError

FAST = ("--max-new-tokens", "3", "--max-crops", "1", "--threads", "1")




def make_tree(root: Path) -> list[Path]:
    """Three images in a small tree, plus files discovery must leave out; returns the images in sorted order."""
    images = [root / "a.png", root / "b.JPG", root / "sub" / "c.webp"]
    for seed, path in enumerate(images):
        path.parent.mkdir(parents=True, exist_ok=True)
        noise_image(50 + 10 * seed, 70, seed=seed).save(path, format="WEBP" if path.suffix == ".webp" else None)
    (root / "notes.txt").write_text("not an image")
    (root / ".hidden.png").write_bytes(images[0].read_bytes())
    (root / ".thumbs").mkdir()
    (root / ".thumbs" / "t.png").write_bytes(images[0].read_bytes())
    return images


def read_rows(path: Path) -> list[dict]:
    data = path.read_text(encoding="utf-8")
    assert data.endswith("\n")
    return [json.loads(line) for line in data.splitlines()]


def test_discover_directories_globs_and_files(tmp_path):
    images = make_tree(tmp_path)
    assert discover([str(tmp_path)]) == [str(p) for p in images]
    assert discover([str(tmp_path / "**" / "*.webp")]) == [str(images[2])]
    assert discover([str(tmp_path / "*")]) == [str(images[0]), str(images[1])]
    assert discover([str(tmp_path / "**")]) == [str(p) for p in images]
    explicit = str(tmp_path / "notes.txt")
    assert discover([explicit, str(images[0]), str(tmp_path)]) == [explicit, *map(str, images)]
    assert discover(["missing.png"]) == ["missing.png"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no images"):
        discover([str(tmp_path / "empty")])
    with pytest.raises(InputError, match="no images match"):
        discover([str(tmp_path / "*.gif")])


def test_output_format():
    assert output_format("r.CSV", None) == "csv"
    assert output_format("r.jsonl", None) == output_format("r.txt", None) == "jsonl"
    assert output_format("r.csv", "jsonl") == "jsonl"


def row(image: str, key: str, error: str | None = None) -> dict:
    return {"image": image, "sha256": "s", "key": key, "model": "m", "prompt": "p", "options": {}, "text": "t\n\"q\"",
            "timings": {"cached": False, "total_s": 1.0}, "error": error}


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_results_file_cuts_a_partial_row_and_retries_errors(tmp_path, fmt):
    path = tmp_path / f"out.{fmt}"
    with ResultsFile(path, fmt) as results:
        assert results.open() == set()
        results.append(row("a.png", "ka"))
        results.append(row("b.png", "kb", error="corrupt"))
        last = path.stat().st_size
        results.append(row("c.png", "kc", error="missing"))
    whole = path.read_bytes()
    with ResultsFile(path, fmt) as results:
        assert results.open(retry=["elsewhere.png"]) == {"ka"}
    assert path.read_bytes() == whole

    inside_a_field = [whole.find(b"\n", last) + 1] if fmt == "csv" else []  # just after a newline in quotes
    for cut in (len(whole) - 1, last + 3, len(whole) - 12, *inside_a_field):
        path.write_bytes(whole[:cut])
        with ResultsFile(path, fmt) as results:
            assert results.open() == {"ka"}
        assert path.read_bytes() == whole[:last], cut

    with ResultsFile(path, fmt) as results:
        assert results.open(retry=["./b.png"]) == {"ka"}
        results.append(row("b.png", "kb"))
    if fmt == "jsonl":
        assert [(r["image"], r["error"]) for r in read_rows(path)] == [("a.png", None), ("b.png", None)]
    else:
        with open(path, newline="", encoding="utf-8") as f:
            records = list(csv.DictReader(f))
        assert [(r["image"], r["error"], r["text"]) for r in records] == [("a.png", "", 't\n"q"'),
                                                                          ("b.png", "", 't\n"q"')]


def test_results_file_refuses_foreign_files(tmp_path):
    text = tmp_path / "notes.jsonl"
    text.write_text("hello\n")
    with pytest.raises(InputError, match="line 1 is not a JSON object"):
        ResultsFile(text, "jsonl").open()
    table = tmp_path / "table.csv"
    table.write_text("a,b\n1,2\n")
    with pytest.raises(InputError, match="columns differ"):
        ResultsFile(table, "csv").open()
    assert table.read_text() == "a,b\n1,2\n"
    with pytest.raises(InputError, match="cannot write"):
        ResultsFile(tmp_path / "missing" / "out.jsonl", "jsonl").open()


def test_batch_resumes_after_a_kill(exported, tmp_path):
    images = make_tree(tmp_path / "photos")
    out = tmp_path / "results.jsonl"
    model = str(exported["qwen3_gqa"])
    args = ("caption", str(tmp_path / "photos"), "-o", str(out), "--model", model, "--no-cache", *FAST)
    first = molmocap(*args, cache_dir=tmp_path)
    assert first.returncode == 0, first.stderr
    assert first.stdout == "" and "3 images: 3 captioned, 0 from the cache, 0 already in" in first.stderr
    rows = read_rows(out)
    assert [r["image"] for r in rows] == [str(p) for p in images]
    for r in rows:
        assert r["error"] is None and len(r["token_ids"]) == 3 and r["prompt_tokens"] > 0
        assert r["options"] == {"max_new_tokens": 3, "max_crops": 1, "style": None} and len(r["model"]) == 64
        assert r["timings"]["cached"] is False and len(r["sha256"]) == 64 and r["prompt"]

    whole = out.read_bytes()
    lines = whole.splitlines(keepends=True)
    out.write_bytes(b"".join(lines[:2]) + lines[2][: len(lines[2]) // 2])
    resumed = molmocap(*args, cache_dir=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "3 images: 1 captioned, 0 from the cache, 2 already in" in resumed.stderr
    again = read_rows(out)
    assert out.read_bytes().startswith(b"".join(lines[:2]))
    assert [r["image"] for r in again] == [str(p) for p in images]
    assert again[2]["token_ids"] == rows[2]["token_ids"] and again[2]["key"] == rows[2]["key"]

    done = molmocap(*args, cache_dir=tmp_path)
    assert done.returncode == 0 and "0 captioned, 0 from the cache, 3 already in" in done.stderr
    assert read_rows(out) == again


def test_batch_error_rows_and_retry(exported, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    noise_image(60, 80, seed=3).save(photos / "a.png")
    bad = photos / "b.jpg"
    bad.write_bytes((photos / "a.png").read_bytes()[:100])
    out = tmp_path / "results.jsonl"
    model = str(exported["qwen3_gqa"])
    args = ("caption", str(photos), str(tmp_path / "gone.png"), "-o", str(out), "--model", model, *FAST)
    proc = molmocap(*args, cache_dir=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[0].startswith("error: ") and "b.jpg" in lines[0]
    assert lines[1].startswith("error: image file not found") and "gone.png" in lines[1]
    assert "3 images: 1 captioned, 0 from the cache, 0 already in" in lines[2] and "2 failed" in lines[2]
    assert lines[3] == f"error: 2 of 3 images failed; their rows in {out} hold the errors"
    rows = read_rows(out)
    assert [r["error"] is None for r in rows] == [True, False, False]
    assert rows[1]["sha256"] and "text" not in rows[1] and rows[2]["sha256"] is None

    noise_image(60, 80, seed=4).save(bad)
    fixed = molmocap("caption", str(photos), "-o", str(out), "--model", model, *FAST, cache_dir=tmp_path)
    assert fixed.returncode == 0, fixed.stderr
    assert "2 images: 1 captioned, 0 from the cache, 1 already in" in fixed.stderr
    rows = read_rows(out)
    assert [(Path(r["image"]).name, r["error"]) for r in rows] == [("a.png", None), ("gone.png", rows[1]["error"]),
                                                                   ("b.jpg", None)]


def test_batch_csv_from_a_glob_and_the_cache(exported, tmp_path):
    images = make_tree(tmp_path / "photos")
    model = str(exported["qwen3_gqa"])
    pattern = str(tmp_path / "photos" / "**" / "*.*")
    out = tmp_path / "results.csv"
    first = molmocap("caption", pattern, "-o", str(out), "--model", model, *FAST, cache_dir=tmp_path)
    assert first.returncode == 0, first.stderr
    second = molmocap("caption", pattern, "-o", str(tmp_path / "again.txt"), "--format", "csv", "--model", model,
                      *FAST, cache_dir=tmp_path)
    assert "3 images: 0 captioned, 3 from the cache, 0 already in" in second.stderr
    tables = []
    for path in (out, tmp_path / "again.txt"):
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            assert tuple(reader.fieldnames) == CSV_COLUMNS
            tables.append(list(reader))
    assert [r["image"] for r in tables[0]] == [str(p) for p in images]
    assert [r["cached"] for r in tables[0]] == ["false"] * 3 and [r["cached"] for r in tables[1]] == ["true"] * 3
    assert [r["text"] for r in tables[0]] == [r["text"] for r in tables[1]]
    assert json.loads(tables[0][0]["options"])["max_crops"] == 1 and int(tables[0][0]["prompt_tokens"]) > 0


def test_single_mode_expands_directories(exported, tmp_path):
    images = make_tree(tmp_path / "photos")
    proc = molmocap("caption", str(tmp_path / "photos"), "--model", str(exported["qwen3_gqa"]), "--json", *FAST,
                    cache_dir=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert [json.loads(line)["image"] for line in proc.stdout.splitlines()] == [str(p) for p in images]


def test_batch_usage_errors(exported, tmp_path):
    model = str(exported["qwen3_gqa"])
    image = tmp_path / "a.png"
    noise_image(40, 40).save(image)
    for extra, message in [(("--json",), "do not apply"), (("--stream",), "do not apply")]:
        proc = molmocap("caption", str(image), "-o", str(tmp_path / "r.jsonl"), "--model", model, *extra,
                        cache_dir=tmp_path)
        assert proc.returncode == 2 and message in proc.stderr
    proc = molmocap("caption", str(image), "--format", "csv", "--model", model, cache_dir=tmp_path)
    assert proc.returncode == 2 and "give -o" in proc.stderr
    proc = molmocap("caption", str(tmp_path / "*.gif"), "-o", str(tmp_path / "r.jsonl"), cache_dir=tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip() == f"error: no images match {tmp_path / '*.gif'}"


def test_batch_size_keeps_rows_order_and_errors_of_the_sequential_batch(exported, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for index, size in enumerate([(60, 80), (300, 200), (20, 30), (120, 120), (90, 400)]):
        noise_image(*size, seed=index).save(photos / f"{index}.png")
    (photos / "2b.jpg").write_bytes((photos / "0.png").read_bytes()[:100])  # corrupt, in the middle of a group
    model = str(exported["qwen3_gqa"])
    tables = {}
    for size in (1, 3):
        out = tmp_path / f"b{size}.jsonl"
        proc = molmocap("caption", str(photos), "-o", str(out), "--model", model, "--no-cache", "--batch-size",
                        str(size), "--max-new-tokens", "10", "--max-crops", "2", "--threads", "1", cache_dir=tmp_path)
        assert proc.returncode == 2 and "6 images: 5 captioned" in proc.stderr, proc.stderr
        tables[size] = [(r["image"], r["error"], r.get("token_ids"), r.get("text")) for r in read_rows(out)]
    assert [Path(image).name for image, *_ in tables[1]] == ["0.png", "1.png", "2.png", "2b.jpg", "3.png", "4.png"]
    assert tables[3] == tables[1]
    assert tables[1][3][1] and len({tuple(r[2]) for r in tables[1] if r[2]}) > 1

    resumed = molmocap("caption", str(photos), "-o", str(tmp_path / "b3.jsonl"), "--model", model, "--no-cache",
                       "--batch-size", "3", "--max-new-tokens", "10", "--max-crops", "2", cache_dir=tmp_path)
    assert "6 images: 0 captioned, 0 from the cache, 5 already in" in resumed.stderr


def test_batch_size_applies_to_results_files_only(tmp_path):
    image = tmp_path / "a.png"
    noise_image(40, 40).save(image)
    proc = molmocap("caption", str(image), "--batch-size", "2", cache_dir=tmp_path)
    assert proc.returncode == 2 and "--batch-size applies to -o" in proc.stderr
