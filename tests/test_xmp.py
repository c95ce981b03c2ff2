"""XMP sidecars: the document parses back with the caption and keywords, and foreign sidecars are kept."""

from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from conftest import molmocap, noise_image
from molmocap.runtime.errors import InputError
from molmocap.runtime.xmp import (
    NS,
    check_sidecar,
    sidecar_fields,
    sidecar_path,
    sidecar_xml,
    write_sidecar,
)

FAST = ("--max-new-tokens", "3", "--max-crops", "1", "--threads", "1")
LANG = "{http://www.w3.org/XML/1998/namespace}lang"




def parse(data: bytes | Path) -> dict:
    """The parts of a sidecar a photo manager reads, found by namespace."""
    root = ET.fromstring(data) if isinstance(data, bytes) else ET.parse(data).getroot()
    assert root.tag == f"{{{NS['x']}}}xmpmeta"
    node = root.find(f"{{{NS['rdf']}}}RDF/{{{NS['rdf']}}}Description")
    items = node.findall(f"{{{NS['dc']}}}description/{{{NS['rdf']}}}Alt/{{{NS['rdf']}}}li")
    assert len(items) == 1 and items[0].get(LANG) == "x-default"
    subject = node.find(f"{{{NS['dc']}}}subject/{{{NS['rdf']}}}Bag")
    return {"description": items[0].text or "", "image": node.get(f"{{{NS['molmocap']}}}image"),
            "model": node.get(f"{{{NS['molmocap']}}}model"),
            "subject": None if subject is None else [li.text for li in subject.findall(f"{{{NS['rdf']}}}li")]}


def test_sidecar_path():
    assert sidecar_path("dir/photo.jpg") == Path("dir/photo.xmp")
    assert sidecar_path("photo.tar.png") == Path("photo.tar.xmp")


@pytest.mark.parametrize("answer,description,subject", [
    ("A red circle & a <blue> square.", "A red circle & a <blue> square.", None),
    ('["red", " circle ", ""]', "red, circle", ["red", "circle"]),
    (["sky", "sea"], "sky, sea", ["sky", "sea"]),
    ({"title": "T", "caption": "A beach.", "keywords": ["sand", "sea"]}, "A beach.", ["sand", "sea"]),
    ('["not", 3]', '["not", 3]', None),
    ("bell\x07 and tab\t", "bell and tab", None),
])
def test_sidecar_content_parses_back(answer, description, subject):
    assert sidecar_fields(answer)[1] == subject
    data = sidecar_xml("photos/p.jpg", answer, "abc123")
    assert data.startswith(b"<?xml version='1.0' encoding='utf-8'?>")
    parsed = parse(data)
    assert parsed == {"description": description, "image": "p.jpg", "model": "abc123", "subject": subject}


def test_sidecars_molmocap_did_not_write_are_kept(tmp_path):
    image = tmp_path / "photo.jpg"
    sidecar = tmp_path / "photo.xmp"
    assert write_sidecar(image, "first", "m") == sidecar
    assert write_sidecar(image, "second", "m") == sidecar
    assert parse(sidecar)["description"] == "second"
    umask = os.umask(0)
    os.umask(umask)
    assert sidecar.stat().st_mode & 0o777 == 0o666 & ~umask
    assert [p.name for p in tmp_path.iterdir()] == ["photo.xmp"]

    with pytest.raises(InputError, match="sidecar for photo.jpg; pass --force"):
        check_sidecar(tmp_path / "photo.png")
    foreign = b"<x:xmpmeta xmlns:x='adobe:ns:meta/'><!-- from Lightroom --></x:xmpmeta>"
    sidecar.write_bytes(foreign)
    with pytest.raises(InputError, match="molmocap did not write; pass --force"):
        write_sidecar(image, "third", "m")
    sidecar.write_bytes(b"not xml at all")
    with pytest.raises(InputError, match="did not write"):
        check_sidecar(image)
    assert sidecar.read_bytes() == b"not xml at all"
    write_sidecar(image, "forced", "m", force=True)
    assert parse(sidecar)["description"] == "forced"


def test_cli_writes_sidecars(exported, tmp_path):
    photos = tmp_path / "photos"
    (photos / "sub").mkdir(parents=True)
    images = [photos / "a.png", photos / "sub" / "b.jpg"]
    for seed, path in enumerate(images):
        noise_image(60, 70, seed=seed).save(path)
    model = str(exported["qwen3_gqa"])
    out = tmp_path / "results.jsonl"
    proc = molmocap("caption", str(photos), "-o", str(out), "--write-xmp", "--model", model, *FAST,
                    cache_dir=tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    for row, image in zip(rows, images):
        parsed = parse(image.with_suffix(".xmp"))
        assert parsed["description"] == row["text"].strip() and parsed["image"] == image.name
        assert parsed["model"] == row["model"] and parsed["subject"] is None

    foreign = photos / "sub" / "b.xmp"
    foreign.write_text("<x:xmpmeta xmlns:x='adobe:ns:meta/'/>")
    single = molmocap("caption", str(images[1]), "--write-xmp", "--model", model, *FAST, cache_dir=tmp_path)
    assert single.returncode == 2 and single.stdout == "" and "pass --force" in single.stderr
    batch = molmocap("caption", str(photos), "-o", str(tmp_path / "again.jsonl"), "--write-xmp", "--model", model,
                     *FAST, cache_dir=tmp_path)
    assert batch.returncode == 2 and "pass --force" in batch.stderr
    assert foreign.read_text() == "<x:xmpmeta xmlns:x='adobe:ns:meta/'/>"
    forced = molmocap("caption", str(images[1]), "--write-xmp", "--force", "--model", model, *FAST,
                      cache_dir=tmp_path)
    assert forced.returncode == 0, forced.stderr
    assert parse(foreign)["description"] == forced.stdout.strip()
