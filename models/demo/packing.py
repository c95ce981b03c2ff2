"""Prefix-shared training sequences: one image, many questions, one forward pass.

The image placeholders (~400-550 tokens) dominate the sequence, so each scene's questions are packed behind one
shared copy of them. A custom attention mask lets every question turn see the image prefix and itself only, and
every turn's position ids restart where a lone turn would start, so each turn is computed exactly as in the
single-question prompt the model answers at inference (bos, image, user turn, answer). Loss covers the answer
tokens and the closing `<|im_end|>` only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .scenes import Question
from .tokenizer import user_turn


@dataclass
class PackedExample:
    """Model inputs for one scene plus where the loss is taken: logits at `predict_at` should give `targets`."""

    inputs: dict[str, torch.Tensor]
    predict_at: torch.Tensor
    targets: torch.Tensor


def image_prefix(processor, image) -> dict[str, torch.Tensor]:
    """The processor's inputs for bos + the image placeholders alone (the shared prefix)."""
    return dict(processor(images=[image], text="<|image|>", return_tensors="pt"))


def pack(processor, image, questions: list[Question]) -> PackedExample:
    """One sequence holding the image prefix once and every question turn after it, with a block attention mask."""
    prefix = image_prefix(processor, image)
    prefix_ids = prefix["input_ids"][0].tolist()
    image_types = prefix["mm_token_type_ids"][0].tolist()
    tok = processor.tokenizer
    ids, types, positions, segments = list(prefix_ids), list(image_types), list(range(len(prefix_ids))), [0] * len(
        prefix_ids)
    predict_at, targets = [], []
    for segment, question in enumerate(questions, start=1):
        prompt_ids = tok(user_turn(question.prompt), add_special_tokens=False)["input_ids"]
        answer_ids = tok(question.answer + "<|im_end|>", add_special_tokens=False)["input_ids"]
        start = len(ids)
        ids += prompt_ids + answer_ids
        types += [0] * (len(prompt_ids) + len(answer_ids))
        positions += range(len(prefix_ids), len(prefix_ids) + len(prompt_ids) + len(answer_ids))
        segments += [segment] * (len(prompt_ids) + len(answer_ids))
        first_answer = start + len(prompt_ids)
        predict_at += range(first_answer - 1, first_answer - 1 + len(answer_ids))
        targets += answer_ids

    seg = torch.tensor(segments)
    is_image = torch.tensor(types) == 1
    n = len(ids)
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    same_turn = (seg[None, :] == 0) | (seg[None, :] == seg[:, None])
    allowed = (causal & same_turn) | (is_image[:, None] & is_image[None, :])
    mask = torch.zeros(n, n).masked_fill(~allowed, torch.finfo(torch.float32).min)
    inputs = {
        "input_ids": torch.tensor([ids]),
        "mm_token_type_ids": torch.tensor([types]),
        "position_ids": torch.tensor([positions]),
        "attention_mask": mask[None, None],
        "pixel_values": prefix["pixel_values"],
        "image_token_pooling": prefix["image_token_pooling"],
        "image_grids": prefix["image_grids"],
        "image_num_crops": prefix["image_num_crops"],
    }
    return PackedExample(inputs, torch.tensor(predict_at), torch.tensor(targets))


def single_prompt_inputs(processor, image, prompt: str) -> dict[str, torch.Tensor]:
    """The processor's inputs for one question, laid out by the chat template (what `generate` is given)."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return dict(processor(images=[image], text=text, return_tensors="pt"))
