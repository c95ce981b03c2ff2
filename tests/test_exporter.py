"""The exporter: component-level agreement with transformers, the manifest's contents, atomic output."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from transformers import Molmo2ForConditionalGeneration, Molmo2Processor

from conftest import CHECKPOINT_NAMES, noise_image
from molmocap.export.exporter import export
from molmocap.runtime.errors import InputError
from molmocap.runtime.manifest import load_manifest


def session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("name", CHECKPOINT_NAMES)
def test_vision_and_adapter_match_transformers(name, checkpoints, exported):
    model = Molmo2ForConditionalGeneration.from_pretrained(checkpoints[name]).eval()
    processor = Molmo2Processor.from_pretrained(checkpoints[name])
    inputs = processor.image_processor(images=[noise_image(200, 450, seed=5)], max_crops=3, return_tensors="pt")
    manifest = load_manifest(exported[name])
    with torch.no_grad():
        hidden = model.model.vision_tower(inputs["pixel_values"], output_hidden_states=True).hidden_states
        layers = model.config.adapter_config.vision_feature_layer
        expected_features = torch.cat([hidden[i + 1 if i >= 0 else i] for i in layers], dim=-1).numpy()
        expected = torch.cat(model.model.get_image_features(
            inputs["pixel_values"], inputs["image_token_pooling"], inputs["image_grids"]).pooler_output).numpy()
    vision = session(manifest.component("vision"))
    (features,) = vision.run(None, {"pixel_values": inputs["pixel_values"].numpy()})
    np.testing.assert_allclose(features, expected_features, atol=1e-4 * np.abs(expected_features).max())
    pooled = inputs["image_token_pooling"].numpy().astype(np.int64)
    adapter = session(manifest.component("adapter"))
    (embeddings,) = adapter.run(None, {"image_features": features, "pooled_patches_idx": pooled})
    np.testing.assert_allclose(embeddings, expected, atol=1e-4 * np.abs(expected).max())


def test_embedding_table_covers_additional_vocabulary(checkpoints, exported):
    model = Molmo2ForConditionalGeneration.from_pretrained(checkpoints["bias_big_extra_vocab"])
    table = model.model.language_model.embed_tokens.weight.detach().numpy()
    ids = np.array([[0, 5, table.shape[0] - 1]], dtype=np.int64)
    manifest = load_manifest(exported["bias_big_extra_vocab"])
    (embeds,) = session(manifest.component("embed")).run(None, {"input_ids": ids})
    np.testing.assert_array_equal(embeds[0], table[ids[0]])


def test_manifest_records_tokens_prompt_and_preprocessing(checkpoints, exported):
    processor = Molmo2Processor.from_pretrained(checkpoints["qwen3_gqa"])
    manifest = load_manifest(exported["qwen3_gqa"])
    tok = processor.tokenizer
    assert manifest.tokens["image_patch_id"] == tok.convert_tokens_to_ids("<im_patch>")
    assert manifest.tokens["bos"] == "<|endoftext|>"
    assert set(manifest.stop_token_ids) == {tok.convert_tokens_to_ids("<|im_end|>"),
                                            tok.convert_tokens_to_ids("<|endoftext|>")}
    assert manifest.prompt["template"] == "<|image|><|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
    assert manifest.prompt["use_single_crop_col_tokens"] is False
    assert manifest.preprocess["overlap_margins"] == [4, 4] and manifest.preprocess["max_crops"] == 8
    assert manifest.data["quant"] == "fp32"
    assert min(manifest.tokens["image_structure_ids"]) >= manifest.geometry["text"]["vocab_size"]


def test_existing_output_needs_force(checkpoints, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(InputError, match="--force"):
        export(str(checkpoints["qwen3_gqa"]), out)
    assert (out / "keep.txt").read_text() == "user data"
    export(str(checkpoints["qwen3_gqa"]), out, force=True)
    assert not (out / "keep.txt").exists()
    load_manifest(out).verify_files()


def test_failed_export_leaves_nothing_behind(checkpoints, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in checkpoints["qwen3_gqa"].iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    out = tmp_path / "out"
    with pytest.raises(Exception, match="cannot load"):
        export(str(broken), out)
    assert list(tmp_path.iterdir()) == [broken]


def test_bad_sources_are_input_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(InputError, match="not found"):
        export(str(tmp_path / "missing"), tmp_path / "out")
    with pytest.raises(InputError, match="config.json"):
        export(str(tmp_path), tmp_path / "out")
    with pytest.raises(InputError, match="quantization"):
        export(str(tmp_path), tmp_path / "out", quant="int3")


def test_hub_id_offline_is_one_clear_error(tmp_path, monkeypatch):
    from molmocap.runtime.errors import ExportError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ExportError, match="could not download allenai/Molmo2-4B"):
        export("allenai/Molmo2-4B", tmp_path / "out")


def test_manifest_is_valid_json_with_checksums(exported):
    data = json.loads((exported["olmo_mha_norm_after"] / "molmocap.json").read_text())
    assert all(len(entry["sha256"]) == 64 and entry["bytes"] > 0 for entry in data["files"])


def test_prompt_overrides_from_the_checkpoint(checkpoints, tmp_path):
    from molmocap.runtime import Captioner

    src = tmp_path / "src"
    src.mkdir()
    for f in checkpoints["qwen3_gqa"].iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    (src / "molmocap_prompts.json").write_text(json.dumps({"caption": "Caption:", "styles": {"short": "Short:"}}))
    captioner = Captioner.load(export(str(src), tmp_path / "out"), threads=1)
    assert captioner.manifest.prompt["default_caption_prompt"] == "Caption:"
    assert captioner.style_prompt("short") == "Short:" and captioner.style_prompt("tags").startswith("List")
    (src / "molmocap_prompts.json").write_text(json.dumps({"styles": {"poem": "Rhyme:"}}))
    with pytest.raises(Exception, match="poem"):
        export(str(src), tmp_path / "out2")
