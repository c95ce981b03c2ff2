"""Caption styles: prompts, and the repair of answers into the promised shape."""

from __future__ import annotations

import pytest

from molmocap.runtime.styles import (
    ALT_MAX_CHARS,
    STYLES,
    StyleOutputError,
    alt_text,
    finish,
    json_answer,
    json_format_prompt,
    schema_mismatch,
    seo_object,
    style_prompt,
    tag_list,
)


def test_every_style_has_a_prompt_and_lang_and_overrides_apply():
    for style in STYLES:
        assert style_prompt(style)
    assert style_prompt("short", "German").endswith("Answer in German.")
    assert style_prompt("short", overrides={"short": "Caption briefly."}) == "Caption briefly."
    with pytest.raises(ValueError):
        style_prompt("poem")


@pytest.mark.parametrize("raw,expected", [
    ("An image of a red bus on a bridge.", "A red bus on a bridge."),
    ("picture showing two dogs", "Two dogs"),
    ("A photo of the sea", "The sea"),
])
def test_alt_text_drops_image_of(raw, expected):
    assert alt_text(raw) == expected


def test_alt_text_is_bounded_at_a_word_boundary():
    text = alt_text("A " + "very " * 60 + "long caption")
    assert len(text) <= ALT_MAX_CHARS and text.endswith("…") and "  " not in text
    assert not text[:-1].endswith(" ")


@pytest.mark.parametrize("raw", [
    '{"title": "Red bus", "caption": "A red bus on a bridge.", "keywords": ["bus", "bridge"]}',
    'Sure! {"title": "Red bus", "caption": "A red bus on a bridge.", "keywords": ["bus", "bridge",],}',
    "{'title': 'Red bus', 'caption': 'A red bus on a bridge.', 'keywords': ['bus', 'bridge']}",
])
def test_seo_object_is_repaired(raw):
    assert seo_object(raw) == {"title": "Red bus", "caption": "A red bus on a bridge.", "keywords": ["bus", "bridge"]}


def test_seo_from_plain_text_fills_every_field():
    value = seo_object("A red bus crosses an old stone bridge at dawn. Mist covers the river.")
    assert value["caption"].startswith("A red bus")
    assert value["title"] == "A red bus crosses an old stone bridge at dawn"
    assert "bus" in value["keywords"] and "the" not in value["keywords"]


@pytest.mark.parametrize("raw,expected", [
    ('["Bus", "bridge", "bus"]', ["bus", "bridge"]),
    ('tags: ["sky", "sea"', ["sky", "sea"]),
    ("- dog\n- Park\n- ball", ["dog", "park", "ball"]),
    ("cat, sofa, indoor", ["cat", "sofa", "indoor"]),
])
def test_tags_are_repaired(raw, expected):
    assert tag_list(raw) == expected


def test_unrepairable_answers_are_reported():
    with pytest.raises(StyleOutputError):
        tag_list(" , ; ")
    with pytest.raises(StyleOutputError):
        seo_object('{"keywords": []}')


def test_finish_dispatches():
    assert finish("short", "  A cat.  ") == "A cat."
    assert finish("tags", '["a", "b"]') == ["a", "b"]


LABELS = {"type": "object", "required": ["labels"], "additionalProperties": False,
          "properties": {"labels": {"type": "array", "items": {
              "type": "object", "required": ["name", "confidence"],
              "properties": {"name": {"type": "string"}, "confidence": {"type": "number"}}}}}}


@pytest.mark.parametrize("raw,schema,expected", [
    ('{"a": 1}', None, {"a": 1}),
    ("Sure, here it is: {'a': 'b',} Enjoy.", None, {"a": "b"}),
    ('```json\n{"labels": [{"name": "cat", "confidence": 0.5},]}\n```', LABELS,
     {"labels": [{"name": "cat", "confidence": 0.5}]}),
    ('["red", "blue"]', {"type": "array", "items": {"type": "string"}}, ["red", "blue"]),
])
def test_json_formats_are_repaired_into_the_requested_shape(raw, schema, expected):
    assert json_answer(raw, schema) == expected


@pytest.mark.parametrize("raw,schema", [
    ("a red square", None),
    ('["not", "an", "object"]', None),
    ('{"labels": [{"name": "cat"}]}', LABELS),
    ('{"labels": [], "extra": 1}', LABELS),
    ('{"labels": [{"name": "cat", "confidence": "high"}]}', LABELS),
])
def test_json_formats_never_pass_on_the_wrong_shape(raw, schema):
    with pytest.raises(StyleOutputError, match=r"not JSON of the requested format \((no JSON found|\$.*)\)"):
        json_answer(raw, schema)


def test_schema_mismatch_names_the_place():
    wrong = {"labels": [{"name": 1, "confidence": 0.1}]}
    assert schema_mismatch(wrong, LABELS) == "$.labels[0].name is not of type string"
    assert schema_mismatch({"labels": []}, LABELS) is None
    assert schema_mismatch(True, {"type": "integer"}) == "$ is not of type integer"
    assert schema_mismatch("b", {"enum": ["a"]}) == "$ is not one of ['a']"


def test_json_format_prompt_states_the_schema():
    assert json_format_prompt("Tag it.", None) == "Tag it. Answer with only a JSON object."
    assert '"required": ["labels"]' in json_format_prompt("Tag it.", LABELS)
