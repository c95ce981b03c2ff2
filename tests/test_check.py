"""`molmocap export --check`: the figures it records in the manifest, `info` showing them, the warning at load."""

from __future__ import annotations

import json

from conftest import molmocap, noise_image
from molmocap.runtime.manifest import load_manifest
from molmocap.runtime.quality import POOR_AGREEMENT


def export_checked(checkpoint, out, *args: str):
    proc = molmocap("export", str(checkpoint), "-o", str(out), "--check", *args)
    assert proc.returncode == 0, proc.stderr
    return load_manifest(out).data["check"]


def test_int4_check_against_int8_is_recorded_and_shown_by_info(checkpoints, tmp_path):
    check = export_checked(checkpoints["qwen3_gqa"], tmp_path / "int4", "--quant", "int4")
    assert check["reference"] == "int8" and check["positions"] == 3 * 48 and check["max_crops"] == 1
    assert [row["image"] for row in check["per_image"]] == ["drawn:shapes", "drawn:text", "drawn:texture"]
    assert 0.3 < check["top1_agreement"] <= 1.0 and 0.8 < check["cosine_mean"] <= 1.0
    assert not any(p.name.startswith(".check-reference") for p in tmp_path.iterdir())  # the reference is gone

    info = molmocap("info", str(tmp_path / "int4"), "--json")
    assert info.returncode == 0 and json.loads(info.stdout)["model"]["check"] == check
    text = molmocap("info", str(tmp_path / "int4")).stdout
    assert f"check: next-token agreement {check['top1_agreement']:.1%}, logit cosine " in text
    assert "against int8 (144 positions)" in text


def test_fp32_check_against_transformers_agrees_everywhere(checkpoints, tmp_path):
    image = tmp_path / "noise.png"
    noise_image(300, 400, seed=3).save(image)
    check = export_checked(checkpoints["olmo_mha_norm_after"], tmp_path / "fp32", "--check-images", str(image))
    assert check["reference"] == "transformers-fp32" and check["positions"] == 48
    assert check["per_image"][0]["image"] == str(image)
    assert check["top1_agreement"] == 1.0 and check["cosine_min"] > 0.9999, check


def test_a_model_far_from_its_reference_is_flagged_at_load_and_in_info(checkpoints, exported, tmp_path):
    # The reference holds other weights of the same geometry and tokenizer: to the check, the export is damaged.
    out = tmp_path / "damaged"
    check = export_checked(checkpoints["qwen3_gqa"], out, "--quant", "int8", "--check-against",
                           str(exported["hub_layout"]))
    assert check["reference"] == str(exported["hub_layout"].resolve())
    assert check["top1_agreement"] < POOR_AGREEMENT, check

    image = tmp_path / "noise.png"
    noise_image(200, 300).save(image)
    proc = molmocap("caption", str(image), "--model", str(out), "--max-new-tokens", "4", "--no-cache")
    assert proc.returncode == 0, proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and f"{check['top1_agreement']:.1%}" in warnings[0]

    info = molmocap("info", str(out))
    assert info.returncode == 0 and "warning" not in info.stderr
    assert "(poor: answers often differ from the reference's)" in info.stdout


def test_an_unchecked_or_well_checked_model_loads_without_a_warning(exported, tmp_path):
    image = tmp_path / "noise.png"
    noise_image(200, 300).save(image)
    proc = molmocap("caption", str(image), "--model", str(exported["qwen3_gqa"]), "--max-new-tokens", "4",
                    "--no-cache")
    assert proc.returncode == 0 and "warning" not in proc.stderr
    assert "check: not measured" in molmocap("info", str(exported["qwen3_gqa"])).stdout


def test_a_reference_of_another_model_is_refused_and_nothing_is_written(checkpoints, exported, tmp_path):
    out = tmp_path / "model"
    proc = molmocap("export", str(checkpoints["qwen3_gqa"]), "-o", str(out), "--check", "--check-against",
                    str(exported["yarn_subset_mqa"]))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and lines[-1].startswith("error: ") and "another model" in lines[-1]
    assert list(tmp_path.iterdir()) == []


def test_check_options_are_refused_before_any_work(checkpoints, tmp_path):
    cases = [(["--check-against", "int8"], "apply to --check"), (["--check-images", "x.png"], "apply to --check"),
             (["--check", "--check-images", str(tmp_path / "nope.png")], "not found"),
             (["--check", "--check-against", str(tmp_path)], "not a molmocap model")]
    for args, message in cases:
        proc = molmocap("export", str(checkpoints["qwen3_gqa"]), "-o", str(tmp_path / "out"), *args)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], (args, proc.stderr)
        assert not (tmp_path / "out").exists()
