"""The slow tier (`python -m pytest -m slow`; the default run leaves it out): parity at a scale the default run
cannot afford.

- The shipped demo model's ONNX export against its transformers checkpoint on 40 held-out scenes, every scored item
  (caption, questions, pointing): the same greedy tokens, where the default run checks 4 scenes and 2 prompts.
- A larger random Molmo2 (8 decoder layers, 8 heads, an 8-layer ViT, 4x the tiny widths) exported as a user does,
  on a large image at the full 8 crops: the same prompt and greedy tokens as transformers.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from conftest import noise_image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.demo.scenes import HELD_OUT_SEED, make_scene  # noqa: E402

pytestmark = pytest.mark.slow

DEMO_ONNX = ROOT / "models" / "demo" / "onnx"
DEMO_CHECKPOINT = ROOT / "models" / "demo" / "checkpoint"
PARITY_SCENES = range(HELD_OUT_SEED + 2000, HELD_OUT_SEED + 2040)  # held out, used by no other test


def greedy_reference(model, inputs, max_new_tokens: int, stop_ids: set[int]) -> list[int]:
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return [t for t in output[0, inputs["input_ids"].shape[1]:].tolist() if t not in stop_ids]


def test_demo_export_gives_the_checkpoints_tokens_on_40_held_out_scenes():
    from transformers import Molmo2ForConditionalGeneration, Molmo2Processor

    from models.demo.packing import single_prompt_inputs
    from models.demo.scoring import eval_items
    from molmocap.runtime import Captioner

    model = Molmo2ForConditionalGeneration.from_pretrained(DEMO_CHECKPOINT).eval()
    processor = Molmo2Processor.from_pretrained(DEMO_CHECKPOINT)
    captioner = Captioner.load(DEMO_ONNX, threads=2)
    compared, different = 0, []
    for seed in PARITY_SCENES:
        scene = make_scene(seed)
        encoded = captioner.encode_image(scene.image)
        for item in eval_items(scene):
            prompt = item.question.prompt
            expected = greedy_reference(model, single_prompt_inputs(processor, scene.image, prompt), 48,
                                        captioner.stop_ids)
            if captioner.generate(encoded, prompt, max_new_tokens=48).token_ids != expected:
                different.append((seed, prompt))
            compared += 1
    assert compared >= 150 and not different, f"{len(different)} of {compared} items differ: {different[:5]}"


LARGE = {
    "text": {"hidden_size": 256, "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 32,
             "intermediate_size": 512, "num_hidden_layers": 8, "qk_norm_type": "qwen3"},
    "vision": {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 8, "num_attention_heads": 8,
               "num_key_value_heads": 8, "head_dim": 16},
    "adapter": {"hidden_size": 128, "num_attention_heads": 8, "num_key_value_heads": 8, "head_dim": 16,
                "intermediate_size": 384, "vision_feature_layer": [-1, -3]},
}


def test_larger_random_model_on_a_large_image_at_8_crops(tmp_path):
    import tiny_models
    from molmocap.export.exporter import export
    from molmocap.runtime import Captioner

    variant = tiny_models.TinyVariant("large", **LARGE)
    model, processor = tiny_models.build_model(variant, seed=21)
    checkpoint = tmp_path / "checkpoint"
    model.save_pretrained(checkpoint)
    processor.save_pretrained(checkpoint)
    captioner = Captioner.load(export(str(checkpoint), tmp_path / "onnx"), threads=2)

    image, prompt = noise_image(1100, 1500, seed=9), "Describe this image in detail."
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = processor(images=[image], text=text, images_kwargs={"max_crops": 8}, return_tensors="pt")
    expected = greedy_reference(model, inputs, 32, captioner.stop_ids)
    result = captioner.generate(image, prompt, max_new_tokens=32, max_crops=8)
    assert result.prompt_tokens == inputs["input_ids"].shape[1] > 8 * 100
    assert result.token_ids == expected and len(expected) >= 8
