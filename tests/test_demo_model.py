"""The shipped demo model: its scene generator is deterministic and true to itself, and the committed ONNX export
reproduces the committed checkpoint token for token on held-out scenes, and the default model demonstrably uses the
image. (Its full accuracy is measured by benchmarks/eval_demo.py.)"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.demo.scenes import CAPTION_PROMPT, HELD_OUT_SEED, make_scene  # noqa: E402
from models.demo.scoring import is_correct  # noqa: E402

DEMO_ONNX = ROOT / "models" / "demo" / "onnx"
DEMO_CHECKPOINT = ROOT / "models" / "demo" / "checkpoint"


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
        assert all(is_correct(scene, q, q.answer) for q in scene.questions)


@pytest.fixture(scope="module")
def reference():
    from transformers import Molmo2ForConditionalGeneration, Molmo2Processor

    return (Molmo2ForConditionalGeneration.from_pretrained(DEMO_CHECKPOINT).eval(),
            Molmo2Processor.from_pretrained(DEMO_CHECKPOINT))


def test_probe_targets_follow_the_processor():
    """The training probes' targets: one class per ViT patch of every crop and per image token the model keeps; a
    token's class is one of its patches' classes (or background), and each object's centre patch in the global
    view carries that object's colored shape."""
    pytest.importorskip("transformers")
    from transformers import Molmo2ImageProcessor

    from models.demo.grounding import object_class, patch_and_token_classes
    from models.demo.scenes import box_center

    processor = Molmo2ImageProcessor(max_crops=2)
    scene = make_scene(HELD_OUT_SEED + 7)
    out = processor(images=[scene.image], return_tensors="pt")
    patches, tokens = patch_and_token_classes(scene, processor)
    pooling = out["image_token_pooling"].reshape(-1, out["image_token_pooling"].shape[-1])
    kept = pooling[(pooling >= 0).any(1)]
    assert len(patches) == out["pixel_values"].shape[0] * out["pixel_values"].shape[1]
    assert len(tokens) == len(kept)
    for token_class, window in zip(tokens.tolist(), kept.tolist()):
        assert token_class == 0 or token_class in {patches[i].item() for i in window if i >= 0}
    width, height = scene.image.size
    side = processor.size["height"] // processor.patch_size  # patches per side of the global view (crop 0)
    for obj in scene.objects:
        x, y = box_center(obj.box)
        centre = int(y / height * side) * side + int(x / width * side)
        assert patches[centre].item() == object_class(obj)


def test_packed_turns_compute_what_lone_prompts_compute(reference):
    """Training packs a scene's questions behind one shared image prefix; each packed turn must get the logits the
    same question gets alone, as `generate` lays it out (chat template), or the model is trained on a different
    computation than the one it runs."""
    import torch

    from models.demo.packing import pack, single_prompt_inputs

    model, processor = reference
    scene = make_scene(HELD_OUT_SEED + 9)
    questions = scene.questions[:2] + scene.questions[-2:]
    packed = pack(processor, scene.image, questions)
    with torch.no_grad():
        packed_logits = model(**packed.inputs).logits[0, packed.predict_at]
    start = 0
    for q in questions:
        answer = processor.tokenizer(q.answer + "<|im_end|>", add_special_tokens=False)["input_ids"]
        lone = single_prompt_inputs(processor, scene.image, q.prompt)
        prompt_len = lone["input_ids"].shape[1]
        lone["input_ids"] = torch.cat([lone["input_ids"], torch.tensor([answer])], dim=1)
        lone["attention_mask"] = torch.ones_like(lone["input_ids"])
        answer_types = torch.zeros(1, len(answer), dtype=torch.long)
        lone["mm_token_type_ids"] = torch.cat([lone["mm_token_type_ids"], answer_types], dim=1)
        with torch.no_grad():
            lone_logits = model(**lone).logits[0, prompt_len - 1: prompt_len - 1 + len(answer)]
        turn = slice(start, start + len(answer))
        assert packed.targets[turn].tolist() == answer
        torch.testing.assert_close(packed_logits[turn], lone_logits, atol=1e-4, rtol=1e-4)
        start += len(answer)
    assert start == len(packed.targets)


@pytest.mark.parametrize("offset", range(4))
def test_shipped_onnx_gives_the_checkpoints_tokens_on_held_out_scenes(offset, reference):
    """The committed export is the committed checkpoint: same greedy tokens as transformers, caption and question."""
    import torch

    from models.demo.packing import single_prompt_inputs
    from molmocap.runtime import Captioner

    model, processor = reference
    captioner = Captioner.load(DEMO_ONNX, threads=2)
    scene = make_scene(HELD_OUT_SEED + 100 + offset)
    for prompt in (CAPTION_PROMPT, scene.questions[-1].prompt):
        inputs = single_prompt_inputs(processor, scene.image, prompt)
        with torch.no_grad():
            expected = model.generate(**inputs, max_new_tokens=48, do_sample=False)[0, inputs["input_ids"].shape[1]:]
        expected = [t for t in expected.tolist() if t not in captioner.stop_ids]
        assert captioner.generate(scene.image, prompt, max_new_tokens=48).token_ids == expected


def test_demo_model_default_prompt_is_its_caption_prompt():
    from molmocap.runtime import Captioner

    captioner = Captioner.load(DEMO_ONNX, threads=2)
    image = make_scene(HELD_OUT_SEED).image
    assert captioner.manifest.prompt["default_caption_prompt"] == CAPTION_PROMPT
    assert captioner.generate(image, max_new_tokens=48).text == captioner.generate(image, CAPTION_PROMPT, 48).text
    assert captioner.generate(image, max_new_tokens=48).text.endswith("background.")


ACCURACY_SCENES = range(HELD_OUT_SEED + 500, HELD_OUT_SEED + 530)  # held out, not used by any other test


def test_default_model_sees_held_out_scenes():
    """The CLI's default model reads the image: on 30 held-out scenes (never trained on, not picked by hand) its
    captions name the background and the exact set of object colors, its points land inside the named objects, and
    it answers the scored questions, at rates a model that ignores the image cannot reach (the nearly blind first
    run: 27.5% of points, 40% of questions; guessing a background: 33%). The bars sit under what the shipped weights
    measure here (100%, 87%, 89%, 87%); issue 4's 90%/85% targets are not met by them (benchmarks/eval_demo.py)."""
    from models.demo.scenes import COLORS
    from models.demo.scoring import eval_items, score_points
    from molmocap.cli import DEFAULT_MODEL
    from molmocap.runtime import Captioner

    captioner = Captioner.load(DEFAULT_MODEL, threads=2)
    backgrounds, color_sets, answers, hits, targets = [], [], [], 0, 0
    for seed in ACCURACY_SCENES:
        scene = make_scene(seed)
        encoded = captioner.encode_image(scene.image)
        for item in eval_items(scene):
            q = item.question
            text = captioner.generate(encoded, q.prompt, max_new_tokens=48).text.strip()
            if q.kind == "caption":
                backgrounds.append(text.endswith(f"on a {scene.background} background."))
                color_sets.append({w for w in text.split() if w in COLORS} == {o.color for o in scene.objects})
            elif q.kind == "point":
                hit, total = score_points(scene, q, text)
                hits, targets = hits + hit, targets + total
            else:
                answers.append(text == q.answer)
    assert len(backgrounds) == len(ACCURACY_SCENES) and len(answers) >= 60
    assert sum(backgrounds) >= 0.9 * len(backgrounds), f"background named in {sum(backgrounds)} of 30 captions"
    assert sum(color_sets) >= 0.8 * len(color_sets), f"colors named exactly in {sum(color_sets)} of 30 captions"
    assert hits >= 0.75 * targets, f"{hits} of {targets} points inside their object"
    assert sum(answers) >= 0.75 * len(answers), f"{sum(answers)} of {len(answers)} questions answered"
