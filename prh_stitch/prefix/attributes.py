"""Scene attributes read back from a generated caption and compared with the scene's own ``meta``.

The built-in scenes' captions follow a small grammar (see :mod:`prh_stitch.data.scenes`): object phrases
``<a|two|three> <size> <colour> <shape>[s]``, joined by a relation (``to the left of``, ``to the right of``,
``above``, ``below``) or listed ``from left to right``, then ``on a <background> background``. A generated caption
is parsed with the same vocabulary; whatever does not parse counts as wrong. Scores are per scene:

- ``colour``, ``shape``, ``size``, ``count``: of the first object phrase (every scene has one), against the scene's
  first group;
- ``relation``: two-group scenes only, the relation words against ``meta["relation"]``;
- ``background``; ``objects``: every phrase, in order, equal to the scene's groups; ``exact``: the whole caption.
"""

from __future__ import annotations

import re
from typing import Any, Dict, List, Optional, Sequence

from prh_stitch.data.scenes import BACKGROUNDS, COLOURS, NUMBER_WORDS, SHAPES, SIZE_RADIUS

RELATIONS = ("to the left of", "to the right of", "above", "below")
COUNT_OF_WORD = {word: count for count, word in NUMBER_WORDS.items()}
_PHRASE = re.compile(r"\b({})\s+({})\s+({})\s+({})(s?)\b".format(
    "|".join(COUNT_OF_WORD), "|".join(SIZE_RADIUS), "|".join(COLOURS), "|".join(SHAPES)))
_BACKGROUND = re.compile(r"\bon an?\s+({})\s+background\b".format("|".join(BACKGROUNDS)))
_RELATION = re.compile(r"\b({})\b".format("|".join(re.escape(r) for r in RELATIONS)))
ATTRIBUTES = ("colour", "shape", "size", "count", "relation", "background", "objects", "exact")
# The accuracy of guessing uniformly among the grammar's values; ``objects`` and ``exact`` have no simple figure.
UNIFORM_CHANCE = {"colour": 1 / len(COLOURS), "shape": 1 / len(SHAPES), "size": 1 / len(SIZE_RADIUS),
                  "count": 1 / len(NUMBER_WORDS), "relation": 1 / len(RELATIONS), "background": 1 / len(BACKGROUNDS)}


def parse_caption(text: str) -> Dict[str, Any]:
    """``groups`` [(count, size, colour, shape)], ``relation`` (or None) and ``background`` (or None) of a caption."""
    text = text.lower()
    groups = [(COUNT_OF_WORD[m.group(1)], m.group(2), m.group(3), m.group(4)) for m in _PHRASE.finditer(text)]
    relation = _RELATION.search(text)
    background = _BACKGROUND.search(text)
    return {"groups": groups, "relation": relation.group(1) if relation else None,
            "background": background.group(1) if background else None}


def scene_groups(meta: Dict[str, Any]) -> List[tuple]:
    """The scene's groups in caption order, (count, size, colour, shape), from its per-object lists."""
    groups, start = [], 0
    for count in meta["counts"]:
        groups.append((int(count), meta["sizes"][start], meta["colours"][start], meta["shapes"][start]))
        start += int(count)
    return groups


def is_scene_meta(meta: Any) -> bool:
    return isinstance(meta, dict) and all(k in meta for k in ("counts", "sizes", "colours", "shapes", "background"))


def score_caption(text: str, meta: Dict[str, Any], caption: Optional[str] = None) -> Dict[str, Optional[bool]]:
    """Per-attribute correctness of a generated caption for one scene (None: not applicable to this scene)."""
    parsed, truth = parse_caption(text), scene_groups(meta)
    first = parsed["groups"][0] if parsed["groups"] else (None, None, None, None)
    count, size, colour, shape = first
    two_groups = len(truth) == 2
    return {
        "colour": colour == truth[0][2], "shape": shape == truth[0][3], "size": size == truth[0][1],
        "count": count == truth[0][0],
        "relation": (parsed["relation"] == meta.get("relation")) if two_groups else None,
        "background": parsed["background"] == meta["background"],
        "objects": parsed["groups"] == truth,
        "exact": None if caption is None else text.strip() == caption.strip(),
    }


def attribute_accuracy(scores: Sequence[Dict[str, Optional[bool]]]) -> Dict[str, Dict[str, Any]]:
    """``{attribute: {accuracy, n}}`` over the scenes where the attribute applies."""
    out = {}
    for name in ATTRIBUTES:
        values = [s[name] for s in scores if s.get(name) is not None]
        out[name] = {"accuracy": sum(values) / len(values) if values else None, "n": len(values)}
    return out
