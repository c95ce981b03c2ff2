"""How far a quantized export is from the fp32 one: teacher-forced next-token logits, compared position by position.

Both models read the same image and prompt, then the same continuation (the fp32 model's greedy tokens, fed to
both whatever the candidate would have chosen), so every position is compared under identical context.
"""

from __future__ import annotations

import numpy as np

from molmocap.runtime.captioner import Captioner, ImageSource


def teacher_forced_logits(captioner: Captioner, image: ImageSource, prompt: str, tokens: list[int] | None,
                          positions: int, max_crops: int | None = None) -> tuple[np.ndarray, list[int]]:
    """Logits at `positions` consecutive positions after the prompt, feeding `tokens` (or, when None, this model's
    own greedy choices, which are returned for the other model to follow)."""
    state = captioner.prefill(captioner.encode_image(image, max_crops), prompt, max_new_tokens=positions)
    rows, fed = [state.logits], []
    for step in range(positions - 1):
        token = int(np.argmax(state.logits)) if tokens is None else tokens[step]
        fed.append(token)
        rows.append(captioner.step(state, token))
    return np.stack(rows), fed


def compare(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
    """Top-1 agreement and cosine similarity of two [positions, vocab] logit arrays."""
    cosine = np.sum(reference * candidate, axis=1) / (
        np.linalg.norm(reference, axis=1) * np.linalg.norm(candidate, axis=1))
    return {
        "positions": int(len(reference)),
        "top1_agreement": float(np.mean(reference.argmax(axis=1) == candidate.argmax(axis=1))),
        "cosine_mean": float(cosine.mean()),
        "cosine_min": float(cosine.min()),
    }


def fidelity(reference: Captioner, candidate: Captioner, image: ImageSource, prompt: str, positions: int = 256,
             max_crops: int | None = None) -> dict[str, float]:
    """Compare `candidate` with `reference` over `positions` teacher-forced positions."""
    ref_logits, tokens = teacher_forced_logits(reference, image, prompt, None, positions, max_crops)
    cand_logits, _ = teacher_forced_logits(candidate, image, prompt, tokens, positions, max_crops)
    return compare(ref_logits, cand_logits)


def transformers_logits(checkpoint: str, images: list[ImageSource], prompt: str, tokens: list[list[int]],
                        positions: int, max_crops: int | None = None, dtype: str = "float32") -> list[np.ndarray]:
    """The source checkpoint's logits through transformers (needs torch and transformers) at the same `positions`
    as `teacher_forced_logits`, for each image fed its continuation `tokens` (positions - 1 ids): one forward pass
    over the prompt and the continuation, keeping the last `positions` rows."""
    import torch
    from transformers import Molmo2ForConditionalGeneration, Molmo2Processor

    from molmocap.runtime.image_io import load_image

    model = Molmo2ForConditionalGeneration.from_pretrained(checkpoint, dtype=getattr(torch, dtype)).eval()
    processor = Molmo2Processor.from_pretrained(checkpoint)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    kwargs = {"max_crops": max_crops} if max_crops is not None else {}
    rows = []
    for image, fed in zip(images, tokens):
        inputs = processor(images=[load_image(image)], text=text, images_kwargs=kwargs, return_tensors="pt")
        extra = torch.tensor([fed], dtype=inputs["input_ids"].dtype)  # [1, positions - 1]
        inputs["input_ids"] = torch.cat([inputs["input_ids"], extra], dim=1)
        inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
        inputs["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(extra)], dim=1)
        with torch.no_grad():
            rows.append(model(**inputs, logits_to_keep=positions).logits[0].float().numpy())
    return rows
