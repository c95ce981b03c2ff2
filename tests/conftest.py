"""Shared fixtures: tiny random Molmo2 checkpoints, their ONNX exports and test images."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(Path(__file__).parent), str(ROOT)]

from model_tampering import flip_byte  # noqa: E402, F401 - the tests' way to damage a file in place

import tiny_models  # noqa: E402

HUB_LAYOUT = "hub_layout"
SERVER_KEY = "test-key"  # the API key of `live_server`


@pytest.fixture(scope="session", autouse=True)
def private_result_cache(tmp_path_factory) -> Path:
    """Keep every test (and the CLI processes they start) off the user's result cache."""
    path = tmp_path_factory.mktemp("result-cache")
    previous = os.environ.get("MOLMOCAP_CACHE_DIR")
    os.environ["MOLMOCAP_CACHE_DIR"] = str(path)
    yield path
    if previous is None:
        del os.environ["MOLMOCAP_CACHE_DIR"]
    else:
        os.environ["MOLMOCAP_CACHE_DIR"] = previous
CHECKPOINT_NAMES = [*tiny_models.VARIANTS, HUB_LAYOUT]


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Every tiny variant saved with save_pretrained, plus one in the hub's original layout (sharded, with a
    ViT declared deeper than stored, like allenai/Molmo2-4B)."""
    from hub_layout import save_hub_layout

    root = tmp_path_factory.mktemp("checkpoints")
    paths = {name: tiny_models.save_checkpoint(name, root / name, seed=i)
             for i, name in enumerate(tiny_models.VARIANTS)}
    model, processor = tiny_models.build_model(tiny_models.VARIANTS["qwen3_gqa"], seed=11)
    hub = root / HUB_LAYOUT
    save_hub_layout(model, hub, declared_vit_layers=model.config.vision_config.num_hidden_layers + 2,
                    max_shard_size=200_000)
    processor.save_pretrained(hub)
    paths[HUB_LAYOUT] = hub
    return paths


@pytest.fixture(scope="session")
def exported(checkpoints, tmp_path_factory) -> dict[str, Path]:
    """Every tiny variant exported to fp32 ONNX."""
    from molmocap.export.exporter import export

    root = tmp_path_factory.mktemp("exported")
    return {name: export(str(path), root / name) for name, path in checkpoints.items()}


def noise_image(height: int, width: int, seed: int = 0) -> Image.Image:
    """Smooth gradients plus noise: every resize rounding case shows up."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / max(width, 1), y * 255 / max(height, 1), (x + y) % 256], axis=-1)
    pixels = np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


@pytest.fixture(scope="session")
def quantized(checkpoints, tmp_path_factory) -> dict[str, Path]:
    """The qwen3_gqa variant exported under every quantized plan."""
    from molmocap.export.exporter import export
    from molmocap.export.plan import PLANS

    root = tmp_path_factory.mktemp("quantized")
    return {quant: export(str(checkpoints["qwen3_gqa"]), root / quant, quant=quant) for quant in PLANS}


@pytest.fixture()
def model_copy(exported, tmp_path) -> Path:
    """A private copy of the tiny qwen3_gqa export, for tests that damage or edit a model."""
    target = tmp_path / "model"
    shutil.copytree(exported["qwen3_gqa"], target)
    return target


def molmocap(*args: str, cache_dir: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the command as a user would (`python -m molmocap`), optionally with its own cache."""
    env = {**os.environ, **(env or {})}
    if cache_dir is not None:
        env["MOLMOCAP_CACHE_DIR"] = str(cache_dir)
    return subprocess.run([sys.executable, "-m", "molmocap", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=env)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def serve_process(*args: str) -> Iterator[tuple[subprocess.Popen, int]]:
    """`python -m molmocap serve ARGS` on a free loopback port (without $MOLMOCAP_API_KEY), yielded once /health
    answers; always stopped. Its log goes to a temporary file, shown if it exits early."""
    import httpx

    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "MOLMOCAP_API_KEY"}
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen([sys.executable, "-m", "molmocap", "serve", "--port", str(port), *args], cwd=ROOT,
                                env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
        try:
            deadline = time.monotonic() + 120
            while True:
                if proc.poll() is not None:
                    log.seek(0)
                    pytest.fail(f"the server exited with {proc.returncode}: {log.read()}")
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2, trust_env=False).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    pytest.fail("the server did not answer /health within 120 s")
                time.sleep(0.2)
            yield proc, port
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="module")
def live_server(model_dir):
    """`python -m molmocap serve --api-key SERVER_KEY` for the requesting module's `model_dir` fixture, on a free
    loopback port; always terminated."""
    with serve_process("--host", "127.0.0.1", "--model", str(model_dir), "--threads", "1",
                       "--api-key", SERVER_KEY) as (_, port):
        yield f"http://127.0.0.1:{port}"
