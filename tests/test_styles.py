"""Caption styles: prompts, and the repair of answers into the promised shape."""

from __future__ import annotations

import pytest

from molmocap.runtime.styles import ALT_MAX_CHARS, STYLES, StyleOutputError, alt_text, finish, seo_object, style_prompt, tag_list


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
