"""Pointing: parsing Molmo2 (and Molmo 1) point answers into pixels, drawing them, and the `point` command."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from conftest import molmocap, noise_image
from molmocap.runtime.errors import InputError
from molmocap.runtime.pointing import Point, draw_points, parse_points, point_prompt


def test_molmo2_points_become_pixels():
    text = 'Here: <points coords="1 1 250 500 2 750 100">red circles</points>'
    assert parse_points(text, 400, 200) == [Point(100.0, 100.0, 1, 1, "red circles"),
                                            Point(300.0, 20.0, 2, 1, "red circles")]


def test_several_groups_and_malformed_triples():
    text = ('<points coords="1 1 100 100">a</points> and <points coords="2 1 900 900 2 x 5">b</points>'
            '<points coords="">c</points>')
    points = parse_points(text, 1000, 1000)
    assert [(p.image, p.label, round(p.x)) for p in points] == [(1, "a", 100), (2, "b", 900)]


def test_molmo1_points_on_a_percent_scale():
    text = '<point x="10.0" y="50.0" alt="dog">dog</point> <points x1="20" y1="20" x2="80" y2="40">cats</points>'
    assert [(p.x, p.y, p.object_id, p.label) for p in parse_points(text, 200, 100)] == [
        (20.0, 50.0, 1, "dog"), (40.0, 20.0, 1, "cats"), (160.0, 40.0, 2, "cats")]


def test_no_points_is_a_count_of_zero():
    assert parse_points("There are none.", 10, 10) == []


def test_prompt():
    assert point_prompt(" red car ") == "Point to the red car."
    with pytest.raises(InputError):
        point_prompt("  ")


def test_drawn_markers_land_on_the_points(tmp_path):
    image = Image.new("RGB", (300, 200), (0, 0, 0))
    out = tmp_path / "marked.png"
    draw_points(image, [Point(50, 60, 1, 1, "x"), Point(250, 150, 2, 1, "x")], out)
    pixels = np.asarray(Image.open(out))
    assert pixels[60, 50].tolist() == [255, 0, 180] and pixels[150, 250].tolist() == [255, 0, 180]
    assert pixels[5, 150].tolist() == [0, 0, 0]
    assert [p.name for p in tmp_path.iterdir()] == ["marked.png"]
    with pytest.raises(InputError, match="png"):
        draw_points(image, [], tmp_path / "marked.gif")


def test_point_command(exported, tmp_path):
    image = tmp_path / "scene.png"
    noise_image(90, 160, seed=3).save(image)
    drawn = tmp_path / "out.png"
    proc = molmocap("point", str(image), "red circle", "--model", str(exported["qwen3_gqa"]), "--max-new-tokens",
                    "6", "--json", "--draw", str(drawn))
    assert proc.returncode == 0, proc.stderr
    row = json.loads(proc.stdout)
    assert row["label"] == "red circle" and row["count"] == len(row["points"]) and row["size"] == [160, 90]
    assert Image.open(drawn).size == (160, 90)
    assert molmocap("point", str(image), " ", "--model", str(exported["qwen3_gqa"])).returncode == 2
