"""The exporter: component-level agreement with transformers, the manifest's contents, atomic output, and an
export that runs without torch or transformers installed."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from transformers import Molmo2ForConditionalGeneration, Molmo2Processor

from conftest import CHECKPOINT_NAMES, HUB_LAYOUT, noise_image
from molmocap.export.exporter import export
from molmocap.runtime.errors import InputError
from molmocap.runtime.manifest import load_manifest
from molmocap.runtime.request import Request

ROOT = Path(__file__).resolve().parents[1]


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
    assert Request(style="short").prompt_for(captioner.manifest) == "Short:"
    assert Request(style="tags").prompt_for(captioner.manifest).startswith("List")
    (src / "molmocap_prompts.json").write_text(json.dumps({"styles": {"poem": "Rhyme:"}}))
    with pytest.raises(Exception, match="poem"):
        export(str(src), tmp_path / "out2")


def blocked_cli(blocked: tuple[str, ...], *args: str) -> subprocess.CompletedProcess:
    """`molmocap ARGS` in a fresh interpreter where importing any of `blocked` fails, as where it is not installed."""
    script = textwrap.dedent(f"""
        import sys

        class Blocker:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {blocked!r}:
                    raise ImportError(f"{{name}} is blocked in this test")
                return None

        sys.meta_path.insert(0, Blocker())
        from molmocap.cli import entry

        sys.argv = ["molmocap", *{list(args)!r}]
        entry()
    """)
    return subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_export_needs_neither_torch_nor_transformers(checkpoints, exported, tmp_path):
    """The export of the hub-layout checkpoint (sharded, legacy config) runs with torch, torchvision, transformers
    and safetensors unimportable, writes what the in-process export wrote, and generates transformers' tokens."""
    out = tmp_path / "out"
    proc = blocked_cli(("torch", "torchvision", "transformers", "safetensors"), "export",
                       str(checkpoints[HUB_LAYOUT]), "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    manifest, reference = load_manifest(out), load_manifest(exported[HUB_LAYOUT])
    assert manifest.data["files"] == reference.data["files"]

    from molmocap.runtime import Captioner

    model = Molmo2ForConditionalGeneration.from_pretrained(checkpoints[HUB_LAYOUT]).eval()
    processor = Molmo2Processor.from_pretrained(checkpoints[HUB_LAYOUT])
    image, prompt = noise_image(240, 320, seed=7), "Describe this image."
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = processor(images=[image], text=text, images_kwargs={"max_crops": 2}, return_tensors="pt")
    with torch.no_grad():
        sequence = model.generate(**inputs, max_new_tokens=16, min_new_tokens=16, do_sample=False)[0]
    expected = sequence[inputs["input_ids"].shape[1]:].tolist()
    result = Captioner.load(out, threads=1).generate(image, prompt, max_new_tokens=16, max_crops=2)
    assert result.token_ids and result.token_ids == expected[: len(result.token_ids)]


def test_export_without_the_extra_says_how_to_install_it(checkpoints, tmp_path):
    proc = blocked_cli(("onnx",), "export", str(checkpoints["qwen3_gqa"]), "-o", str(tmp_path / "out"))
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: ")
    assert 'pip install "molmocap[export]"' in proc.stderr and "onnx" in proc.stderr
    assert not (tmp_path / "out").exists()
