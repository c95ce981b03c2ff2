"""End-to-end parity of the runtime with transformers' Molmo2 on tiny random checkpoints.

For every architecture variant and several images: the same prompt ids, prefill logits within 1e-3 of the
reference's logit range, the same 32 greedy tokens as `generate(do_sample=False)`, and decode-step logits that
track the reference's at every step (so the KV-cache path is checked numerically, not only through argmax).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import Molmo2ForConditionalGeneration, Molmo2Processor

from conftest import CHECKPOINT_NAMES, noise_image
from molmocap.runtime import Captioner
from molmocap.runtime.image_io import load_image
from molmocap.runtime.preprocess import preprocess
from molmocap.runtime.prompt import encode, prompt_text

IMAGES = {
    "landscape": (noise_image(300, 520, seed=1), 8, "Describe this image."),
    "portrait": (noise_image(640, 240, seed=2), 4, "How many red circles are there?"),
    "tiny": (noise_image(9, 13, seed=3), 1, "What is the word printed on the sign?"),
}


def reference_inputs(processor, image, prompt: str, max_crops: int):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return processor(images=[image], text=text, images_kwargs={"max_crops": max_crops}, return_tensors="pt")


@pytest.fixture(scope="module")
def references(checkpoints):
    loaded = {}
    for name, path in checkpoints.items():
        loaded[name] = (Molmo2ForConditionalGeneration.from_pretrained(path).eval(),
                        Molmo2Processor.from_pretrained(path))
    return loaded


@pytest.mark.parametrize("variant", CHECKPOINT_NAMES)
@pytest.mark.parametrize("image_name", list(IMAGES))
def test_generation_matches_transformers(variant, image_name, exported, references):
    model, processor = references[variant]
    captioner = Captioner.load(exported[variant], threads=1)
    image, max_crops, prompt = IMAGES[image_name]
    inputs = reference_inputs(processor, image, prompt, max_crops)

    # Prompt ids: the runtime's prompt layout and tokenization equal the processor's.
    ours = preprocess(load_image(image), captioner.preprocess_config, max_crops)
    text = prompt_text(prompt, ours.grid, captioner.manifest.prompt, captioner.manifest.tokens["bos"], [])
    assert encode(captioner.tokenizer, text).tolist() == inputs["input_ids"][0].tolist()

    with torch.no_grad():
        reference = model.generate(**inputs, max_new_tokens=32, do_sample=False, min_new_tokens=32,
                                   output_logits=True, return_dict_in_generate=True)
    ref_tokens = reference.sequences[0, inputs["input_ids"].shape[1]:].tolist()
    ref_logits = [step[0].numpy() for step in reference.logits]

    result = captioner.generate(image, prompt, max_new_tokens=32, max_crops=max_crops)
    assert result.prompt_tokens == inputs["input_ids"].shape[1]
    assert result.token_ids == ref_tokens[: len(result.token_ids)]
    assert len(result.token_ids) == 32 or ref_tokens[len(result.token_ids)] in captioner.stop_ids

    # Teacher-forced logits at prefill and at every decode step, through the public prefill/step API.
    state = captioner.prefill(image, prompt, max_new_tokens=32, max_crops=max_crops)
    assert state.prompt_ids.tolist() == inputs["input_ids"][0].tolist()
    for step, expected in enumerate(ref_logits):
        tolerance = 1e-3 * (expected.max() - expected.min())
        assert np.abs(state.logits - expected).max() <= tolerance, f"step {step}"
        if step + 1 < len(ref_logits):
            captioner.step(state, ref_tokens[step])
    assert state.positions == len(state.prompt_ids) + len(ref_logits) - 1


def test_streaming_pieces_join_to_the_text(exported):
    captioner = Captioner.load(exported["qwen3_gqa"], threads=1)
    pieces: list[str] = []
    result = captioner.generate(IMAGES["landscape"][0], max_new_tokens=12, on_text=pieces.append)
    assert "".join(pieces) == result.text
    assert set(result.timings) >= {"preprocess_s", "vision_s", "prefill_s", "ttft_s", "decode_tokens_per_s"}


def test_prompt_longer_than_positions_is_an_input_error(exported):
    from molmocap.runtime.errors import InputError

    captioner = Captioner.load(exported["qwen3_gqa"], threads=1)
    with pytest.raises(InputError, match="positions"):
        captioner.generate(IMAGES["tiny"][0], "circle " * 5000, max_new_tokens=4)


def test_questions_about_an_encoded_image_reuse_its_prefix(exported):
    captioner = Captioner.load(exported["yarn_subset_mqa"], threads=1)
    image = IMAGES["landscape"][0]
    encoded = captioner.encode_image(image, max_crops=3)
    questions = ["What color is the square?", "Is there a star?", "What color is the square?"]
    answers = [captioner.generate(encoded, q, max_new_tokens=12) for q in questions]
    assert encoded.prefix_ids is not None and len(encoded.prefix_ids) < answers[0].prompt_tokens
    assert answers[1].timings["vision_s"] == 0.0
    for question, answer in zip(questions, answers):
        fresh = captioner.generate(image, question, max_new_tokens=12, max_crops=3)
        assert answer.token_ids == fresh.token_ids and answer.prompt_tokens == fresh.prompt_tokens


def test_decode_steps_write_the_cache_in_place(exported):
    captioner = Captioner.load(exported["qwen3_gqa"], threads=1)
    state = captioner.prefill(IMAGES["tiny"][0], "Describe this image.", max_new_tokens=3)
    used, buffers = state.positions, dict(state.cache.arrays)
    before = {name: array.copy() for name, array in buffers.items()}
    assert state.cache.capacity == used + 3
    captioner.step(state, int(np.argmax(state.logits)))
    assert state.positions == used + 1
    for name, array in state.cache.arrays.items():
        assert array is buffers[name]
        np.testing.assert_array_equal(array[:, :, :used], before[name][:, :, :used])
        assert np.abs(array[:, :, used]).min() > 0 and not array[:, :, used + 1:].any()


def test_a_full_generation_refuses_another_step(exported):
    from molmocap.runtime.errors import InputError

    captioner = Captioner.load(exported["qwen3_gqa"], threads=1)
    state = captioner.prefill(IMAGES["tiny"][0], "Describe this image.", max_new_tokens=2)
    captioner.step(state, 5)
    captioner.step(state, 6)
    with pytest.raises(InputError, match="full"):
        captioner.step(state, 7)
