"""Pointing: Molmo2's point answers as pixel coordinates, a count, and an image with the points marked.

Molmo2 answers "Point to the X." (and counting questions) with
`<points coords="1 1 523 412 2 600 300">X</points>`: the image index, then `object_id x y` triples with x and y
on a 0-1000 scale of the image's width and height. Molmo 1's `<point x=".." y="..">` / `<points x1=".." y1="..">`
(0-100 scale) is read too, so either family's answers parse.
"""

from __future__ import annotations

import io
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from .errors import InputError
from .files import replace_atomically

_POINTS = re.compile(r"<points?\s+coords=\"([^\"]*)\"[^>]*>(.*?)</points?>", re.DOTALL)
_V1_TAG = re.compile(r"<points?\s+([^>]*)>(.*?)</points?>", re.DOTALL)
_V1_ATTR = re.compile(r"\b(x|y)(\d*)\s*=\s*\"([-\d.]+)\"")


@dataclass(frozen=True)
class Point:
    """One pointed object, in pixels of the (upright) image."""

    x: float
    y: float
    object_id: int
    image: int
    label: str

    def to_dict(self) -> dict:
        return {k: round(v, 1) if isinstance(v, float) else v for k, v in asdict(self).items()}


def point_prompt(label: str) -> str:
    """The question Molmo2 answers with points."""
    label = label.strip()
    if not label:
        raise InputError("the label to point at is empty")
    return f"Point to the {label}."


def parse_points(text: str, width: int, height: int) -> list[Point]:
    """Every point in `text`, converted to pixels of a `width` x `height` image; malformed groups are skipped."""
    points: list[Point] = []
    for coords, label in _POINTS.findall(text):
        numbers = coords.split()
        if not numbers or not numbers[0].isdigit():
            continue
        image = int(numbers[0])
        for i in range(1, len(numbers) - 2, 3):
            try:
                object_id, x, y = int(numbers[i]), float(numbers[i + 1]), float(numbers[i + 2])
            except ValueError:
                continue
            points.append(Point(x * width / 1000, y * height / 1000, object_id, image, label.strip()))
    if points or "coords=" in text:
        return points
    for attributes, label in _V1_TAG.findall(text):
        values: dict[tuple[str, str], float] = {}
        for axis, index, value in _V1_ATTR.findall(attributes):
            values[(axis, index)] = float(value)
        for index in sorted({i for _, i in values}, key=lambda i: int(i or 0)):
            if ("x", index) in values and ("y", index) in values:
                points.append(Point(values[("x", index)] * width / 100, values[("y", index)] * height / 100,
                                    int(index or 1), 1, label.strip()))
    return points


DRAW_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}


def check_draw_target(out: str | os.PathLike) -> Path:
    """`out` as a path `draw_points` can write, else `InputError`: checked before the model runs, not after."""
    out = Path(out)
    if out.suffix.lower() not in DRAW_FORMATS:
        raise InputError(f"cannot draw into {out}: use a .png, .jpg or .webp file name")
    folder = out.parent
    if not folder.is_dir():
        raise InputError(f"cannot draw into {out}: {folder} is not a directory")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InputError(f"cannot draw into {out}: {folder} is not writable")
    return out


def draw_points(image: Image.Image, points: list[Point], out: str | os.PathLike) -> None:
    """Save `image` with a numbered marker on each point; written through a temporary file and a rename."""
    out = check_draw_target(out)
    canvas = image.convert("RGB")
    draw = ImageDraw.Draw(canvas)
    radius = max(4, round(min(canvas.size) / 60))
    for n, p in enumerate(points, start=1):
        box = (p.x - radius, p.y - radius, p.x + radius, p.y + radius)
        draw.ellipse(box, fill=(255, 0, 180), outline=(255, 255, 255), width=max(1, radius // 3))
        draw.text((p.x + radius + 2, p.y - radius), str(n), fill=(255, 0, 180))
    encoded = io.BytesIO()
    canvas.save(encoded, format=DRAW_FORMATS[out.suffix.lower()])
    try:
        replace_atomically(out, encoded.getvalue())
    except OSError as exc:
        raise InputError(f"cannot draw into {out}: {exc.strerror or exc}") from None
