"""The demo model's tokenizer: a small byte-level BPE laid out like Molmo2's Qwen3 tokenizer.

Pre-tokenization is Qwen's (digits one by one, so coordinates are written digit by digit), `<|endoftext|>`,
`<|im_start|>` and `<|im_end|>` live inside the base vocabulary, and Molmo2's image/video/pointing tokens sit above
it in Molmo2's order, so the model's extra embedding rows (`additional_vocab_size`) hold exactly those tokens.
The chat template is the released Molmo2 layout: images before the user turn, "Image N" labels only when several
images are given.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import TokenizersBackend

BASE_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MOLMO_EXTRAS = [
    "<im_start>", "<im_end>", "<im_patch>", "<im_col>", "<low_res_im_start>", "<|image|>", "<im_low>",
    "<frame_start>", "<frame_end>", "<|video|>", "<|points|>", "<|token_index|>", "<|vit_index|>", "<|vit_loc|>",
]
QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

CHAT_TEMPLATE = (
    "{%- set image_count = namespace(n=0) -%}"
    "{%- for message in messages -%}"
    "{%- if message['content'] is not string -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{%- set image_count.n = image_count.n + 1 -%}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- set ns = namespace(i=0) -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "{%- set text = namespace(s='') -%}"
    "{%- if message['content'] is string -%}{%- set text.s = message['content'] -%}{%- else -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{%- set ns.i = ns.i + 1 -%}"
    "{%- if image_count.n > 1 -%}{{ 'Image ' ~ ns.i }}{%- endif -%}{{ '<|image|>' }}"
    "{%- elif item['type'] == 'text' -%}{%- set text.s = text.s ~ item['text'] -%}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<|im_start|>user\\n' ~ text.s ~ '<|im_end|>\\n' }}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{ '<|im_start|>assistant\\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}{%- else -%}"
    "{%- for item in message['content'] -%}{{ item['text'] }}{%- endfor -%}{%- endif -%}"
    "{{ '<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)


def user_turn(prompt: str) -> str:
    """One user turn and the assistant header, as CHAT_TEMPLATE renders them after the image."""
    return f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"


def config_token_ids(tokenizer: TokenizersBackend) -> dict[str, int]:
    """The `Molmo2Config` fields that name the image and frame structure tokens, looked up in `tokenizer`."""
    ids = tokenizer.convert_tokens_to_ids
    return {"image_start_token_id": ids("<im_start>"), "low_res_image_start_token_id": ids("<low_res_im_start>"),
            "image_end_token_id": ids("<im_end>"), "image_patch_id": ids("<im_patch>"),
            "frame_start_token_id": ids("<frame_start>"), "frame_end_token_id": ids("<frame_end>")}


def set_generation_tokens(generation_config, tokenizer: TokenizersBackend) -> None:
    """Stop at `<|im_end|>` or `<|endoftext|>` and pad with `<|endoftext|>`, as the released Molmo2 checkpoints do."""
    ids = tokenizer.convert_tokens_to_ids
    generation_config.eos_token_id = [ids("<|im_end|>"), ids("<|endoftext|>")]
    generation_config.pad_token_id = ids("<|endoftext|>")


def build_tokenizer(corpus: Iterable[str], base_vocab: int) -> TokenizersBackend:
    """Train the BPE on `corpus`, pad the base vocabulary to `base_vocab` ids and append MOLMO_EXTRAS above it."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=base_vocab,
        special_tokens=BASE_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    padding = [f"<|extra_{i}|>" for i in range(base_vocab - tok.get_vocab_size())]
    tok.add_special_tokens(padding)
    if tok.get_vocab_size() != base_vocab:
        raise ValueError(f"the trained vocabulary has {tok.get_vocab_size()} ids, more than {base_vocab}")
    tok.add_special_tokens(MOLMO_EXTRAS)
    return TokenizersBackend(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>", unk_token=None
    )
