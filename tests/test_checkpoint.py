"""The torch-free checkpoint reading equals transformers': config, RoPE tables, tokenizer, chat template, processor
settings and stop tokens, for every tiny checkpoint and for the hub's file layouts."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
from transformers import GenerationConfig, Molmo2Config, Molmo2Processor
from transformers.models.molmo2.modeling_molmo2 import Molmo2RotaryEmbedding

from conftest import CHECKPOINT_NAMES, HUB_LAYOUT
from molmocap.export.config import parse_config
from molmocap.export.rope import rope_tables
from molmocap.runtime.manifest import load_manifest

TEXTS = ["Describe this image.", "<|im_start|>user\nHow many?<|im_end|>\n", "  two  spaces, émoji 🙂 and <im_patch>"]


def assert_config_equal(ours, theirs, where: str) -> None:
    for f in dataclasses.fields(ours):
        value = getattr(ours, f.name)
        if dataclasses.is_dataclass(value):
            assert_config_equal(value, getattr(theirs, f.name), f"{where}.{f.name}")
        else:
            assert value == getattr(theirs, f.name), f"{where}.{f.name}"


def hub_variants(checkpoints) -> dict[str, dict]:
    """The hub layout's config.json, plus its legacy RoPE spellings (rope_theta + rope_scaling of each type)."""
    hub = json.loads((checkpoints[HUB_LAYOUT] / "config.json").read_text())
    variants = {"hub": hub}
    for rope in ({"type": "linear", "factor": 2.0}, {"rope_type": "yarn", "factor": 4.0},
                 {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 512}):
        text = {**hub["text_config"], "rope_scaling": rope, "rope_theta": 5e5, "rope_scaling_layers": None}
        variants[f"hub_{rope.get('type') or rope['rope_type']}"] = {**hub, "text_config": text}
    return variants


def test_config_matches_transformers(checkpoints):
    configs = {name: json.loads((path / "config.json").read_text()) for name, path in checkpoints.items()}
    for name, data in {**configs, **hub_variants(checkpoints)}.items():
        assert_config_equal(parse_config(json.loads(json.dumps(data))),
                            Molmo2Config.from_dict(json.loads(json.dumps(data))), name)


def text_configs(checkpoints):
    """transformers' text configs of every tiny checkpoint and legacy RoPE spelling, and at widths whose RoPE
    tables run through torch's vectorized pow."""
    configs = [Molmo2Config.from_pretrained(path).text_config for path in checkpoints.values()]
    configs += [Molmo2Config.from_dict(data).text_config for data in hub_variants(checkpoints).values()]
    for head_dim in (64, 72, 128):
        for rope in ({"rope_type": "default", "rope_theta": 5e6}, {"rope_type": "linear", "rope_theta": 1e4,
                                                                  "factor": 3.0},
                     {"rope_type": "yarn", "rope_theta": 5e5, "factor": 4.0, "original_max_position_embeddings": 1024,
                      "beta_fast": 16, "mscale": 1.0, "mscale_all_dim": 0.5},
                     {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 1024}):
            configs.append(Molmo2Config(text_config={"head_dim": head_dim, "rope_parameters": rope}).text_config)
    return configs


def test_rope_tables_match_transformers(checkpoints):
    """Exact for the tiny checkpoints (head_dim 16). Wider heads differ by at most 2 float32 ulps: torch's
    vectorized pow (Sleef, 1-ulp accurate) is not correctly rounded, the numpy power is, and the reciprocal after
    it can double a 1-ulp difference near a power of two."""
    worst = 0
    for text in text_configs(checkpoints):
        ours = rope_tables(parse_config({"text_config": text.to_dict()}).text_config)
        for kind, scaled in (("scaled", True), ("unscaled", False)):
            module = Molmo2RotaryEmbedding(text, scaled=scaled)
            reference = module.inv_freq.numpy()
            inv_freq, scaling = ours[kind]
            assert inv_freq.dtype == np.float32 and inv_freq.shape == reference.shape
            assert scaling == float(module.attention_scaling)
            ulps = np.abs(inv_freq.view(np.int32).astype(np.int64) - reference.view(np.int32)).max()
            assert ulps <= (0 if text.head_dim == 16 else 2), (text.head_dim, text.rope_parameters, kind, ulps)
            worst = max(worst, ulps)
    assert worst > 0  # the wide cases do reach torch's vectorized pow


def reference_manifest_values(path) -> dict:
    """What the exporter wrote before it dropped transformers, computed from transformers' processor."""
    processor = Molmo2Processor.from_pretrained(path)
    tok, ip = processor.tokenizer, processor.image_processor
    try:
        eos = GenerationConfig.from_pretrained(path).eos_token_id
    except OSError:
        eos = None
    stop = {tok.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>") if t in tok.get_vocab()}
    stop |= set([eos] if isinstance(eos, int) else eos or [])
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "\x00P\x00"}]}]
    single_col = processor.use_single_crop_col_tokens
    bos = tok.bos_token or tok.eos_token
    return {
        "bos": bos, "bos_id": tok.convert_tokens_to_ids(bos), "stop_token_ids": sorted(stop),
        "template": processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        .replace("\x00P\x00", "{prompt}"),
        "image_use_col_tokens": processor.image_use_col_tokens,
        "use_single_crop_col_tokens": processor.image_use_col_tokens if single_col is None else single_col,
        "use_single_crop_start_token": processor.use_single_crop_start_token,
        "preprocess": {"crop_size": ip.size.height, "patch_size": ip.patch_size,
                       "overlap_margins": list(ip.overlap_margins), "pooling_size": list(ip.pooling_size),
                       "max_crops": ip.max_crops, "image_mean": list(ip.image_mean), "image_std": list(ip.image_std),
                       "rescale_factor": ip.rescale_factor},
        "ids": [tok(text)["input_ids"] for text in TEXTS],
    }


def manifest_values(out) -> dict:
    from tokenizers import Tokenizer

    manifest = load_manifest(out)
    tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))
    return {
        "bos": manifest.tokens["bos"], "bos_id": manifest.tokens["bos_id"],
        "stop_token_ids": manifest.stop_token_ids, "template": manifest.prompt["template"],
        **{key: manifest.prompt[key] for key in ("image_use_col_tokens", "use_single_crop_col_tokens",
                                                 "use_single_crop_start_token")},
        "preprocess": manifest.preprocess,
        "ids": [tokenizer.encode(text).ids for text in TEXTS],
    }


@pytest.mark.parametrize("name", CHECKPOINT_NAMES)
def test_manifest_matches_transformers_processor(name, checkpoints, exported):
    assert manifest_values(exported[name]) == reference_manifest_values(checkpoints[name])


def test_hub_file_layout_and_class_defaults(checkpoints, tmp_path):
    """The hub's separate preprocessor_config.json, a legacy chat_template.json, no generation_config.json, and
    settings left to the processor classes' defaults: the same values as transformers reads."""
    from molmocap.export.exporter import export

    src = tmp_path / "src"
    shutil.copytree(checkpoints["qwen3_gqa"], src)
    processor_config = json.loads((src / "processor_config.json").read_text())
    image = processor_config.pop("image_processor")
    for key in ("image_mean", "image_std", "pooling_size", "max_crops"):
        image.pop(key)
    image["size"] = {"height": 336, "width": 336}
    (src / "preprocessor_config.json").write_text(json.dumps(image))
    for key in ("image_use_col_tokens", "use_single_crop_col_tokens", "use_single_crop_start_token"):
        processor_config.pop(key, None)
    processor_config["image_use_col_tokens"] = False
    (src / "processor_config.json").write_text(json.dumps(processor_config))
    template = (src / "chat_template.jinja").read_text()
    (src / "chat_template.jinja").unlink()
    (src / "chat_template.json").write_text(json.dumps({"chat_template": "{{ eos_token }}" + template}))
    (src / "generation_config.json").unlink()
    values = manifest_values(export(str(src), tmp_path / "out"))
    assert values == reference_manifest_values(src)
    assert values["preprocess"]["crop_size"] == 336 and values["use_single_crop_col_tokens"] is False
