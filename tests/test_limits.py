"""Limits checked before expensive work: max_crops, the prompt's length before the vision encoder, file bytes.

Each is refused with a one-line `InputError` (exit 2 at the CLI, 400 at the server) naming the limit.
"""

from __future__ import annotations

import base64
import io
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from starlette.testclient import TestClient

from conftest import molmocap, noise_image
from molmocap import Captioner, InputError
from molmocap.runtime import image_io
from molmocap.runtime.preprocess import MAX_CROPS, preprocess, token_grid
from molmocap.serve import create_app

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "models" / "demo" / "onnx"
HUGE_MAX_CROPS = 100_000


@pytest.fixture(scope="module")
def captioner() -> Captioner:
    return Captioner.load(DEMO, threads=1)


@pytest.fixture(scope="module")
def small_png(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("limits") / "small.png"
    noise_image(40, 60, seed=3).save(path)
    return path


def test_max_crops_over_the_cap_is_refused_by_the_python_api(captioner, small_png):
    with pytest.raises(InputError, match=f"max_crops must be from 1 to {MAX_CROPS}, got {HUGE_MAX_CROPS}"):
        captioner.generate(small_png, max_crops=HUGE_MAX_CROPS)
    with pytest.raises(InputError, match=f"from 1 to {MAX_CROPS}"):
        captioner.encode_image(small_png, max_crops=MAX_CROPS + 1)
    assert captioner.generate(small_png, max_new_tokens=1, max_crops=MAX_CROPS).token_ids


@pytest.mark.parametrize("command", ["caption", "point"])
def test_max_crops_over_the_cap_is_refused_by_the_cli(small_png, command):
    args = [command, str(small_png)] + (["dog"] if command == "point" else [])
    proc = molmocap(*args, "--model", str(DEMO), "--threads", "1", "--max-crops", str(HUGE_MAX_CROPS))
    assert proc.returncode == 2 and proc.stdout == "", proc.stderr
    assert "Traceback" not in proc.stderr and f"1<=x<={MAX_CROPS}" in proc.stderr


def test_max_crops_over_the_cap_is_refused_by_the_server(captioner, small_png):
    image = base64.b64encode(small_png.read_bytes()).decode()
    uri = f"data:image/png;base64,{image}"
    parts = [{"type": "text", "text": "Hi"}, {"type": "image_url", "image_url": {"url": uri}}]
    chat = {"model": "m", "max_crops": HUGE_MAX_CROPS, "messages": [{"role": "user", "content": parts}]}
    with TestClient(create_app(captioner)) as client:
        for route, body in [("/v1/caption", {"image": image, "max_crops": HUGE_MAX_CROPS}),
                            ("/v1/ask", {"image": image, "prompt": "Hi", "max_crops": HUGE_MAX_CROPS}),
                            ("/v1/chat/completions", chat)]:
            response = client.post(route, json=body)
            assert response.status_code == 400, response.text
            error = response.json()["error"]
            assert error["param"] == "max_crops" and f"at most {MAX_CROPS}" in error["message"], error


def test_deeply_nested_json_is_a_400_not_a_server_error(captioner):
    with TestClient(create_app(captioner)) as client:
        response = client.post("/v1/caption", content=b"[" * 100_000, headers={"content-type": "application/json"})
    assert response.status_code == 400 and "nested too deeply" in response.json()["error"]["message"], response.text


def test_token_grid_is_the_preprocessed_grid_without_touching_pixels(captioner):
    config = captioner.preprocess_config
    for height, width, max_crops in [(1, 1, 1), (37, 2000, 5), (2240, 2240, MAX_CROPS), (900, 300, 12)]:
        image = Image.new("RGB", (width, height))
        assert token_grid(height, width, config, max_crops) == preprocess(image, config, max_crops).grid


def test_a_prompt_too_long_for_the_model_is_refused_before_the_patches_and_the_vision_encoder(captioner):
    """An 8x8 tiling needs about 6,700 tokens and the demo model has 4,096 positions. Cutting the patches alone
    would allocate over 100 MB (numpy, seen by tracemalloc) before the vision encoder could run; the refusal
    allocates almost nothing, so it came first."""
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (2240, 2240, 3), dtype=np.uint8))
    patch_bytes = (MAX_CROPS + 1) * 27 * 27 * 14 * 14 * 3 * 4
    for call in (lambda: captioner.generate(image, "Describe it.", max_crops=MAX_CROPS),
                 lambda: captioner.encode_image(image, max_crops=MAX_CROPS)):
        tracemalloc.start()
        try:
            with pytest.raises(InputError, match=f"takes [0-9]+ tokens; this model has {captioner.max_positions}"):
                call()
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < patch_bytes / 20, peak
    assert captioner.generate(image, "Describe it.", max_new_tokens=1, max_crops=8).prompt_tokens < 4096


def test_a_prompt_too_long_for_the_model_is_refused_by_the_cli(tmp_path):
    path = tmp_path / "big.png"
    Image.new("RGB", (2240, 2240), "white").save(path)
    proc = molmocap("caption", str(path), "--model", str(DEMO), "--threads", "1", "--max-crops", str(MAX_CROPS),
                    "--no-cache")
    assert proc.returncode == 2 and proc.stdout == "", proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "positions" in lines[0] and "max_crops" in lines[0], proc.stderr


def test_files_and_bytes_over_the_size_limit_are_refused_before_reading(tmp_path):
    path = tmp_path / "huge.png"
    with path.open("wb") as file:
        file.truncate(image_io.MAX_FILE_BYTES + 1)  # sparse: reading it would give zeros, an "unrecognised" error
    with pytest.raises(InputError, match=f"image file too large .* more than {image_io.MAX_FILE_BYTES}"):
        image_io.load_image(path)
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="PNG")
    padded = buffer.getvalue() + bytes(image_io.MAX_FILE_BYTES)
    with pytest.raises(InputError, match="image file too large"):
        image_io.load_image(padded)
