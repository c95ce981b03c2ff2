"""Small random Molmo2 checkpoints for tests: real architecture and image geometry, tiny widths.

Each checkpoint is saved with `save_pretrained` together with a `Molmo2Processor` whose byte-level BPE tokenizer
puts every Molmo2 special token above the base vocabulary, as the real Qwen3-based tokenizer does, and whose chat
template lays the prompt out like the released Molmo2 one (images before the user turn); the special tokens and the
template are the demo model's (models/demo/tokenizer.py), the one statement of Molmo2's tokenizer layout here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    Molmo2Config,
    Molmo2ForConditionalGeneration,
    Molmo2ImageProcessor,
    Molmo2Processor,
    Molmo2VideoProcessor,
    TokenizersBackend,
)

from models.demo.tokenizer import (
    BASE_SPECIALS,
    CHAT_TEMPLATE,
    MOLMO_EXTRAS,
    config_token_ids,
    set_generation_tokens,
)

BASE_VOCAB = 384

CORPUS = [
    "A red circle sits on the left of a blue background.",
    "Describe this image in detail. What color is the square? How many triangles are there?",
    "Two green triangles and a yellow star near the top right corner of a white image.",
    "Is there a purple heart in the picture? Yes. No. The word STOP is printed in black letters.",
    "Point to the orange square. Count the circles. The picture shows a small cat on a sofa.",
    "a photo of a dog running on the beach at sunset, with waves and sand, bright colours",
]


@dataclass(frozen=True)
class TinyVariant:
    """One architecture variant: the keyword overrides of the three sub-configs and of the processor."""

    name: str
    text: dict = field(default_factory=dict)
    vision: dict = field(default_factory=dict)
    adapter: dict = field(default_factory=dict)
    processor: dict = field(default_factory=dict)
    additional_vocab_size: int = 16


VARIANTS = {
    v.name: v
    for v in [
        TinyVariant(
            "qwen3_gqa",
            text={"qk_norm_type": "qwen3", "num_key_value_heads": 2},
            adapter={"vision_feature_layer": [-1, -3]},
            processor={"use_single_crop_col_tokens": False},
        ),
        TinyVariant(
            "olmo_mha_norm_after",
            text={"qk_norm_type": "olmo", "num_key_value_heads": 4, "norm_after": True, "attention_bias": True},
            adapter={"vision_feature_layer": [2, 0]},
        ),
        TinyVariant(
            "yarn_subset_mqa",
            text={
                "qk_norm_type": "qwen3",
                "num_key_value_heads": 1,
                "rope_parameters": {
                    "rope_type": "yarn", "rope_theta": 5e6, "factor": 4.0, "original_max_position_embeddings": 1024,
                },
                "rope_scaling_layers": [1],
            },
            adapter={"vision_feature_layer": [-2]},
        ),
        TinyVariant(
            "bias_big_extra_vocab",
            text={"qk_norm_type": "olmo", "num_key_value_heads": 2, "attention_bias": True,
                  "rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
                  "rope_scaling_layers": [0, 2]},
            vision={"num_hidden_layers": 3, "num_key_value_heads": 2},
            adapter={"vision_feature_layer": [-1, -2]},
            additional_vocab_size=128,
        ),
    ]
}


def build_tokenizer(additional_vocab_size: int) -> TokenizersBackend:
    """A byte-level BPE with Qwen's base specials inside the base vocabulary and Molmo2's extras above it."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BASE_VOCAB - 8,
        special_tokens=BASE_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    padding = [f"|<EXTRA_TOKENS_{i}>|" for i in range(BASE_VOCAB - tok.get_vocab_size())]
    tok.add_special_tokens(padding)
    assert tok.get_vocab_size() == BASE_VOCAB
    assert additional_vocab_size >= len(MOLMO_EXTRAS)
    tok.add_special_tokens(MOLMO_EXTRAS)
    return TokenizersBackend(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>", unk_token=None
    )


def build_config(variant: TinyVariant, tokenizer: TokenizersBackend) -> Molmo2Config:
    text = {
        "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "intermediate_size": 128, "num_hidden_layers": 3, "vocab_size": BASE_VOCAB,
        "additional_vocab_size": variant.additional_vocab_size, "max_position_embeddings": 4096,
        "rope_parameters": {"rope_type": "default", "rope_theta": 5e6}, "initializer_range": 0.1,
        **variant.text,
    }
    vision = {
        "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4,
        "num_key_value_heads": 4, "head_dim": 8, "initializer_range": 0.1, **variant.vision,
    }
    adapter = {
        "hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 4, "head_dim": 8,
        "intermediate_size": 96, "text_hidden_size": text["hidden_size"], "initializer_range": 0.1,
        **variant.adapter,
    }
    return Molmo2Config(
        text_config=text, vision_config=vision, adapter_config=adapter,
        **config_token_ids(tokenizer),
        initializer_range=0.1,
    )


def build_processor(variant: TinyVariant, tokenizer: TokenizersBackend) -> Molmo2Processor:
    return Molmo2Processor(
        image_processor=Molmo2ImageProcessor(),
        video_processor=Molmo2VideoProcessor(),
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
        **variant.processor,
    )


def build_model(variant: TinyVariant, seed: int = 0) -> tuple[Molmo2ForConditionalGeneration, Molmo2Processor]:
    """A seeded random model in fp32 eval mode and its processor."""
    tokenizer = build_tokenizer(variant.additional_vocab_size)
    config = build_config(variant, tokenizer)
    torch.manual_seed(seed)
    model = Molmo2ForConditionalGeneration(config).eval()
    set_generation_tokens(model.generation_config, tokenizer)
    return model, build_processor(variant, tokenizer)


def save_checkpoint(name: str, out_dir: Path, seed: int = 0) -> Path:
    """Write variant `name` as a transformers checkpoint (model + processor) into `out_dir`."""
    model, processor = build_model(VARIANTS[name], seed)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir
