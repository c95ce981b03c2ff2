"""Deterministic synthetic scenes with known truth: the demo model's training data and its held-out test set.

A scene is one to four flat shapes (each in its own slot: left, right, top, bottom or center) on a plain
background, sometimes with a short word printed in Pillow's bitmap font, drawn on a canvas of varied size and
aspect ratio (200..1200 px a side, up to 3:1) so that Molmo2's multi-crop tiling is exercised. Everything about a
scene follows from its integer seed, and every caption, answer and point is derived from the same truth, so a
model's output can be scored exactly. Training uses seeds below `HELD_OUT_SEED`; evaluation uses seeds from it up.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

from PIL import Image, ImageDraw, ImageFont

HELD_OUT_SEED = 10**9

SHAPES = ("circle", "square", "triangle", "star")
COLORS = {
    "red": (220, 30, 30), "green": (40, 170, 60), "blue": (40, 80, 230),
    "yellow": (245, 215, 30), "purple": (150, 60, 190), "orange": (250, 135, 20),
}
BACKGROUNDS = {"white": (255, 255, 255), "black": (0, 0, 0), "gray": (128, 128, 128)}
WORDS = ("go", "cat", "stop", "hello", "molmo")
SIZES = {"small": 0.2, "large": 0.28}  # bounding-box side as a share of the image's shorter side
# Slot centres as shares of (width, height), listed in reading order (the order points are written in).
SLOTS = {"top": (0.5, 0.18), "left": (0.18, 0.5), "center": (0.5, 0.5), "right": (0.82, 0.5), "bottom": (0.5, 0.82)}
SLOT_PHRASES = {"top": "at the top", "left": "on the left", "center": "in the center", "right": "on the right",
                "bottom": "at the bottom"}
NUMBERS = ("zero", "one", "two", "three", "four")
JITTER = 0.02  # slot centre jitter, share of width/height
COLOR_JITTER = 12
GAP = 4  # minimum pixels between any two drawn things

CAPTION_PROMPT = "Describe this image."
DETAILED_PROMPT = "Describe this image in detail."
WORD_PROMPT = "What word is written?"

Box = tuple[int, int, int, int]  # left, top, right, bottom in pixels (right/bottom exclusive)


@dataclass(frozen=True)
class SceneObject:
    """One drawn shape and its pixel bounding box."""

    shape: str
    color: str
    size: str
    slot: str
    box: Box

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"


@dataclass(frozen=True)
class Question:
    """A prompt and its exact expected answer; `kind` names what it tests, `targets` the objects a point task names."""

    kind: str
    prompt: str
    answer: str
    targets: tuple[int, ...] = ()


@dataclass
class Scene:
    """A rendered scene with its ground truth and every text derived from it."""

    seed: int
    image: Image.Image
    background: str
    objects: list[SceneObject]
    word: str | None = None
    word_slot: str | None = None
    word_box: Box | None = None
    questions: list[Question] = field(default_factory=list)

    @property
    def caption(self) -> str:
        return short_caption(self)

    @property
    def detailed_caption(self) -> str:
        return detailed_caption(self)


def _plural(shape: str, count: int) -> str:
    return shape if count == 1 else shape + "s"


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _groups(objects: list[SceneObject]) -> list[tuple[str, str, list[int]]]:
    """(shape, color, object indices) per distinct colored shape, in canonical order (shape, then color)."""
    keys = sorted({(o.shape, o.color) for o in objects},
                  key=lambda k: (SHAPES.index(k[0]), list(COLORS).index(k[1])))
    return [(s, c, [i for i, o in enumerate(objects) if (o.shape, o.color) == (s, c)]) for s, c in keys]


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def short_caption(scene: Scene) -> str:
    """Canonical one-sentence caption, e.g. "a red circle and two blue squares on a white background."."""
    parts = [f"{_article(color) if len(idx) == 1 else NUMBERS[len(idx)]} {color} {_plural(shape, len(idx))}"
             for shape, color, idx in _groups(scene.objects)]
    return f"{_join(parts)} on a {scene.background} background."


def detailed_caption(scene: Scene) -> str:
    """The short caption, then one sentence per object in reading order, then the printed word if any."""
    first = short_caption(scene)
    sentences = [first[0].upper() + first[1:]]
    for obj in sorted(scene.objects, key=lambda o: list(SLOTS).index(o.slot)):
        sentences.append(f"The {obj.size} {obj.color} {obj.shape} is {SLOT_PHRASES[obj.slot]}.")
    if scene.word:
        sentences.append(f'The word "{scene.word}" is written {SLOT_PHRASES[scene.word_slot]}.')
    return " ".join(sentences)


def box_center(box: Box) -> tuple[float, float]:
    return (box[0] + box[2]) / 2, (box[1] + box[3]) / 2


def point_answer(scene: Scene, targets: list[int], label: str) -> str:
    """Molmo2's pointing format: image index 1, then `id x y` per point, x and y on a 0-1000 scale (3+ digits)."""
    width, height = scene.image.size
    ordered = sorted(targets, key=lambda i: list(SLOTS).index(scene.objects[i].slot))
    coords = ["1"]
    for n, i in enumerate(ordered, start=1):
        x, y = box_center(scene.objects[i].box)
        coords.append(f"{n} {round(1000 * x / width):03d} {round(1000 * y / height):03d}")
    return f'<points coords="{" ".join(coords)}">{label}</points>'


def _questions(scene: Scene, rng: random.Random) -> list[Question]:
    """Every question with an unambiguous answer, plus a sampled set of presence/count negatives."""
    objs = scene.objects
    groups = _groups(objs)
    qs = [Question("caption", CAPTION_PROMPT, short_caption(scene)),
          Question("detailed", DETAILED_PROMPT, detailed_caption(scene))]
    shapes_present = {o.shape for o in objs}
    colors_present = {o.color for o in objs}
    for shape in sorted(shapes_present, key=SHAPES.index):
        colors = {o.color for o in objs if o.shape == shape}
        if len(colors) == 1:
            qs.append(Question("color", f"What color is the {shape}?", colors.pop()))
    for color in sorted(colors_present, key=list(COLORS).index):
        shapes = {o.shape for o in objs if o.color == color}
        if len(shapes) == 1:
            qs.append(Question("shape", f"What shape is the {color} object?", shapes.pop()))
    absent_shapes = [s for s in SHAPES if s not in shapes_present]
    count_shapes = sorted(shapes_present, key=SHAPES.index) + rng.sample(absent_shapes, min(1, len(absent_shapes)))
    for shape in count_shapes:
        n = sum(o.shape == shape for o in objs)
        qs.append(Question("count", f"How many {shape}s are there?", NUMBERS[n]))
    qs.append(Question("count", "How many objects are there?", NUMBERS[len(objs)]))
    for shape, color, idx in groups:
        if len(idx) == 1:
            qs.append(Question("position", f"Where is the {color} {shape}?", objs[idx[0]].slot))
        label = f"{color} {_plural(shape, len(idx))}"
        qs.append(Question("point", f"Point to the {label}.", point_answer(scene, idx, label), tuple(idx)))
        qs.append(Question("presence", f"Is there {_article(color)} {color} {shape}?", "yes"))
    present = {(o.shape, o.color) for o in objs}
    near_misses = [(s, c) for s in SHAPES for c in COLORS
                   if (s, c) not in present and (s in shapes_present or c in colors_present)]
    for shape, color in rng.sample(near_misses, min(len(groups), len(near_misses))):
        qs.append(Question("presence", f"Is there {_article(color)} {color} {shape}?", "no"))
    if scene.word:
        qs.append(Question("word", WORD_PROMPT, scene.word))
    return qs


def _image_size(rng: random.Random) -> tuple[int, int]:
    ratio = 3.0 ** rng.uniform(0.0, 1.0)
    short = rng.randint(200, 600)
    long = min(1200, round(short * ratio))
    short = min(short, long)
    return (long, short) if rng.random() < 0.5 else (short, long)


def _overlaps(a: Box, b: Box) -> bool:
    return a[0] < b[2] + GAP and b[0] < a[2] + GAP and a[1] < b[3] + GAP and b[1] < a[3] + GAP


def _inside(box: Box, width: int, height: int) -> bool:
    return box[0] >= GAP and box[1] >= GAP and box[2] <= width - GAP and box[3] <= height - GAP


def _slot_box(rng: random.Random, slot: str, box_w: int, box_h: int, width: int, height: int) -> Box:
    sx, sy = SLOTS[slot]
    cx = (sx + rng.uniform(-JITTER, JITTER)) * width
    cy = (sy + rng.uniform(-JITTER, JITTER)) * height
    left, top = round(cx - box_w / 2), round(cy - box_h / 2)
    return left, top, left + box_w, top + box_h


def _jitter(rgb: tuple[int, int, int], rng: random.Random) -> tuple[int, int, int]:
    return tuple(max(0, min(255, v + rng.randint(-COLOR_JITTER, COLOR_JITTER))) for v in rgb)


def _star(box: Box) -> list[tuple[float, float]]:
    cx, cy = box_center(box)
    rx, ry = (box[2] - box[0]) / 2, (box[3] - box[1]) / 2
    points = []
    for k in range(10):
        angle = -math.pi / 2 + k * math.pi / 5
        scale = 1.0 if k % 2 == 0 else 0.45
        points.append((cx + scale * rx * math.cos(angle), cy + scale * ry * math.sin(angle)))
    return points


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: Box, fill: tuple[int, int, int] | int) -> None:
    left, top, right, bottom = box[0], box[1], box[2] - 1, box[3] - 1
    if shape == "circle":
        draw.ellipse((left, top, right, bottom), fill=fill)
    elif shape == "square":
        draw.rectangle((left, top, right, bottom), fill=fill)
    elif shape == "triangle":
        draw.polygon([((left + right) / 2, top), (left, bottom), (right, bottom)], fill=fill)
    else:
        draw.polygon(_star(box), fill=fill)


def _word_mask(word: str, scale: int) -> Image.Image:
    font = ImageFont.load_default_imagefont()  # the bitmap font: identical on every platform
    left, top, right, bottom = font.getbbox(word)
    mask = Image.new("L", (right - left, bottom - top), 0)
    ImageDraw.Draw(mask).text((-left, -top), word, fill=255, font=font)
    return mask.resize((mask.width * scale, mask.height * scale), Image.Resampling.NEAREST)


def object_map(scene: Scene) -> Image.Image:
    """A mode "L" map of the scene: 0 background, 1 + i inside object i's shape, 255 inside the word's box."""
    labels = Image.new("L", scene.image.size, 0)
    draw = ImageDraw.Draw(labels)
    for i, obj in enumerate(scene.objects):
        _draw_shape(draw, obj.shape, obj.box, i + 1)
    if scene.word_box:
        draw.rectangle((scene.word_box[0], scene.word_box[1], scene.word_box[2] - 1, scene.word_box[3] - 1), fill=255)
    return labels


def make_scene(seed: int) -> Scene:
    """The scene of `seed`: same seed, same pixels and same truth, on every run and platform."""
    rng = random.Random(seed)
    width, height = _image_size(rng)
    short = min(width, height)
    background = rng.choice(list(BACKGROUNDS))
    image = Image.new("RGB", (width, height), _jitter(BACKGROUNDS[background], rng))
    draw = ImageDraw.Draw(image)

    n_objects = rng.choice((1, 2, 2, 3, 3, 4))
    slots = rng.sample(list(SLOTS), n_objects)
    objects: list[SceneObject] = []
    for slot in slots:
        if objects and rng.random() < 0.35:
            shape, color = rng.choice([(o.shape, o.color) for o in objects])
        else:
            shape, color = rng.choice(SHAPES), rng.choice(list(COLORS))
        size = rng.choice(list(SIZES))
        side = round(SIZES[size] * short)
        for _ in range(50):
            box = _slot_box(rng, slot, side, side, width, height)
            if _inside(box, width, height) and not any(_overlaps(box, o.box) for o in objects):
                break
        else:
            continue
        objects.append(SceneObject(shape, color, size, slot, box))
        _draw_shape(draw, shape, box, _jitter(COLORS[color], rng))

    scene = Scene(seed=seed, image=image, background=background, objects=objects)
    if rng.random() < 0.4:
        word = rng.choice(WORDS)
        mask = _word_mask(word, max(2, round(0.16 * short / 11)))
        free = [s for s in SLOTS if s not in {o.slot for o in objects}]
        for slot in rng.sample(free, len(free)):
            box = _slot_box(rng, slot, mask.width, mask.height, width, height)
            if _inside(box, width, height) and not any(_overlaps(box, o.box) for o in objects):
                ink = (255, 255, 255) if background == "black" else (0, 0, 0)
                image.paste(Image.new("RGB", mask.size, ink), box[:2], mask)
                scene.word, scene.word_slot, scene.word_box = word, slot, box
                break
    scene.questions = _questions(scene, rng)
    return scene
