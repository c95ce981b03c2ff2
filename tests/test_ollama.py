"""Ollama's API on `molmocap serve`: the official `ollama` client against a live server, and raw requests shaped as
PhotoPrism and Home Assistant's LLM Vision send them (traffic to 127.0.0.1 only)."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
from pathlib import Path

import httpx
import ollama
import pytest
from starlette.testclient import TestClient

from conftest import SERVER_KEY, noise_image
from molmocap.runtime import Captioner, Result
from molmocap.runtime.manifest import read_manifest
from molmocap.serve import create_app

PROMPT = "Describe this image."
AUTH = {"Authorization": f"Bearer {SERVER_KEY}"}
SCHEMA = {"type": "object", "required": ["title", "objects"],
          "properties": {"title": {"type": "string"}, "objects": {"type": "array", "items": {"type": "string"}}}}


def _png() -> bytes:
    buffer = io.BytesIO()
    noise_image(64, 96, seed=3).save(buffer, format="PNG")
    return buffer.getvalue()


PNG = _png()
B64 = base64.b64encode(PNG).decode()


@pytest.fixture(scope="module")
def model_dir(exported) -> Path:
    return exported["qwen3_gqa"]


@pytest.fixture(scope="module")
def client(model_dir):
    """The app without an API key, as Home Assistant's LLM Vision (which sends no credentials) needs it."""
    with TestClient(create_app(Captioner.load(model_dir, threads=1))) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def ollama_client(live_server) -> ollama.Client:
    return ollama.Client(host=live_server, headers=AUTH, timeout=120, trust_env=False)


def caption_route(live_server: str, prompt: str, max_new_tokens: int | None = None) -> dict:
    """The /v1/caption answer for the same image and prompt (the server has no result cache)."""
    body = {"image": B64, "prompt": prompt, **({"max_new_tokens": max_new_tokens} if max_new_tokens else {})}
    response = httpx.post(f"{live_server}/v1/caption", json=body, headers=AUTH, timeout=120, trust_env=False)
    assert response.status_code == 200, response.text
    return response.json()


def last_chunk(ndjson: str) -> dict:
    """What PhotoPrism keeps of an Ollama answer: the last of its newline-delimited JSON objects."""
    decoder, position, last = json.JSONDecoder(), 0, {}
    text = ndjson.strip()
    while position < len(text):
        last, position = decoder.raw_decode(text, position)
        while position < len(text) and text[position].isspace():
            position += 1
    return last


def test_generate_plain_and_streamed_answer_as_the_caption_route(live_server, ollama_client):
    expected = caption_route(live_server, PROMPT, 8)
    answer = ollama_client.generate(model="molmo2:4b", prompt=PROMPT, images=[PNG], options={"num_predict": 8},
                                    keep_alive="5m", system="ignored", stream=False)
    assert answer.response == expected["text"] and answer.model == "molmo2:4b" and answer.done
    assert answer.done_reason == expected["finish_reason"] == "length"
    assert answer.eval_count == expected["completion_tokens"] == 8
    assert answer.prompt_eval_count == expected["prompt_tokens"]
    assert answer.prompt_eval_duration > 0 and answer.eval_duration >= 0 and answer.load_duration == 0
    assert answer.total_duration >= answer.prompt_eval_duration + answer.eval_duration
    chunks = list(ollama_client.generate(model="molmo2:4b", prompt=PROMPT, images=[PNG], options={"num_predict": 8},
                                         stream=True))
    assert len(chunks) > 2 and "".join(chunk.response for chunk in chunks) == expected["text"]
    assert not any(chunk.done for chunk in chunks[:-1])
    final = chunks[-1]
    assert final.done and final.response == "" and final.done_reason == "length" and final.eval_count == 8
    assert final.prompt_eval_count == expected["prompt_tokens"] and final.total_duration > 0


def test_chat_plain_and_streamed_answer_as_the_caption_route(live_server, ollama_client):
    expected = caption_route(live_server, PROMPT, 6)
    messages = [{"role": "system", "content": "You are a camera."},
                {"role": "user", "content": PROMPT, "images": [PNG]}]
    answer = ollama_client.chat(model="molmo2", messages=messages, options={"num_predict": 6})
    assert answer.message.role == "assistant" and answer.message.content == expected["text"]
    assert answer.done and answer.done_reason == "length" and answer.eval_count == 6
    chunks = list(ollama_client.chat(model="molmo2", messages=messages, options={"num_predict": 6}, stream=True))
    assert "".join(chunk.message.content for chunk in chunks) == expected["text"]
    assert not any(chunk.done for chunk in chunks[:-1]) and chunks[-1].done and chunks[-1].message.content == ""
    follow_up = [*messages, {"role": "assistant", "content": answer.message.content},
                 {"role": "user", "content": "What color is it?"}]
    answer = ollama_client.chat(model="molmo2", messages=follow_up, options={"num_predict": 6})
    assert answer.message.content == caption_route(live_server, "What color is it?", 6)["text"]


def test_the_default_token_limit_is_the_caption_routes(live_server, ollama_client):
    answer = ollama_client.generate(model="m", prompt=PROMPT, images=[PNG])
    expected = caption_route(live_server, PROMPT)
    assert answer.response == expected["text"] and answer.eval_count == expected["completion_tokens"]
    assert answer.done_reason == expected["finish_reason"]


def test_list_and_show_describe_the_one_model(live_server, ollama_client, model_dir):
    manifest = read_manifest(model_dir)
    models = ollama_client.list().models
    name = httpx.get(f"{live_server}/health", trust_env=False).json()["model_name"]
    assert len(models) == 1 and models[0].model == name
    assert models[0].digest == manifest.model_id
    assert models[0].size == sum(entry["bytes"] for entry in manifest.data["files"])
    details = models[0].details
    assert details.format == "onnx" and details.family == "molmo2"
    assert details.quantization_level == manifest.data["quant"]
    shown = ollama_client.show("anything:latest")
    assert {"completion", "vision"} <= set(shown.capabilities) and shown.details == details
    assert shown.modelinfo["molmo2.context_length"] == manifest.geometry["text"]["max_position_embeddings"]
    assert shown.modified_at == models[0].modified_at


def test_a_load_request_warms_without_an_image(ollama_client):
    """Clients preload a model with an empty generate or chat; there is nothing to load, and no image needed."""
    assert ollama_client.generate(model="m").done_reason == "load"
    assert ollama_client.chat(model="m", messages=[]).done_reason == "load"


@pytest.mark.parametrize("fmt", ["json", SCHEMA])
def test_a_format_the_answer_does_not_meet_is_an_error_never_broken_json(ollama_client, fmt):
    """The tiny random model answers no JSON: plain and streamed, the client gets Ollama's error, not text."""
    for stream in (False, True):
        with pytest.raises(ollama.ResponseError) as caught:
            answer = ollama_client.generate(model="m", prompt=PROMPT, images=[PNG], format=fmt, stream=stream,
                                            options={"num_predict": 8})
            if stream:
                list(answer)
        assert caught.value.status_code == 500 and "not JSON of the requested format" in caught.value.error


def test_credentials_and_the_open_probes(live_server):
    wrong = ollama.Client(host=live_server, headers={"Authorization": "Bearer wrong"}, trust_env=False)
    with pytest.raises(ollama.ResponseError) as caught:
        wrong.list()
    assert caught.value.status_code == 401 and "API key" in caught.value.error
    probe = httpx.Client(base_url=live_server, trust_env=False)
    assert probe.get("/").text == "Ollama is running" and probe.head("/").status_code == 200
    assert probe.get("/api/version").json()["version"]
    assert probe.post("/api/generate", json={"model": "m"}).json() == {"error": caught.value.error}


class JsonAnsweringCaptioner(Captioner):
    """The tiny model answering `answer` in place of its own random text: a stand-in for a real Molmo2 asked for
    JSON, with its prose and slips. Preprocessing, token counts and timings are the real model's."""

    answer = ""

    def generate(self, image, prompt=None, max_new_tokens=128, max_crops=None, on_text=None) -> Result:
        self.prompts.append(prompt)
        return dataclasses.replace(super().generate(image, prompt, max_new_tokens, max_crops), text=self.answer)


@pytest.fixture(scope="module")
def json_model(model_dir):
    model = JsonAnsweringCaptioner.load(model_dir, threads=1)
    model.prompts = []
    with TestClient(create_app(model, max_batch=1)) as test_client:  # answers through `generate`
        yield model, test_client


def test_photoprism_labels_request(json_model):
    """PhotoPrism's labels request: one base64 thumbnail, `format: "json"`, no streaming, sampling options; it keeps
    the last NDJSON object and reads `labels` from the JSON in `response`."""
    model, client = json_model
    labels = [{"name": "square", "confidence": 0.9, "topicality": 0.8}]
    model.answer = "Sure! " + json.dumps({"labels": labels}).replace("]}", ",]}") + " Hope this helps."
    prompt = 'Analyze the image and return label objects as JSON: {"labels": [{"name": "", "confidence": 0, ...}]}'
    body = {"id": "7c3e0b8a", "model": "qwen2.5vl:7b", "system": "You are a PhotoPrism vision model.",
            "prompt": prompt, "suffix": "", "format": "json", "stream": False, "images": [B64],
            "options": {"temperature": 0.05, "top_p": 0.9, "stop": ["\n\n"]}}
    response = client.post("/api/generate", json=body)
    assert response.status_code == 200, response.text
    answer = last_chunk(response.text)
    assert answer["done"] is True and json.loads(answer["response"])["labels"] == labels
    assert model.prompts[-1].startswith(prompt) and "JSON" in model.prompts[-1][len(prompt):]


def test_photoprism_caption_request(client, live_server):
    """PhotoPrism's caption request (no format): the caption is `response` of the last object."""
    body = {"id": "1", "model": "gemma3:4b", "prompt": PROMPT, "suffix": "", "stream": False, "images": [B64],
            "options": {"temperature": 0.2}}
    answer = last_chunk(client.post("/api/generate", json=body).text)
    assert answer["response"] == caption_route(live_server, PROMPT)["text"]


def llm_vision_body(message: str, max_tokens: int, **extra) -> dict:
    """The body Home Assistant's LLM Vision posts to /api/chat for one image (providers.py, `Ollama`)."""
    return {"model": "llava-phi3:latest", "system": "Describe what the camera sees.",
            "messages": [{"role": "user", "content": message, "images": [B64]}], "prompt": [], "images": [B64],
            "stream": False, "keep_alive": None, "think": False,
            "options": {"num_predict": max_tokens, "temperature": 0.5, "top_p": None, "num_ctx": None}, **extra}


def test_home_assistant_llm_vision_request(client, live_server):
    """LLM Vision checks the server with GET /api/tags, then reads `message.content` (and `error` on failure)."""
    assert client.get("/api/tags").status_code == 200
    response = client.post("/api/chat", json=llm_vision_body(PROMPT, 7))
    assert response.status_code == 200, response.text
    assert response.json()["message"]["content"] == caption_route(live_server, PROMPT, 7)["text"]


def test_home_assistant_structured_output(json_model):
    model, client = json_model
    wanted = {"title": "Two squares", "objects": ["square", "square"]}
    model.answer = f"```json\n{json.dumps(wanted)}\n```"
    response = client.post("/api/chat", json=llm_vision_body(PROMPT, 40, format=SCHEMA))
    assert response.status_code == 200, response.text
    assert json.loads(response.json()["message"]["content"]) == wanted
    assert json.dumps(SCHEMA) in model.prompts[-1]
    model.answer = json.dumps({"title": "Two squares"})
    response = client.post("/api/chat", json=llm_vision_body(PROMPT, 40, format=SCHEMA))
    assert response.status_code == 500 and "not JSON of the requested format" in response.json()["error"]


@pytest.mark.parametrize("route,body,pattern", [
    ("/api/generate", {"prompt": PROMPT, "images": [B64, B64]}, "exactly one image per request and found 2"),
    ("/api/generate", {"prompt": PROMPT}, "found none"),
    ("/api/generate", {"prompt": PROMPT, "images": ["https://example.com/cat.png"]}, "offline"),
    ("/api/generate", {"prompt": PROMPT, "images": [base64.b64encode(PNG[:120]).decode()]}, "corrupt"),
    ("/api/generate", {"prompt": PROMPT, "images": B64}, "list of base64 images"),
    ("/api/generate", {"prompt": PROMPT, "images": [B64], "format": "yaml"}, "format must be"),
    ("/api/generate", {"prompt": PROMPT, "images": [B64], "options": {"num_predict": 0}}, "num_predict"),
    ("/api/generate", {"prompt": PROMPT, "images": [B64], "options": {"max_crops": 10_000}}, "max_crops"),
    ("/api/generate", {"prompt": PROMPT, "images": [B64], "stream": "yes"}, "stream must be a boolean"),
    ("/api/chat", {"messages": [{"role": "system", "content": "Hi", "images": [B64]}]}, "no user message"),
    ("/api/chat", {"messages": [{"role": "user", "content": PROMPT}]}, "found none"),
    ("/api/chat", {"messages": [{"role": "user", "content": PROMPT, "images": [B64, B64]}]}, "found 2"),
    ("/api/chat", {"messages": "hello"}, "messages must be a list"),
])
def test_bad_requests_are_400_in_ollamas_error_shape(client, route, body, pattern):
    response = client.post(route, json={"model": "m", **body})
    assert response.status_code == 400, response.text
    assert set(response.json()) == {"error"} and pattern in response.json()["error"]
    assert "\n" not in response.json()["error"] and "Traceback" not in response.text


def test_streaming_is_the_default_as_ndjson(client):
    response = client.post("/api/chat", json={"model": "m", "options": {"num_predict": 4},
                                              "messages": [{"role": "user", "content": PROMPT, "images": [B64]}]})
    assert response.status_code == 200 and response.headers["content-type"].startswith("application/x-ndjson")
    chunks = [json.loads(line) for line in response.text.splitlines()]
    assert len(chunks) >= 2 and [chunk["done"] for chunk in chunks] == [False] * (len(chunks) - 1) + [True]
    assert set(chunks[-1]) >= {"done_reason", "total_duration", "load_duration", "prompt_eval_count",
                               "prompt_eval_duration", "eval_count", "eval_duration", "created_at", "model"}


def test_unknown_ollama_routes_and_metrics(client):
    assert client.post("/api/pull", json={"model": "m"}).json() == {"error": "Not Found"}
    client.post("/api/generate", json={"prompt": PROMPT, "images": [B64], "options": {"num_predict": 2},
                                       "stream": False})
    assert client.get("/metrics").json()["requests"]["/api/generate"]["200"] >= 1


def test_the_demo_model_is_listed_as_molmocap_demo():
    from molmocap.runtime.demo import DEMO_MODEL_DIR, DEMO_MODEL_NAME

    with TestClient(create_app(Captioner.load(DEMO_MODEL_DIR, threads=1))) as demo:
        model = demo.get("/api/tags").json()["models"][0]
        assert model["name"] == model["model"] == DEMO_MODEL_NAME
