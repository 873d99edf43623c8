"""Procedurally drawn scenes of coloured shapes with captions that describe them.

The built-in dataset needs no download and no licence: every image is drawn with PIL from a numpy
``Generator``, and its caption is derived from the same structured attributes, so image and text agree by
construction (colour, shape, size, count and the spatial relation between objects). The structured
attributes travel with each sample as a JSON-serialisable ``meta`` dict, which lets probes and retrieval
metrics ask "does the stitched representation know the colour?" without parsing captions.

Scene kinds (chosen at random):

* one object:                "a large red circle on a gray background"
* one group of 2-3 copies:   "two small green squares on a white background"
* two groups, with relation: "a large red circle to the left of two small blue triangles on a black background"
* three different objects:   "from left to right: a small red star, a large blue circle and a small yellow
  square on a beige background"

Relations are read off the drawn positions (every member of one group lies beyond every member of the
other along the named axis), so a caption never claims a relation the picture does not show.

Held-out combinations (``HELD_OUT_OBJECTS``, ``HELD_OUT_TEMPLATES``): the training split never draws them
(``generate_scene(..., hold_out=True)`` redraws the scene instead), while validation and test draw from the full
distribution. So every val/test scene that contains one has a caption never seen in training, by construction:
a compositional test (every colour, shape, size, count and relation word still occurs in training, only these
combinations do not). ``is_held_out(meta)`` says whether a scene contains one.

Hard negatives for binding (``binding_swap(meta)``, ``swapped_caption(meta)``): a caption with the attributes
exchanged between two of the scene's objects -- the same multiset of words, a different scene ("a red circle to
the left of a blue square" vs "a blue circle to the left of a red square"). A text representation that only
counts words cannot tell the two apart. They are derived from ``meta`` after the fact, so the scenes, their
captions and the generator's random stream are exactly those of a generator without them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import combinations
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

# Shape classes; the index is the integer ``label`` stored in meta.
SHAPES: Tuple[str, ...] = ("circle", "square", "triangle", "star", "diamond", "hexagon")
SHAPE_PLURALS: Dict[str, str] = {shape: shape + "s" for shape in SHAPES}

# Eight named colours, far enough apart in RGB that the name is unambiguous to a human.
COLOURS: Dict[str, Tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "orange": (245, 140, 30),
    "purple": (140, 60, 180),
    "pink": (240, 120, 180),
    "brown": (130, 80, 40),
}

# Backgrounds are neutral so that every shape colour stays visible on every background.
BACKGROUNDS: Dict[str, Tuple[int, int, int]] = {
    "gray": (128, 128, 128),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "beige": (225, 210, 170),
}

# Object radius as a fraction of the image side; the two ranges do not overlap, so "small" and
# "large" stay distinguishable after resizing to any encoder resolution.
SIZE_RADIUS: Dict[str, Tuple[float, float]] = {"small": (0.07, 0.10), "large": (0.15, 0.19)}
SIZE_RANK: Dict[str, int] = {"small": 0, "large": 1}

NUMBER_WORDS: Dict[int, str] = {1: "a", 2: "two", 3: "three"}

# Bumped whenever the same seed draws different scenes, so cached scene shards of an older generator are not reused.
SCENES_VERSION = 2

# (shape, colour, size) objects the training split never contains: two per shape, each colour held out once or
# twice, both sizes, so that no single attribute value is unseen in training -- only the combination is.
HELD_OUT_OBJECTS = frozenset({
    ("circle", "green", "large"), ("circle", "purple", "small"),
    ("square", "blue", "small"), ("square", "pink", "large"),
    ("triangle", "yellow", "large"), ("triangle", "brown", "small"),
    ("star", "orange", "small"), ("star", "red", "large"),
    ("diamond", "purple", "large"), ("diamond", "green", "small"),
    ("hexagon", "pink", "small"), ("hexagon", "blue", "large"),
})
# Relation templates of two-group scenes, (relation, (count of the first group, count of the second)), that the
# training split never contains: "two ... above a ..." and "a ... to the right of two ...". Each relation and each
# count pattern still occurs in training with the others.
HELD_OUT_TEMPLATES = frozenset({("above", (2, 1)), ("to the right of", (1, 2))})

# Rejection sampling of positions gives up after this many tries and redraws the whole scene plan;
# with at most three objects of radius <= 0.19 this is hit only rarely.
_MAX_PLACEMENT_TRIES = 200
# Minimum horizontal gap between centres (fraction of the side) for "from left to right" ordering,
# so the order is visible and not decided by a pixel.
_MIN_ORDER_GAP = 0.08


def _choice(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _plan_groups(rng: np.random.Generator) -> List[Dict[str, object]]:
    """Choose what is in the scene: groups of identical objects (shape, colour, size, count)."""
    kind = _choice(rng, ("single", "group", "pair", "three"))
    shapes = list(SHAPES)
    colours = list(COLOURS)
    sizes = list(SIZE_RADIUS)
    if kind == "single":
        counts = [1]
    elif kind == "group":
        counts = [int(rng.integers(2, 4))]
    elif kind == "pair":
        # Two groups; at most three objects in total.
        counts = [1, 1] if rng.random() < 0.5 else ([2, 1] if rng.random() < 0.5 else [1, 2])
    else:
        counts = [1, 1, 1]
    groups: List[Dict[str, object]] = []
    seen = set()
    for count in counts:
        # Distinct groups must differ in (shape, colour, size), or the caption could not tell them apart.
        while True:
            desc = (_choice(rng, shapes), _choice(rng, colours), _choice(rng, sizes))
            if desc not in seen:
                seen.add(desc)
                break
        groups.append({"shape": desc[0], "colour": desc[1], "size": desc[2], "count": count})
    return groups


def _place(rng: np.random.Generator, radii: Sequence[float]) -> List[Tuple[float, float]] | None:
    """Non-overlapping centres (fractions of the side) for circles of the given radii, fully inside."""
    centres: List[Tuple[float, float]] = []
    for radius in radii:
        for _ in range(_MAX_PLACEMENT_TRIES):
            x = float(rng.uniform(radius, 1.0 - radius))
            y = float(rng.uniform(radius, 1.0 - radius))
            # A small margin between objects keeps them visually separate, which counting relies on.
            if all(math.hypot(x - cx, y - cy) > radius + cr + 0.02 for (cx, cy), cr in zip(centres, radii)):
                centres.append((x, y))
                break
        else:
            return None
    return centres


def _relation(first: Sequence[Tuple[float, float]], second: Sequence[Tuple[float, float]]) -> str | None:
    """The relation of group ``first`` to group ``second`` that holds for every member pair, or None.

    Image y grows downwards, so a smaller y is "above". When both axes separate the groups, the axis
    with the larger gap between centroids names the relation (it is the one a viewer notices).
    """
    candidates = []
    fx = [p[0] for p in first]
    sx = [p[0] for p in second]
    fy = [p[1] for p in first]
    sy = [p[1] for p in second]
    if max(fx) < min(sx):
        candidates.append((min(sx) - max(fx), "to the left of"))
    if min(fx) > max(sx):
        candidates.append((min(fx) - max(sx), "to the right of"))
    if max(fy) < min(sy):
        candidates.append((min(sy) - max(fy), "above"))
    if min(fy) > max(sy):
        candidates.append((min(fy) - max(sy), "below"))
    if not candidates:
        return None
    return max(candidates)[1]


def _phrase(group: Dict[str, object]) -> str:
    count = int(group["count"])  # type: ignore[arg-type]
    noun = str(group["shape"]) if count == 1 else SHAPE_PLURALS[str(group["shape"])]
    return f"{NUMBER_WORDS[count]} {group['size']} {group['colour']} {noun}"


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        # Half-side r / sqrt(2) keeps the corners inside the bounding circle used for placement.
        h = r / math.sqrt(2.0)
        draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)
    elif shape == "triangle":
        draw.regular_polygon((cx, cy, r), n_sides=3, rotation=0, fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    elif shape == "hexagon":
        draw.regular_polygon((cx, cy, r), n_sides=6, rotation=0, fill=fill)
    elif shape == "star":
        inner = r * 0.45
        points = []
        for i in range(10):
            radius = r if i % 2 == 0 else inner
            angle = -math.pi / 2 + i * math.pi / 5  # first point straight up
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        draw.polygon(points, fill=fill)
    else:  # pragma: no cover - SHAPES and this function are edited together
        raise ValueError(f"no drawing for shape {shape!r}")


def _caption(groups: Sequence[Dict[str, object]], relation: Optional[str], background: str) -> Tuple[str, str]:
    """``(kind, caption)`` of groups in their order of mention (the one template of each scene kind)."""
    phrases = [_phrase(g) for g in groups]
    if len(groups) == 1:
        kind = "single" if int(groups[0]["count"]) == 1 else "group"  # type: ignore[arg-type]
        body = phrases[0]
    elif len(groups) == 2:
        kind = "pair"
        body = f"{phrases[0]} {relation} {phrases[1]}"
    else:
        kind = "three"
        body = f"from left to right: {phrases[0]}, {phrases[1]} and {phrases[2]}"
    return kind, f"{body} on a {background} background"


def _held_out(groups: Sequence[Dict[str, object]], relation: Optional[str]) -> bool:
    objects = {(str(g["shape"]), str(g["colour"]), str(g["size"])) for g in groups}
    counts = tuple(int(g["count"]) for g in groups)  # type: ignore[arg-type]
    return bool(objects & HELD_OUT_OBJECTS) or (relation, counts) in HELD_OUT_TEMPLATES


def is_held_out(meta: Dict[str, object]) -> bool:
    """True when a scene (its ``meta``) contains a held-out object or relation template (see the module docstring)."""
    objects = set(zip(meta["shapes"], meta["colours"], meta["sizes"]))  # type: ignore[call-overload]
    template = (meta["relation"], tuple(meta["counts"]))  # type: ignore[arg-type]
    return bool(objects & HELD_OUT_OBJECTS) or template in HELD_OUT_TEMPLATES


def _layout(rng: np.random.Generator, hold_out: bool = False) -> Tuple[List[Dict[str, object]], list, Optional[str]]:
    """Groups, their members ``[((x, y), radius), ...]`` and the pair relation, drawn until the layout is honest.

    Two groups must stand in a clear relation, three must be clearly ordered left to right (and are then put in
    that order, the caption's order of mention). With ``hold_out`` a layout containing a held-out combination is
    drawn again too (rejection from the same generator: deterministic, and the kept layouts keep their
    distribution conditional on not being held out).
    """
    while True:
        groups = _plan_groups(rng)
        radii_by_group = []
        for group in groups:
            low, high = SIZE_RADIUS[str(group["size"])]
            radii_by_group.append([float(rng.uniform(low, high)) for _ in range(int(group["count"]))])  # type: ignore[arg-type]
        flat_radii = [r for radii in radii_by_group for r in radii]
        centres = _place(rng, flat_radii)
        if centres is None:
            continue
        # members[g] = [((x, y), radius), ...] for group g, in drawing order.
        members, start = [], 0
        for radii in radii_by_group:
            members.append(list(zip(centres[start : start + len(radii)], radii)))
            start += len(radii)
        relation = None
        if len(groups) == 2:
            relation = _relation([c for c, _ in members[0]], [c for c, _ in members[1]])
            if relation is None:
                continue  # interleaved groups: no honest relation to state, draw again
        elif len(groups) == 3:
            xs = sorted(m[0][0][0] for m in members)
            if min(b - a for a, b in zip(xs, xs[1:])) < _MIN_ORDER_GAP:
                continue
            # Mention order = left to right, which the caption states.
            order = sorted(range(3), key=lambda gi: members[gi][0][0][0])
            groups = [groups[gi] for gi in order]
            members = [members[gi] for gi in order]
        if hold_out and _held_out(groups, relation):
            continue
        return groups, members, relation


def generate_scene(rng: np.random.Generator, size: int = 224, hold_out: bool = False) -> Tuple[Image.Image, str, dict]:
    """Draw one scene; return ``(RGB image of size x size, caption, meta)``.

    ``hold_out=True`` (the training split) never draws a held-out object or relation template.

    ``meta`` holds per-object lists ``shapes``, ``colours``, ``sizes`` and ``positions`` (centre as
    fractions of the side, x to the right, y downwards), ``counts`` per group, ``background``,
    ``relation`` (or None), ``kind`` and ``label`` / ``label_name``: the shape class of the largest
    object, ties broken by the order of mention in the caption. All values are plain Python types.
    The result depends only on the generator's state, so a seeded generator reproduces it exactly.
    """
    if size < 16:
        raise ValueError(f"scene size must be at least 16 pixels, got {size}")
    groups, members, relation = _layout(rng, hold_out)

    background = _choice(rng, list(BACKGROUNDS))
    image = Image.new("RGB", (size, size), BACKGROUNDS[background])
    draw = ImageDraw.Draw(image)
    shapes, colours, sizes, positions = [], [], [], []
    for group, group_members in zip(groups, members):
        for (x, y), radius in group_members:
            _draw_shape(draw, str(group["shape"]), x * size, y * size, radius * size, COLOURS[str(group["colour"])])
            shapes.append(str(group["shape"]))
            colours.append(str(group["colour"]))
            sizes.append(str(group["size"]))
            # Rounded so the JSON is short and identical across platforms.
            positions.append([round(x, 4), round(y, 4)])

    kind, caption = _caption(groups, relation, background)

    # Largest size class wins; max() keeps the first of equals, i.e. the first mentioned.
    label_group = max(groups, key=lambda g: SIZE_RANK[str(g["size"])])
    label_name = str(label_group["shape"])
    meta = {
        "kind": kind,
        "shapes": shapes,
        "colours": colours,
        "sizes": sizes,
        "positions": positions,
        "counts": [int(g["count"]) for g in groups],  # type: ignore[arg-type]
        "background": background,
        "relation": relation,
        "label": SHAPES.index(label_name),
        "label_name": label_name,
    }
    return image, caption, meta


# ---- hard negatives for binding ---------------------------------------------------------------------------

# Tried in this order; the first attribute on which two objects differ is exchanged between them. Colour and size
# words are uninflected, so exchanging them keeps the multiset of words. Shapes move together with their number
# word ("two circles" / "a square"), i.e. the two descriptions trade places: still the same words, and a different
# scene because every relation the captions state is asymmetric (left/right, above/below, left-to-right order).
SWAP_ORDER: Tuple[str, ...] = ("colour", "size", "shape")


@dataclass(frozen=True)
class BindingSwap:
    """A hard-negative caption: ``attribute`` exchanged between the objects mentioned ``objects`` (0-based)."""

    caption: str
    attribute: str
    objects: Tuple[int, int]


def groups_from_meta(meta: Dict[str, object]) -> List[Dict[str, object]]:
    """The scene's groups in their order of mention, rebuilt from the per-object lists of ``meta``."""
    groups, start = [], 0
    for count in meta["counts"]:  # type: ignore[attr-defined]
        groups.append({"shape": meta["shapes"][start], "colour": meta["colours"][start],  # type: ignore[index]
                       "size": meta["sizes"][start], "count": int(count)})  # type: ignore[index]
        start += int(count)
    return groups


def caption_from_meta(meta: Dict[str, object]) -> str:
    """The scene's caption, rebuilt from ``meta`` (identical to the one ``generate_scene`` returned)."""
    return _caption(groups_from_meta(meta), meta["relation"], str(meta["background"]))[1]  # type: ignore[arg-type]


def binding_swap(meta: Dict[str, object]) -> Optional[BindingSwap]:
    """The hard negative of a scene with two or more groups, or None (one group: nothing to exchange).

    The first attribute of ``SWAP_ORDER`` on which two groups differ is exchanged between the first such pair in
    order of mention (for ``shape``, the whole descriptions trade places). Groups always differ in shape, colour or
    size, so every scene with two or more groups has one; the result is deterministic in ``meta``.
    """
    groups = groups_from_meta(meta)
    for attribute in SWAP_ORDER:
        for i, j in combinations(range(len(groups)), 2):
            if groups[i][attribute] == groups[j][attribute]:
                continue
            swapped = [dict(g) for g in groups]
            if attribute == "shape":
                swapped[i], swapped[j] = swapped[j], swapped[i]
            else:
                swapped[i][attribute], swapped[j][attribute] = groups[j][attribute], groups[i][attribute]
            _, caption = _caption(swapped, meta["relation"], str(meta["background"]))  # type: ignore[arg-type]
            return BindingSwap(caption, attribute, (i, j))
    return None


def swapped_caption(meta: Dict[str, object]) -> Optional[str]:
    """The caption of :func:`binding_swap` (same words, another scene), or None for a scene of one group."""
    swap = binding_swap(meta)
    return None if swap is None else swap.caption
