"""Scoring a model's answer against a scene's truth: exact text for questions, boxes for points."""

from __future__ import annotations

from runtime.pointing import parse_points

from .scenes import Box, Question, Scene


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
