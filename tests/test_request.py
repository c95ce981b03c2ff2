"""One request path: `Request` resolves prompt, defaults, cache key and answer shape, and every surface (Python API,
CLI, batch, HTTP routes) gives the same answer for the same request."""

from __future__ import annotations

import base64
import json
from dataclasses import replace

import pytest
from PIL import Image
from starlette.testclient import TestClient

from conftest import molmocap
from molmocap import Captioner, Request
from molmocap.runtime.demo import DEMO_MODEL_DIR
from molmocap.runtime.manifest import read_manifest
from molmocap.runtime.request import DEFAULT_MAX_NEW_TOKENS, RequestError
from molmocap.runtime.styles import DEFAULT_PROMPTS, StyleOutputError
from molmocap.serve import create_app


@pytest.fixture(scope="module")
def manifest():
    return read_manifest(DEMO_MODEL_DIR)


@pytest.fixture(scope="module")
def picture(tmp_path_factory):
    path = tmp_path_factory.mktemp("request") / "square.png"
    image = Image.new("RGB", (96, 80), "white")
    image.paste((200, 30, 30), (20, 20, 70, 60))
    image.save(path)
    return path


def test_defaults_resolve_once(manifest):
    plain = Request()
    assert plain.max_new_tokens == DEFAULT_MAX_NEW_TOKENS and plain.style is None
    assert plain.prompt_for(manifest) == manifest.prompt["default_caption_prompt"]
    german = Request(lang="German")
    assert german.style == "short"
    assert german.prompt_for(manifest).endswith("Answer in German.")
    assert Request(prompt="What is red?").prompt_for(manifest) == "What is red?"


@pytest.mark.parametrize("fields,param", [
    ({"prompt": "Hi", "style": "alt"}, "prompt"),
    ({"prompt": "Hi", "lang": "French"}, "prompt"),
    ({"style": "poem"}, "style"),
    ({"prompt": "  "}, "prompt"),
    ({"lang": " "}, "lang"),
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"max_new_tokens": True}, "max_new_tokens"),
    ({"max_crops": 0}, "max_crops"),
    ({"max_crops": 65}, "max_crops"),
    ({"style": "tags", "json_format": True}, "format"),
    ({"schema": {"type": "object"}}, "format"),
])
def test_refused_requests_name_their_field(fields, param):
    with pytest.raises(RequestError) as caught:
        Request(**fields)
    assert caught.value.param == param


def test_key_follows_everything_the_answer_depends_on(manifest):
    base = Request(style="alt")
    key = base.key("0" * 64, manifest)
    assert Request(style="alt").key("0" * 64, manifest) == key
    changed = [replace(base, max_new_tokens=7), replace(base, max_crops=1), Request(style="alt", lang="German"),
               Request(prompt=DEFAULT_PROMPTS["alt"])]
    others = [base.key("1" * 64, manifest), *(other.key("0" * 64, manifest) for other in changed)]
    assert len({key, *others}) == 1 + len(others)


def test_json_format_prompt_and_shape(manifest):
    schema = {"type": "object", "properties": {"color": {"type": "string"}}, "required": ["color"]}
    asked = Request(prompt="What color?", json_format=True, schema=schema)
    assert asked.prompt_for(manifest).startswith("What color?") and '"color"' in asked.prompt_for(manifest)
    assert asked.reshaped and not Request(style="short").reshaped and Request(style="seo").reshaped


def test_answer_shapes(picture):
    captioner = Captioner.load(DEMO_MODEL_DIR, threads=1)
    plain = captioner.answer(picture, Request(max_new_tokens=8))
    assert plain.value == plain.result.text and plain.fields() == {"text": plain.result.text}
    tags = captioner.answer(picture, Request(style="tags", max_new_tokens=12))
    assert tags.fields()["style"] == "tags" and tags.fields()["raw_text"] == tags.result.text
    assert isinstance(tags.value, list) and json.loads(tags.text) == tags.value == tags.fields()["data"]
    strict = Request(prompt="Colors?", json_format=True, schema={"type": "array", "items": {"type": "integer"}})
    with pytest.raises(StyleOutputError):
        strict.answer(plain.result)


def test_every_surface_gives_the_same_answer(picture, tmp_path):
    """The Python API, `caption --json`, a batch row and /v1/caption for one style request, none from the cache."""
    asked = Request(style="tags", max_new_tokens=12, max_crops=2)
    expected = Captioner.load(DEMO_MODEL_DIR, threads=1).answer(picture, asked).fields()

    args = ["--quiet", "caption", str(picture), "--style", "tags", "--max-new-tokens", "12", "--max-crops", "2",
            "--no-cache", "--threads", "1"]
    shown = molmocap(*args, "--json")
    assert shown.returncode == 0, shown.stderr
    out = tmp_path / "rows.jsonl"
    batch = molmocap(*args, "-o", str(out))
    assert batch.returncode == 0, batch.stderr
    rows = [json.loads(shown.stdout), json.loads(out.read_text())]

    client = TestClient(create_app(Captioner.load(DEMO_MODEL_DIR, threads=1)))
    body = {"image": base64.b64encode(picture.read_bytes()).decode(), "style": "tags", "max_new_tokens": 12,
            "max_crops": 2}
    with client:
        served = client.post("/v1/caption", json=body)
    assert served.status_code == 200, served.text
    assert all(row["timings"]["cached"] is False for row in rows)
    for answer in [*rows, served.json()]:
        assert {k: answer.get(k) for k in expected} == expected
