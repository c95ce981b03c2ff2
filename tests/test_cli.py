"""The `molmocap` command as a user runs it: output formats, exit codes, one-line errors."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import molmocap, noise_image


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("images")
    paths = {"a": root / "a.png", "b": root / "b.jpg", "corrupt": root / "corrupt.jpg", "text": root / "notes.png"}
    noise_image(120, 200, seed=1).save(paths["a"])
    noise_image(300, 90, seed=2).save(paths["b"], quality=90)
    paths["corrupt"].write_bytes(paths["b"].read_bytes()[:200])
    paths["text"].write_text("not an image")
    return paths


def assert_one_line_error(proc: subprocess.CompletedProcess, code: int, pattern: str) -> None:
    assert proc.returncode == code, proc.stderr
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and pattern in lines[0], proc.stderr


def test_caption_json_one_object_per_image(exported, images):
    proc = molmocap("caption", str(images["a"]), str(images["b"]), "--model", str(exported["qwen3_gqa"]),
                    "--max-new-tokens", "5", "--max-crops", "2", "--threads", "1", "--json")
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [row["image"] for row in rows] == [str(images["a"]), str(images["b"])]
    for row in rows:
        assert len(row["token_ids"]) == 5 and row["prompt_tokens"] > 100 and isinstance(row["text"], str)
        assert set(row["timings"]) >= {"preprocess_s", "vision_s", "prefill_s", "ttft_s", "decode_tokens_per_s"}


def test_ask_and_stream_print_the_same_text(exported, images):
    """Both runs compute (--no-cache): a cached answer would make the streamed path print the plain one's text."""
    model = str(exported["olmo_mha_norm_after"])
    plain = molmocap("ask", str(images["a"]), "What color is it?", "--model", model, "--max-new-tokens", "6",
                     "--no-cache")
    streamed = molmocap("ask", str(images["a"]), "What color is it?", "--model", model, "--max-new-tokens", "6",
                        "--stream", "--no-cache")
    assert plain.returncode == 0 and streamed.returncode == 0
    assert plain.stdout == streamed.stdout and plain.stdout.strip()


def test_model_from_environment(exported, images):
    env = {"MOLMOCAP_MODEL": str(exported["qwen3_gqa"])}
    proc = molmocap("caption", str(images["a"]), "--max-new-tokens", "3", env=env)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("image,pattern", [("missing.png", "not found"), ("corrupt", "corrupt"),
                                           ("text", "unrecognised")])
def test_bad_images(exported, images, image, pattern):
    path = str(images.get(image, image))
    proc = molmocap("caption", path, "--model", str(exported["qwen3_gqa"]))
    assert_one_line_error(proc, 2, pattern)


def test_a_bad_image_among_several_is_one_error_line_and_the_others_go_on(exported, images):
    proc = molmocap("caption", str(images["a"]), str(images["corrupt"]), str(images["b"]), "--model",
                    str(exported["qwen3_gqa"]), "--json", "--max-new-tokens", "3")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert [json.loads(line)["image"] for line in proc.stdout.splitlines()] == [str(images["a"]), str(images["b"])]
    errors = proc.stderr.strip().splitlines()
    assert len(errors) == 2 and "corrupt" in errors[0] and errors[1] == "error: 1 of 3 images failed (each error " \
        "is above)", proc.stderr


def test_model_errors(exported, images, tmp_path):
    assert_one_line_error(molmocap("caption", str(images["a"]), "--model", str(tmp_path / "none")), 2, "not found")
    stale = tmp_path / "stale"
    shutil.copytree(exported["qwen3_gqa"], stale)
    manifest = json.loads((stale / "molmocap.json").read_text())
    manifest["format_version"] = 99
    (stale / "molmocap.json").write_text(json.dumps(manifest))
    assert_one_line_error(molmocap("caption", str(images["a"]), "--model", str(stale)), 2, "format version")


def test_prompt_too_long(exported, images):
    proc = molmocap("caption", str(images["a"]), "--model", str(exported["qwen3_gqa"]),
                    "--prompt", "circle " * 5000)
    assert_one_line_error(proc, 2, "positions")


def test_usage_errors_exit_2(exported, images):
    assert molmocap("caption").returncode == 2
    proc = molmocap("caption", str(images["a"]), "--model", str(exported["qwen3_gqa"]), "--json", "--stream")
    assert proc.returncode == 2 and "cannot be combined" in proc.stderr
    assert molmocap("caption", str(images["a"]), "--max-crops", "0").returncode == 2
    assert_one_line_error(molmocap("ask", str(images["a"]), "  ", "--model", str(exported["qwen3_gqa"])), 2,
                          "question is empty")


def test_export_command(checkpoints, tmp_path):
    out = tmp_path / "model"
    proc = molmocap("export", str(checkpoints["yarn_subset_mqa"]), "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    assert (out / "molmocap.json").is_file() and "exported" in proc.stderr
    assert_one_line_error(molmocap("export", str(checkpoints["yarn_subset_mqa"]), "-o", str(out)), 2, "--force")
    assert_one_line_error(molmocap("export", str(tmp_path / "nothing"), "-o", str(tmp_path / "x")), 2, "not found")


def test_help_lists_commands():
    proc = molmocap("--help")
    assert proc.returncode == 0
    for command in ("export", "caption", "ask"):
        assert command in proc.stdout


def test_ask_several_questions_and_styles(exported, images):
    """The shared-prefix path (several -q) and a lone question both compute (--no-cache) the same tokens."""
    model = str(exported["qwen3_gqa"])
    proc = molmocap("ask", str(images["a"]), "-q", "What color?", "-q", "How many?", "--model", model,
                    "--max-new-tokens", "4", "--json", "--no-cache")
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [row["prompt"] for row in rows] == ["What color?", "How many?"]
    single = molmocap("ask", str(images["a"]), "How many?", "--model", model, "--max-new-tokens", "4", "--json",
                      "--no-cache")
    single_row = json.loads(single.stdout)
    assert not any(row["timings"]["cached"] for row in [*rows, single_row])
    assert single_row["token_ids"] == rows[1]["token_ids"]
    tags = molmocap("caption", str(images["a"]), "--style", "tags", "--model", model, "--max-new-tokens", "6",
                    "--json")
    row = json.loads(tags.stdout)
    assert row["style"] == "tags" and json.loads(row["text"]) == row["data"] and isinstance(row["data"], list)
    assert molmocap("ask", str(images["a"]), "--model", model).returncode == 2


DEMO_IMAGE = Path(__file__).resolve().parents[1] / "examples" / "shapes.png"


def test_the_demo_model_says_what_it_is(exported, tmp_path):
    """With neither --model nor $MOLMOCAP_MODEL the demo model answers and says so: one line on stderr (the
    runtime's notice, so the CLI and the server use the same words), `demo_model` in --json; --quiet hides the line
    and leaves stdout as it was. A real model, or bad input, gets no notice."""
    from molmocap.runtime.demo import DEMO_NOTICE

    default = {"MOLMOCAP_MODEL": ""}
    plain = molmocap("caption", str(DEMO_IMAGE), "--no-cache", env=default)
    assert plain.returncode == 0 and plain.stdout.strip(), plain.stderr
    assert plain.stderr.splitlines() == [DEMO_NOTICE]
    assert "allenai/Molmo2-4B" in DEMO_NOTICE and "--model DIR" in DEMO_NOTICE and "MOLMOCAP_MODEL" in DEMO_NOTICE
    quiet = molmocap("--quiet", "caption", str(DEMO_IMAGE), "--no-cache", env=default)
    assert quiet.returncode == 0 and quiet.stderr == "" and quiet.stdout == plain.stdout
    row = json.loads(molmocap("caption", str(DEMO_IMAGE), "--json", "--no-cache", env=default).stdout)
    assert row["demo_model"] is True
    points = molmocap("point", str(DEMO_IMAGE), "circle", "--json", env=default)
    assert json.loads(points.stdout)["demo_model"] is True and points.stderr.splitlines() == [DEMO_NOTICE]
    copy = tmp_path / "demo-copy"  # the demo model is the demo model wherever it lies
    shutil.copytree(DEMO_IMAGE.parents[1] / "models" / "demo" / "onnx", copy)
    copied = molmocap("ask", str(DEMO_IMAGE), "What color is the background?", "--model", str(copy), "--no-cache")
    assert copied.returncode == 0 and copied.stderr.splitlines() == [DEMO_NOTICE]

    real = molmocap("caption", str(DEMO_IMAGE), "--model", str(exported["qwen3_gqa"]), "--max-new-tokens", "3",
                    "--json", "--no-cache")
    assert real.returncode == 0 and real.stderr == "" and json.loads(real.stdout)["demo_model"] is False
    assert_one_line_error(molmocap("caption", "missing.png", env=default), 2, "not found")
