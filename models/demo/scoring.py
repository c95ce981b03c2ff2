"""Scoring a model's answer against a scene's truth: exact text for questions, boxes for points."""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass

from molmocap.runtime.pointing import parse_points

from .scenes import Box, Question, Scene

QA_KINDS = ("color", "shape", "count", "position", "presence", "word")
QUESTIONS_PER_SCENE = 3


def point_hits(points: list[tuple[float, float]], boxes: list[Box]) -> tuple[int, int]:
    """(targets hit by a distinct point inside their box, max(#targets, #points)): extra points count as misses."""
    unused = list(points)
    hits = 0
    for left, top, right, bottom in boxes:
        for p in unused:
            if left <= p[0] < right and top <= p[1] < bottom:
                unused.remove(p)
                hits += 1
                break
    return hits, max(len(boxes), len(points))


def score_points(scene: Scene, question: Question, text: str) -> tuple[int, int]:
    """`point_hits` of an answer, its points read by the runtime's Molmo2 point parser."""
    width, height = scene.image.size
    points = [(p.x, p.y) for p in parse_points(text, width, height)]
    return point_hits(points, [scene.objects[i].box for i in question.targets])


def is_correct(scene: Scene, question: Question, text: str) -> bool:
    """Exact answer for questions and captions; for pointing, every target hit and no extra point."""
    if question.kind != "point":
        return text.strip() == question.answer
    hits, total = score_points(scene, question, text)
    return hits == total


@dataclass(frozen=True)
class Item:
    """One evaluated request: a scene and one of its questions."""

    scene: Scene
    question: Question


def eval_items(scene: Scene) -> list[Item]:
    """What a scene is scored on: its short caption, up to QUESTIONS_PER_SCENE questions of distinct kinds and one
    pointing request, drawn with the scene's own seed (the same items on every run)."""
    rng = random.Random(scene.seed)
    by_kind = defaultdict(list)
    for q in scene.questions:
        by_kind[q.kind].append(q)
    kinds = [k for k in QA_KINDS if by_kind[k]]
    chosen = [by_kind["caption"][0]]
    chosen += [rng.choice(by_kind[k]) for k in rng.sample(kinds, min(QUESTIONS_PER_SCENE, len(kinds)))]
    chosen.append(rng.choice(by_kind["point"]))
    return [Item(scene, q) for q in chosen]
