"""The shipped demo model: its scene generator is deterministic and its ONNX export answers held-out questions."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.demo.scenes import HELD_OUT_SEED, make_scene  # noqa: E402

DEMO_ONNX = ROOT / "models" / "demo" / "onnx"
# Held-out scenes and the questions asked of them: one of each kind, every answer checked exactly.
QUESTIONS = [
    (HELD_OUT_SEED + 0, "caption"), (HELD_OUT_SEED + 1, "color"), (HELD_OUT_SEED + 2, "shape"),
    (HELD_OUT_SEED + 3, "count"), (HELD_OUT_SEED + 4, "position"), (HELD_OUT_SEED + 5, "presence"),
    (HELD_OUT_SEED + 6, "caption"), (HELD_OUT_SEED + 7, "point"),
]


def test_scene_generator_is_deterministic():
    for seed in (0, 17, HELD_OUT_SEED + 3):
        a, b = make_scene(seed), make_scene(seed)
        assert a.image.size == b.image.size and a.image.tobytes() == b.image.tobytes()
        assert a.questions == b.questions and a.objects == b.objects
        assert a.caption == b.caption and a.detailed_caption == b.detailed_caption
    assert make_scene(1).image.tobytes() != make_scene(2).image.tobytes()


def test_scene_truth_is_consistent():
    for seed in range(HELD_OUT_SEED, HELD_OUT_SEED + 40):
        scene = make_scene(seed)
        width, height = scene.image.size
        assert 1 <= len(scene.objects) <= 4
        assert len({o.slot for o in scene.objects}) == len(scene.objects)
        for obj in scene.objects:
            left, top, right, bottom = obj.box
            assert 0 <= left < right <= width and 0 <= top < bottom <= height
            assert scene.image.getpixel(((left + right) // 2, (top + bottom) // 2)) != scene.image.getpixel((0, 0))
        assert scene.caption.endswith(f"on a {scene.background} background.")


def _question(seed: int, kind: str):
    return next(q for q in make_scene(seed).questions if q.kind == kind)


@pytest.mark.skipif(not (DEMO_ONNX / "molmocap.json").is_file(), reason="the demo model is not exported")
def test_demo_model_answers_held_out_questions():
    from runtime import Captioner

    captioner = Captioner.load(DEMO_ONNX, threads=2)
    for seed, kind in QUESTIONS:
        question = _question(seed, kind)
        result = captioner.generate(make_scene(seed).image, question.prompt, max_new_tokens=64)
        assert result.text.strip() == question.answer, (seed, question.prompt)


@pytest.mark.skipif(not (DEMO_ONNX / "molmocap.json").is_file(), reason="the demo model is not exported")
def test_demo_model_default_prompt_is_the_short_caption():
    from runtime import Captioner

    scene = make_scene(HELD_OUT_SEED + 8)
    result = Captioner.load(DEMO_ONNX, threads=2).generate(scene.image, max_new_tokens=48)
    assert result.text.strip() == scene.caption
