"""The float16 plans (fp16, int4-fp16, for GPUs) on ONNX Runtime's CPU provider: float32 at the graphs' edges,
float16 weights and KV cache inside, and the fp32 export's answers.

On the CPU provider ONNX Runtime computes the float16 products in float32 (it casts the weights when it loads
them), so these tests hold float16 storage, the float16 KV cache and attention to the fp32 answers, not float16
arithmetic throughout as a GPU runs it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from model_tampering import edit_manifest, relist
from onnx import TensorProto

from conftest import CHECKPOINT_NAMES, ROOT, molmocap, noise_image
from models.demo.scenes import CAPTION_PROMPT, DETAILED_PROMPT, HELD_OUT_SEED, make_scene
from molmocap.export.exporter import export
from molmocap.export.fidelity import compare, teacher_forced_logits
from molmocap.export.onnx_graph import GraphBuilder
from molmocap.export.plan import INT4, INT8, PLANS, ExportPlan
from molmocap.export.quantize import FP16, FP32
from molmocap.runtime import Captioner
from molmocap.runtime.errors import ExportError, ModelError
from molmocap.runtime.manifest import load_manifest

DEMO_CHECKPOINT = ROOT / "models" / "demo" / "checkpoint"
HALF_PLANS = ("fp16", "int4-fp16")
# Share of greedy tokens equal to the fp32 export's at the same position on the demo model. Measured on 30
# held-out scenes x 3 prompts (caption, detailed, a question), 64 tokens: fp16 1.000 (1487 of 1487 tokens),
# int4-fp16 0.966 to 0.973 (as int4's 4-bit rounding costs); a broken cast or cache layout gives garbage.
AGREEMENT = {"fp16": 0.98, "int4-fp16": 0.9}
KV_PREFIXES = ("past_key_values.", "present.")


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> dict[str, Path]:
    """The demo checkpoint exported under fp32 and both float16 plans."""
    root = tmp_path_factory.mktemp("demo-fp16")
    return {quant: export(str(DEMO_CHECKPOINT), root / quant, quant=quant) for quant in ("fp32", *HALF_PLANS)}


@pytest.mark.parametrize("quant", HALF_PLANS)
def test_graphs_take_and_give_float32_and_hold_float16_weights_and_kv_cache(quant, demo):
    manifest = load_manifest(demo[quant])
    for name in manifest.data["components"]:
        path = str(manifest.component(name))
        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        for arg in (*session.get_inputs(), *session.get_outputs()):
            if arg.name.startswith(KV_PREFIXES):
                assert arg.type == "tensor(float16)", (name, arg.name)
            elif arg.type.startswith("tensor(float"):
                assert arg.type == "tensor(float)", (name, arg.name)
        graph = onnx.load(path, load_external_data=False).graph
        assert not [t.name for t in graph.initializer if t.data_type == TensorProto.FLOAT], name
    captioner = Captioner.load(demo[quant], threads=1)
    assert captioner.decoder.kv_dtype == np.float16
    state = captioner.prefill(make_scene(HELD_OUT_SEED).image, CAPTION_PROMPT, max_new_tokens=4)
    assert {array.dtype for array in state.cache.arrays.values()} == {np.dtype(np.float16)}
    assert np.isfinite(state.logits).all() and np.isfinite(captioner.step(state, int(state.logits.argmax()))).all()


@pytest.mark.parametrize("quant", HALF_PLANS)
def test_greedy_tokens_agree_with_the_fp32_export_on_the_demo_model(quant, demo):
    reference, candidate = Captioner.load(demo["fp32"], threads=1), Captioner.load(demo[quant], threads=1)
    same = total = 0
    for seed in range(HELD_OUT_SEED + 300, HELD_OUT_SEED + 306):
        image = make_scene(seed).image
        for prompt in (CAPTION_PROMPT, DETAILED_PROMPT):
            expected = reference.generate(image, prompt, 48).token_ids
            got = candidate.generate(image, prompt, 48).token_ids
            same += sum(a == b for a, b in zip(expected, got))
            total += max(len(expected), len(got))
    assert same / total >= AGREEMENT[quant], f"{same} of {total} tokens agree"


@pytest.mark.parametrize("variant", CHECKPOINT_NAMES)
def test_every_parity_variant_decodes_the_fp32_tokens_in_fp16(variant, checkpoints, exported, tmp_path):
    """qk-norm kinds, norm_after, MHA/GQA/MQA, scaled RoPE on some layers, qkv bias, extra vocabulary."""
    half = Captioner.load(export(str(checkpoints[variant]), tmp_path / "fp16", quant="fp16"), threads=1)
    image = noise_image(260, 380, seed=7)
    expected = Captioner.load(exported[variant], threads=1).generate(image, None, 24, max_crops=2).token_ids
    got = half.generate(image, None, 24, max_crops=2).token_ids
    assert sum(a == b for a, b in zip(expected, got)) >= 0.95 * max(len(expected), len(got)), (expected, got)


def test_batched_decoding_equals_generate_in_fp16(demo):
    captioner = Captioner.load(demo["fp16"], threads=1)
    images = [ROOT / "examples" / "shapes.png", *(make_scene(HELD_OUT_SEED + 310 + i).image for i in range(3))]
    prompts = [DETAILED_PROMPT, "What color is the circle?", None, "How many triangles?"]
    budgets = [40, 8, 24, 32]
    results = captioner.generate_batch(images, prompts, budgets, max_batch=3)
    for result, image, prompt, budget in zip(results, images, prompts, budgets):
        assert result.token_ids == captioner.generate(image, prompt, budget).token_ids


def test_cli_export_records_the_plan_checks_against_fp32_and_info_shows_it(tmp_path):
    out = tmp_path / "fp16"
    proc = molmocap("export", str(DEMO_CHECKPOINT), "-o", str(out), "--quant", "fp16", "--check")
    assert proc.returncode == 0, proc.stderr
    manifest = load_manifest(out)
    assert manifest.data["quant"] == "fp16"
    assert manifest.data["plan"] == PLANS["fp16"].to_dict(manifest.geometry["text"]["num_layers"])
    assert manifest.data["plan"]["floats"] == "fp16"
    assert manifest.data["check"]["reference"] == "fp32" and manifest.data["check"]["top1_agreement"] >= 0.98
    info = molmocap("info", str(out), cache_dir=tmp_path / "cache")
    assert info.returncode == 0, info.stderr
    assert ("quant: fp16 (vision fp16, adapter fp16, decoder_prefill fp16, decoder_step fp16, lm_head fp16, "
            "embed fp16, floats fp16)") in info.stdout


def test_a_float16_plan_takes_no_int8_layers_and_no_float32_parts():
    with pytest.raises(ValueError, match="float32 activations only"):
        ExportPlan(FP16, FP16, INT8, None, INT4, "fp16", floats="fp16")
    with pytest.raises(ValueError, match="cannot have fp32 parts"):
        ExportPlan(FP32, FP16, INT4, None, INT4, "fp16", floats="fp16")
    with pytest.raises(ValueError, match="cannot have fp16 parts"):
        ExportPlan(FP16, FP16, FP16, None, FP16, "fp16")


def test_float16_graphs_refuse_weights_beyond_its_range_and_saturate_constants(tmp_path):
    g = GraphBuilder(tmp_path / "m.onnx", "fp16")
    with pytest.raises(ExportError, match="beyond float16's range"):
        g.weight("w", np.array([1.0, 7e4], dtype=np.float32))
    name = g.const(np.finfo(np.float32).min)
    never = next(t for t in g.initializers if t.name == name)
    assert onnx.numpy_helper.to_array(never) == np.finfo(np.float16).min


def test_decoder_graphs_whose_kv_caches_differ_are_refused(demo, tmp_path):
    """The runtime allocates one cache for the prefill and the step graph, so their element types must agree."""
    model = tmp_path / "model"
    shutil.copytree(demo["fp32"], model)
    (model / "half").mkdir()
    for name in ("decoder.onnx", "decoder.onnx.data"):
        shutil.copyfile(demo["fp16"] / name, model / "half" / name)
    relist(model, "half/decoder.onnx", "half/decoder.onnx.data")
    edit_manifest(model, lambda data: data["components"].update(decoder_step="half/decoder.onnx"))
    with pytest.raises(ModelError, match="KV cache mixes"):
        Captioner.load(model, threads=1)


def test_float16_decoders_give_group_query_attention_no_bias(demo):
    """ONNX Runtime's CUDA GroupQueryAttention refuses an attention bias: a GPU plan's decoder must not pass one."""
    graph = onnx.load(demo["fp16"] / "decoder.onnx", load_external_data=False).graph
    attention = [node for node in graph.node if node.op_type == "GroupQueryAttention"]
    assert attention and all(len(node.input) < 11 or not node.input[10] for node in attention)


@pytest.mark.parametrize("variant", CHECKPOINT_NAMES)
def test_float16_prefill_keeps_the_image_block_bidirectional(variant, checkpoints, exported, tmp_path):
    """The float16 decoder's prefill attention (biased, beside a causal GroupQueryAttention) gives the fp32 export's
    next-token logits at every position after the prompt: a causal prefill would not let image tokens see later ones."""
    half = Captioner.load(export(str(checkpoints[variant]), tmp_path / "fp16", quant="fp16"), threads=1)
    full = Captioner.load(exported[variant], threads=1)
    image = noise_image(260, 380, seed=11)
    reference, fed = teacher_forced_logits(full, image, None, None, 8, max_crops=2)
    candidate, _ = teacher_forced_logits(half, image, None, fed, 8, max_crops=2)
    agreement = compare(reference, candidate)
    assert agreement["top1_agreement"] == 1.0 and agreement["cosine_min"] > 0.999, agreement
