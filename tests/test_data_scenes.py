"""The procedural scene generator: reproducible, and its captions and meta say what the image shows."""

import json
import re
from collections import Counter

import numpy as np
import pytest

from prh_stitch.data.scenes import BACKGROUNDS, COLOURS, NUMBER_WORDS, SHAPES, SIZE_RANK, generate_scene

N_SCENES = 300  # enough that every shape, colour, background and scene kind shows up


def _scenes(n=N_SCENES, size=96):
    return [generate_scene(np.random.default_rng([7, i]), size) for i in range(n)]


def test_same_seed_same_scene_and_different_seed_different_scene():
    first = generate_scene(np.random.default_rng(123), 64)
    again = generate_scene(np.random.default_rng(123), 64)
    other = generate_scene(np.random.default_rng(124), 64)
    assert first[0].tobytes() == again[0].tobytes()
    assert first[1:] == again[1:]
    assert (first[0].tobytes(), first[1]) != (other[0].tobytes(), other[1])


def test_image_size_mode_and_meta_is_json():
    image, caption, meta = generate_scene(np.random.default_rng(0), 80)
    assert image.size == (80, 80) and image.mode == "RGB"
    assert json.loads(json.dumps(meta)) == meta
    assert caption.endswith(f"on a {meta['background']} background")


def test_rejects_tiny_images():
    with pytest.raises(ValueError, match="at least 16"):
        generate_scene(np.random.default_rng(0), 8)


def test_every_attribute_value_occurs():
    metas = [meta for _, _, meta in _scenes()]
    assert {s for m in metas for s in m["shapes"]} == set(SHAPES)
    assert {c for m in metas for c in m["colours"]} == set(COLOURS)
    assert {m["background"] for m in metas} == set(BACKGROUNDS)
    assert set(Counter(m["kind"] for m in metas)) == {"single", "group", "pair", "three"}


def _object_phrases(caption):
    """(count word, size, colour, shape) for each object phrase in a caption."""
    pattern = r"\b(a|two|three) (small|large) (\w+) (\w+?)s?\b(?= |,|$)"
    return re.findall(pattern, caption.split(" on a ")[0])


def test_caption_agrees_with_meta():
    for image, caption, meta in _scenes():
        phrases = _object_phrases(caption)
        assert len(phrases) == len(meta["counts"]), caption
        # Objects are listed group by group, in mention order.
        expanded = []
        for (count_word, size, colour, shape), count in zip(phrases, meta["counts"]):
            assert NUMBER_WORDS[count] == count_word, caption
            expanded += [(size, colour, shape)] * count
        assert expanded == list(zip(meta["sizes"], meta["colours"], meta["shapes"])), caption
        # The label is the largest object's shape, first mentioned among equals.
        largest = max(range(len(meta["sizes"])), key=lambda i: SIZE_RANK[meta["sizes"][i]])
        assert meta["label_name"] == meta["shapes"][largest]
        assert meta["label"] == SHAPES.index(meta["label_name"])


def test_relations_and_order_hold_for_the_drawn_positions():
    checked = 0
    for _, caption, meta in _scenes():
        positions = np.array(meta["positions"])
        if meta["kind"] == "pair":
            first, second = positions[: meta["counts"][0]], positions[meta["counts"][0]:]
            relation = meta["relation"]
            assert relation in caption
            axis, sign = {"to the left of": (0, 1), "to the right of": (0, -1), "above": (1, 1), "below": (1, -1)}[relation]
            # Every member of the first group lies beyond every member of the second along that axis.
            assert (sign * (second[:, axis][None, :] - first[:, axis][:, None]) > 0).all(), caption
            checked += 1
        elif meta["kind"] == "three":
            assert caption.startswith("from left to right:")
            assert list(positions[:, 0]) == sorted(positions[:, 0])
    assert checked > 20


def test_each_object_is_drawn_in_its_colour():
    for image, _, meta in _scenes(100, size=128):
        pixels = np.asarray(image)
        for (x, y), colour in zip(meta["positions"], meta["colours"]):
            # Every shape covers its own centre; objects do not overlap.
            centre = pixels[int(y * 128), int(x * 128)]
            assert tuple(centre) == COLOURS[colour]
        # Shapes stay inside circles placed fully in the image, which never reach a corner.
        for corner in (pixels[0, 0], pixels[-1, -1], pixels[0, -1], pixels[-1, 0]):
            assert tuple(corner) == BACKGROUNDS[meta["background"]]
