"""The persistent result cache: keys, hits, per-model stats and clearing, and tolerance of a corrupt file."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from conftest import flip_byte, molmocap, noise_image
from molmocap.runtime.cache import CachedResult, ResultCache, default_cache_path, result_key
from molmocap.runtime.errors import CacheError
from molmocap.runtime.files import sha256_file
from molmocap.runtime.manifest import MANIFEST_NAME, read_manifest

FAST = ("--max-new-tokens", "3", "--max-crops", "1", "--threads", "1")




def put(cache: ResultCache, key: str, model: str = "m1", text: str = "a cat") -> None:
    cache.put(key, "img", model, f"label-{model}", "prompt", {"max_new_tokens": 5}, CachedResult(text, [1, 2], 7))


def test_default_path_honours_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("MOLMOCAP_CACHE_DIR", str(tmp_path / "c"))
    assert default_cache_path() == tmp_path / "c" / "results.sqlite"
    monkeypatch.delenv("MOLMOCAP_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_path() == tmp_path / "xdg" / "molmocap" / "results.sqlite"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_path() == tmp_path / "home" / ".cache" / "molmocap" / "results.sqlite"


def test_key_covers_everything_that_changes_the_output():
    base = result_key("sha", "model", "prompt", {"max_new_tokens": 5, "max_crops": 8, "style": None})
    assert base == result_key("sha", "model", "prompt", {"style": None, "max_crops": 8, "max_new_tokens": 5})
    others = [result_key("sha2", "model", "prompt", {"max_new_tokens": 5, "max_crops": 8, "style": None}),
              result_key("sha", "model2", "prompt", {"max_new_tokens": 5, "max_crops": 8, "style": None}),
              result_key("sha", "model", "prompt2", {"max_new_tokens": 5, "max_crops": 8, "style": None}),
              result_key("sha", "model", "prompt", {"max_new_tokens": 6, "max_crops": 8, "style": None}),
              result_key("sha", "model", "prompt", {"max_new_tokens": 5, "max_crops": 4, "style": None}),
              result_key("sha", "model", "prompt", {"max_new_tokens": 5, "max_crops": 8, "style": "alt"})]
    assert len({base, *others}) == 7


def test_round_trip_stats_and_clear(tmp_path):
    path = tmp_path / "deep" / "results.sqlite"
    cache = ResultCache(path)
    assert cache.stats().entries == 0 and not path.exists()
    assert cache.get("k1") is None
    put(cache, "k1")
    put(cache, "k2")
    put(cache, "k3", model="m2")
    assert cache.get("k1") == CachedResult("a cat", [1, 2], 7)
    put(cache, "k1", text="a dog")
    assert cache.get("k1").text == "a dog"
    stats = cache.stats()
    assert stats.entries == 3 and stats.size_bytes > 0 and stats.path == path
    assert stats.models == [("m1", "label-m1", 2), ("m2", "label-m2", 1)]

    other = ResultCache(path)
    assert other.get("k3").text == "a cat"
    assert other.clear("m1") == 2
    assert cache.get("k1") is None and cache.get("k3") is not None
    assert cache.clear() == 1 and cache.stats().entries == 0
    (mode,) = sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()
    assert mode == "wal"


def test_corrupt_file_warns_once_and_is_skipped(tmp_path):
    path = tmp_path / "results.sqlite"
    path.write_bytes(b"this is not an sqlite database " * 100)
    warnings: list[str] = []
    cache = ResultCache(path, warn=warnings.append)
    assert cache.get("k") is None
    put(cache, "k")
    assert cache.get("k") is None
    assert len(warnings) == 1 and str(path) in warnings[0] and "continuing without it" in warnings[0]
    with pytest.raises(CacheError, match="unusable"):
        ResultCache(path).stats()
    with pytest.raises(CacheError):
        ResultCache(path).clear("m1")
    assert ResultCache(path).clear() is None and not path.exists()
    assert ResultCache(path).stats().entries == 0


def test_unwritable_location_is_only_a_warning(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    warnings: list[str] = []
    cache = ResultCache(blocker / "results.sqlite", warn=warnings.append)
    put(cache, "k")
    assert cache.get("k") is None and len(warnings) == 1


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cache_images") / "a.png"
    noise_image(90, 140, seed=5).save(path)
    return path


def test_cli_second_run_hits_the_cache(exported, image, tmp_path):
    model = str(exported["qwen3_gqa"])
    first = molmocap("caption", str(image), "--model", model, "--json", *FAST, cache_dir=tmp_path)
    second = molmocap("caption", str(image), "--model", model, "--json", *FAST, cache_dir=tmp_path)
    uncached = molmocap("caption", str(image), "--model", model, "--json", "--no-cache", *FAST, cache_dir=tmp_path)
    assert first.returncode == second.returncode == uncached.returncode == 0, first.stderr + second.stderr
    rows = [json.loads(proc.stdout) for proc in (first, second, uncached)]
    assert [row["timings"]["cached"] for row in rows] == [False, True, False]
    assert rows[0]["text"] == rows[1]["text"] == rows[2]["text"]
    assert rows[0]["token_ids"] == rows[1]["token_ids"] and rows[0]["prompt_tokens"] == rows[1]["prompt_tokens"]
    assert set(rows[1]["timings"]) == {"cached", "total_s"}

    other_options = molmocap("caption", str(image), "--model", model, "--json", *FAST[:2], "--max-crops", "2",
                             cache_dir=tmp_path)
    assert json.loads(other_options.stdout)["timings"]["cached"] is False

    asked = [molmocap("ask", str(image), "Which color?", "--model", model, "--json", *FAST, cache_dir=tmp_path)
             for _ in range(2)]
    assert [json.loads(proc.stdout)["timings"]["cached"] for proc in asked] == [False, True]

    stats = molmocap("cache", "stats", cache_dir=tmp_path)
    assert stats.returncode == 0 and "entries: 3" in stats.stdout and str(tmp_path) in stats.stdout
    assert f"model {read_manifest(model).model_id[:16]}" in stats.stdout and ": 3 entries" in stats.stdout
    cleared = molmocap("cache", "clear", "--model", model, cache_dir=tmp_path)
    assert cleared.returncode == 0 and "removed 3 entries" in cleared.stdout
    assert "entries: 0" in molmocap("cache", "stats", cache_dir=tmp_path).stdout


def test_cli_tolerates_a_corrupt_cache(exported, image, tmp_path):
    (tmp_path / "results.sqlite").write_bytes(b"\x00garbage" * 512)
    other = tmp_path / "b.png"
    noise_image(60, 60, seed=6).save(other)
    model = str(exported["qwen3_gqa"])
    proc = molmocap("caption", str(image), str(other), "--model", model, *FAST, cache_dir=tmp_path)
    assert proc.returncode == 0 and len(proc.stdout.splitlines()) == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: result cache") and "Traceback" not in proc.stderr

    stats = molmocap("cache", "stats", cache_dir=tmp_path)
    assert stats.returncode == 1 and stats.stderr.startswith("error: result cache") and not stats.stdout
    cleared = molmocap("cache", "clear", cache_dir=tmp_path)
    assert cleared.returncode == 0 and "deleted" in cleared.stdout
    assert not (tmp_path / "results.sqlite").exists()


def test_cached_answer_is_not_served_for_a_damaged_model(model_copy, image, tmp_path):
    cache = tmp_path / "cache"
    model = str(model_copy)
    out = tmp_path / "results.jsonl"
    for _ in range(2):
        first = molmocap("caption", str(image), "--model", model, "--json", *FAST, cache_dir=cache)
        assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout)["timings"]["cached"] is True
    flip_byte(model_copy / "decoder.onnx.data")
    for args in (("--json",), ("-o", str(out))):  # the answer is in the cache: the model is not even opened
        proc = molmocap("caption", str(image), "--model", model, *args, *FAST, cache_dir=cache)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and proc.stdout == "" and len(lines) == 1, proc.stderr
        assert lines[0].startswith("error: ") and "decoder.onnx.data" in lines[0]
    assert not out.exists() or out.read_text() == ""
    cleared = molmocap("cache", "clear", "--model", model, cache_dir=cache)  # clearing needs no intact weights
    assert cleared.returncode == 0 and "removed 1 entries" in cleared.stdout


def test_model_id_follows_re_exported_weights(model_copy, image, tmp_path):
    """A weight file replaced together with its manifest sha256 (a re-export) is a new model: new id, no hit."""
    cache = tmp_path / "cache"
    model = str(model_copy)
    before = read_manifest(model_copy).model_id
    first = molmocap("caption", str(image), "--model", model, "--json", *FAST, cache_dir=cache)
    assert first.returncode == 0, first.stderr
    weights = model_copy / "embed.onnx.data"
    flip_byte(weights)
    manifest = json.loads((model_copy / MANIFEST_NAME).read_text())
    (entry,) = [entry for entry in manifest["files"] if entry["path"] == weights.name]
    entry["sha256"] = sha256_file(weights)
    (model_copy / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))
    assert read_manifest(model_copy).model_id != before
    second = molmocap("caption", str(image), "--model", model, "--json", *FAST, cache_dir=cache)
    assert second.returncode == 0, second.stderr
    assert json.loads(second.stdout)["timings"]["cached"] is False
    stats = molmocap("cache", "stats", cache_dir=cache)
    assert f"model {before[:16]}" in stats.stdout and f"model {read_manifest(model_copy).model_id[:16]}" in stats.stdout
