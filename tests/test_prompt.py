"""The runtime's prompt layout against `Molmo2Processor` for every col/start-token setting."""

from __future__ import annotations

import itertools

import pytest
from transformers import Molmo2ImageProcessor, Molmo2Processor, Molmo2VideoProcessor

import tiny_models
from molmocap.runtime.errors import InputError
from molmocap.runtime.prompt import image_string, prompt_text

TEMPLATE = "<|image|><|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("cols,single_cols,single_start", list(itertools.product([True, False], [None, True, False],
                                                                                  [True, False])))
@pytest.mark.parametrize("grid", [(14, 14, 14, 14), (14, 14, 24, 38), (2, 3, 1, 1)])
def test_image_string_matches_processor(cols, single_cols, single_start, grid):
    tokenizer = tiny_models.build_tokenizer(16)
    processor = Molmo2Processor(image_processor=Molmo2ImageProcessor(), video_processor=Molmo2VideoProcessor(),
                                tokenizer=tokenizer,
                                image_use_col_tokens=cols, use_single_crop_col_tokens=single_cols,
                                use_single_crop_start_token=single_start)
    cfg = {"image_use_col_tokens": cols, "use_single_crop_col_tokens": cols if single_cols is None else single_cols,
           "use_single_crop_start_token": single_start}
    assert image_string(grid, cfg) == processor.replace_image_token({"image_grids": [list(grid)]}, 0)


def test_prompt_text_layout():
    cfg = {"template": TEMPLATE, "image_token": "<|image|>", "image_use_col_tokens": True,
           "use_single_crop_col_tokens": False, "use_single_crop_start_token": True}
    text = prompt_text("What is {this}?", (1, 1, 1, 1), cfg, "<|endoftext|>", [])
    assert text == ("<|endoftext|><low_res_im_start><im_patch><im_end><im_start><im_patch><im_col><im_end>"
                    "<|im_start|>user\nWhat is {this}?<|im_end|>\n<|im_start|>assistant\n")


def test_prompt_with_image_tokens_is_rejected():
    cfg = {"template": TEMPLATE, "image_token": "<|image|>", "image_use_col_tokens": True,
           "use_single_crop_col_tokens": True, "use_single_crop_start_token": True}
    with pytest.raises(InputError, match="special token"):
        prompt_text("look <im_patch> here", (1, 1, 1, 1), cfg, "<|endoftext|>", ["<|image|>", "<im_patch>"])
