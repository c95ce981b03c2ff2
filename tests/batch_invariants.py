"""What must hold of a batch's results file, sidecars and folders after any run, killed or not (and the images
such runs caption), shared by tests/test_batch_faults.py and benchmarks/kill_batch.py.

Parsed independently of molmocap's own reader, so that a bug there cannot hide here: the complete part of a results
file is everything up to its last newline; after a kill only the row in flight may follow, unfinished (the next run
cuts it off). Rows are compared with an uninterrupted reference run of the same images.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import random
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw

RDF = "{http://www.w3.org/1999/02/22-rdf-syntax-ns#}"
DC = "{http://purl.org/dc/elements/1.1/}"


def draw_images(folder: Path, count: int, seed: int, size: tuple[int, int] | None = None) -> None:
    """`count` images of colored shapes (PNG and JPEG alternately), small and of varied sizes unless `size`."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        width, height = size or (rng.randint(60, 200), rng.randint(60, 200))
        picture = Image.new("RGB", (width, height), tuple(rng.randint(0, 255) for _ in range(3)))
        draw = ImageDraw.Draw(picture)
        for _ in range(rng.randint(1, 4)):
            x, y = rng.randint(0, width - 20), rng.randint(0, height - 20)
            box = (x, y, x + rng.randint(10, width // 4 + 10), y + rng.randint(10, height // 4 + 10))
            getattr(draw, rng.choice(["ellipse", "rectangle"]))(box, fill=tuple(rng.randint(0, 255) for _ in range(3)))
        picture.save(folder / f"img{index:03d}.{'png' if index % 2 else 'jpg'}")


@dataclass
class Snapshot:
    """A results file as it is on disk: its bytes, the length of the part made of whole rows, and those rows."""

    data: bytes = b""
    complete: int = 0
    rows: list[dict] = field(default_factory=list)
    torn: list[str] = field(default_factory=list)  # complete lines that are not whole rows

    @property
    def tail(self) -> bytes:
        return self.data[self.complete:]


def read_results(path: Path, fmt: str) -> Snapshot:
    """The rows of a JSON lines or CSV results file as {image, sha256, text, error}; absent means empty."""
    if not path.exists():
        return Snapshot()
    data = path.read_bytes()
    complete = data.rfind(b"\n") + 1
    text = data[:complete].decode("utf-8")
    snapshot = Snapshot(data, complete)
    if fmt == "csv":
        for record in csv.DictReader(io.StringIO(text, newline="")):
            if None in record or any(value is None for value in record.values()) or len(record["sha256"]) != 64:
                snapshot.torn.append(repr(record)[:200])
                continue
            error = record["error"] or None
            snapshot.rows.append({"image": record["image"], "sha256": record["sha256"],
                                  "text": None if error else record["text"], "error": error})
        return snapshot
    for line in text.splitlines():
        try:
            row = json.loads(line)
            snapshot.rows.append({"image": row["image"], "sha256": row["sha256"],
                                  "text": None if row["error"] else row["text"], "error": row["error"]})
        except (ValueError, KeyError, TypeError):
            snapshot.torn.append(line[:200])
    return snapshot


def temporary_files(*folders: Path) -> list[Path]:
    """Hidden `.tmp` files (the pattern of molmocap's atomic writes) anywhere under `folders`."""
    return sorted(Path(top) / name for folder in folders for top, _, names in os.walk(folder) for name in names
                  if name.startswith(".") and name.endswith(".tmp"))


def sidecar_description(path: Path) -> str:
    """The dc:description of an XMP sidecar; raises ET.ParseError (or OSError) when it is not whole XML."""
    node = ET.parse(path).getroot().find(f".//{DC}description/{RDF}Alt/{RDF}li")
    if node is None:
        raise ET.ParseError(f"{path} has no dc:description")
    return node.text or ""


def problems(now: Snapshot, before: Snapshot, reference: dict[str, str], cwd: Path, image_dir: Path,
             out_dir: Path, finished: bool) -> list[str]:
    """Every broken rule after a run (killed, or `finished` with exit 0): none lost, duplicated, torn or wrong,
    no stray temporary file, every sidecar whole and matching its row."""
    found = [f"torn row: {line}" for line in now.torn]
    if now.rows[:len(before.rows)] != before.rows or not now.data.startswith(before.data[:before.complete]):
        found.append(f"rows lost or changed: {len(before.rows)} before, {len(now.rows)} now")
    images = [row["image"] for row in now.rows]
    found += [f"duplicated row: {image}" for image in sorted({i for i in images if images.count(i) > 1})]
    for row in now.rows:
        if row["image"] not in reference:
            found.append(f"row for an unknown image: {row['image']}")
            continue
        if row["error"] is not None or row["text"] != reference[row["image"]]:
            found.append(f"wrong row for {row['image']}: {row['text']!r} / {row['error']!r}, expected "
                         f"{reference[row['image']]!r}")
        if row["sha256"] != hashlib.sha256((cwd / row["image"]).read_bytes()).hexdigest():
            found.append(f"wrong sha256 in the row of {row['image']}")
        try:
            if sidecar_description((cwd / row["image"]).with_suffix(".xmp")) != row["text"]:
                found.append(f"sidecar of {row['image']} does not hold its caption")
        except (OSError, ET.ParseError) as exc:
            found.append(f"sidecar of {row['image']} missing or not whole: {exc}")
    for sidecar in image_dir.rglob("*.xmp"):
        try:
            sidecar_description(sidecar)
        except (OSError, ET.ParseError) as exc:
            found.append(f"sidecar {sidecar.name} not whole: {exc}")
    done = {(cwd / image).with_suffix(".xmp").name for image in images}
    for temporary in temporary_files(image_dir, out_dir):
        if finished or any(temporary.name.startswith(f".{name}.") for name in done):
            found.append(f"stray temporary file {temporary.name}")
    if finished:
        if now.tail:
            found.append(f"unfinished last row after a finished run: {now.tail[:80]!r}")
        if sorted(images) != sorted(reference):
            found.append(f"finished with {len(images)} rows for {len(reference)} images")
    return found
