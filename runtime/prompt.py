"""Prompt text and token ids, laid out exactly as `Molmo2Processor` does for one image."""

from __future__ import annotations

import numpy as np
from tokenizers import Tokenizer

from .errors import InputError


def image_string(grid: tuple[int, int, int, int], prompt_cfg: dict) -> str:
    """The placeholder tokens of one image: the pooled low-res (global) view, then the high-res tiling.

    Each row of `<im_patch>` tokens ends with `<im_col>` where the checkpoint's processor says so.
    """
    low_h, low_w, high_h, high_w = grid
    high_row = "<im_patch>" * high_w + ("<im_col>" if prompt_cfg["image_use_col_tokens"] else "")
    low_row = "<im_patch>" * low_w + ("<im_col>" if prompt_cfg["use_single_crop_col_tokens"] else "")
    low_start = "<low_res_im_start>" if prompt_cfg["use_single_crop_start_token"] else "<im_start>"
    return low_start + low_row * low_h + "<im_end>" + "<im_start>" + high_row * high_h + "<im_end>"


def prompt_text(prompt: str, grid: tuple[int, int, int, int], prompt_cfg: dict, bos: str,
                reserved: list[str]) -> str:
    """The full prompt string: bos, the chat template with the image string in place and the user's text."""
    for token in reserved:
        if token in prompt:
            raise InputError(f"the prompt must not contain the special token {token}")
    before, after = prompt_cfg["template"].split("{prompt}")
    image = image_string(grid, prompt_cfg)
    token = prompt_cfg["image_token"]
    text = before.replace(token, image) + prompt + after.replace(token, image)
    return text if text.startswith(bos) else bos + text


def encode(tokenizer: Tokenizer, text: str) -> np.ndarray:
    """Token ids as the processor's tokenizer call gives them (its post-processor applied)."""
    return np.asarray(tokenizer.encode(text).ids, dtype=np.int64)
