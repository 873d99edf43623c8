"""The data of the translation experiments: train and evaluation shard series, written once under the cache.

Three kinds (``DATASETS``), each a train series (the unpaired halves are drawn from it) and an evaluation series
(held-out pairs the method never sees):

- ``scenes``: the built-in scenes, one sample per *distinct* caption (identical captions are identical text
  features, which no method could tell apart), train captions from the ``train`` split, evaluation captions from
  the ``test`` split minus any caption that occurs in the training series (so every evaluation pair is unseen).
- ``scenes_reworded``: the same scenes, captioned by :func:`reword` instead: other templates, word order and
  synonyms, drawn deterministically from each scene's meta (a second, differently worded caption set).
- ``fashion_mnist``: Fashion-MNIST images (train series from its training set, evaluation from its test set),
  captioned from the class with the source's templates; retrieval there is per image, not per caption.

Folders are built in a hidden temporary sibling and renamed into place when complete (as the scene splits are),
so a crash never leaves a folder that looks finished.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Callable, Dict, Iterator, Tuple

import numpy as np

from prh_stitch.data.shards import expand_urls, manifest_path, write_shards

DATASETS = ("scenes", "scenes_reworded", "fashion_mnist")
SERIES_VERSION = 1

# Synonyms and templates of the reworded captions. Every word of the original vocabulary has at least one other
# spelling, so a reworded caption rarely equals the original.
_SIZES = {"small": ("little", "tiny", "small"), "large": ("big", "huge", "large")}
_SHAPES = {"circle": ("disc", "circle"), "square": ("box", "square"), "triangle": ("triangle", "three-sided shape"),
           "star": ("star", "five-pointed star"), "diamond": ("rhombus", "diamond"),
           "hexagon": ("hexagon", "six-sided shape")}
_PLURALS = {"disc": "discs", "circle": "circles", "box": "boxes", "square": "squares", "triangle": "triangles",
            "three-sided shape": "three-sided shapes", "star": "stars", "five-pointed star": "five-pointed stars",
            "rhombus": "rhombi", "diamond": "diamonds", "hexagon": "hexagons", "six-sided shape": "six-sided shapes"}
_COUNTS = {1: ("one", "a single"), 2: ("a pair of", "2"), 3: ("three", "3")}
_BACKGROUNDS = {"gray": ("grey", "gray"), "white": ("white",), "black": ("black", "dark"), "beige": ("beige", "sand")}
# (relation as written, the converse used when the two groups are mentioned the other way round)
_RELATIONS = {"to the left of": (("left of", "on the left of"), ("right of", "on the right of")),
              "to the right of": (("right of", "on the right of"), ("left of", "on the left of")),
              "above": (("over", "higher than"), ("under", "beneath")),
              "below": (("under", "beneath"), ("over", "higher than"))}
_FRAMES = ("{body}, against a {bg} backdrop", "picture of {body}; the background is {bg}",
           "{body} shown on {bg}", "an image with {body} over a {bg} backdrop")


def reword(meta: Dict, seed: int = 0) -> str:
    """Another caption of the same scene: colour before size, synonyms, other frames; converse relations.

    Deterministic in ``(seed, meta["split"], meta["index"])``; it states the same facts as the original caption.
    """
    rng = np.random.default_rng([seed, 97, {"train": 0, "val": 1, "test": 2}[meta["split"]], int(meta["index"])])
    pick = lambda options: options[int(rng.integers(len(options)))]  # noqa: E731
    groups, start = [], 0
    for count in meta["counts"]:
        shape, colour, size = meta["shapes"][start], meta["colours"][start], meta["sizes"][start]
        noun = pick(_SHAPES[shape])
        noun = noun if count == 1 else _PLURALS[noun]
        groups.append(f"{pick(_COUNTS[count])} {colour} {pick(_SIZES[size])} {noun}")
        start += count
    if len(groups) == 1:
        body = groups[0]
    elif len(groups) == 2:
        forward, converse = _RELATIONS[meta["relation"]]
        body = (f"{groups[0]} {pick(forward)} {groups[1]}" if rng.random() < 0.5
                else f"{groups[1]} {pick(converse)} {groups[0]}")
    else:
        body = f"{groups[0]} on the left, {groups[1]} in the middle and {groups[2]} on the right"
    return pick(_FRAMES).format(body=body, bg=pick(_BACKGROUNDS[meta["background"]]))


def _distinct_scenes(split: str, n: int, seed: int, size: int, caption: Callable[[str, Dict], str],
                     exclude: frozenset = frozenset()) -> Iterator[Tuple]:
    """Scenes of ``split`` in index order, one per distinct caption (and none in ``exclude``), until ``n``."""
    from prh_stitch.data.sources import scenes

    seen = set(exclude)
    count = 0
    for key, image, original, meta in scenes(1 << 30, seed=seed, size=size, split=split):
        text = caption(original, meta)
        if text in seen:
            continue
        seen.add(text)
        yield key, image, text, dict(meta, original_caption=original)
        count += 1
        if count == n:
            return


def _scene_series(kind: str, n_train: int, n_eval: int, seed: int, size: int) -> Dict[str, Callable]:
    caption = (lambda original, meta: original) if kind == "scenes" else (lambda original, meta: reword(meta, seed))
    train_captions: set = set()

    def train() -> Iterator[Tuple]:
        for sample in _distinct_scenes("train", n_train, seed, size, caption):
            train_captions.add(sample[2])
            yield sample

    def evaluation() -> Iterator[Tuple]:  # written after train, so the exclusion set is complete
        return _distinct_scenes("test", n_eval, seed, size, caption, frozenset(train_captions))

    return {"train": train, "eval": evaluation}


def _fashion_series(n_train: int, n_eval: int) -> Dict[str, Callable]:
    from prh_stitch.data.sources import fashion_mnist

    return {"train": lambda: fashion_mnist(split="train", limit=n_train),
            "eval": lambda: fashion_mnist(split="test", limit=n_eval)}


def ensure_translation_data(root: str | os.PathLike, kind: str, n_train: int, n_eval: int, seed: int = 0,
                            image_size: int = 224) -> Dict[str, object]:
    """``{"train": [urls], "eval": [urls], "folder": path}`` of the ``kind`` series, written first if missing."""
    if kind not in DATASETS:
        raise ValueError(f"unknown translation data {kind!r}; choose one of {', '.join(DATASETS)}")
    if n_train < 8 or n_eval < 2:
        raise ValueError(f"translation data needs n_train >= 8 and n_eval >= 2, got {n_train} and {n_eval}")
    root = Path(root).expanduser()
    if kind == "fashion_mnist":
        name, series = f"fashion-mnist-v{SERIES_VERSION}-{n_train}-{n_eval}", _fashion_series(n_train, n_eval)
    else:
        name = f"{kind.replace('_', '-')}-v{SERIES_VERSION}-{n_train}-{n_eval}-s{seed}-{image_size}px"
        series = _scene_series(kind, n_train, n_eval, seed, image_size)
    folder = root / name
    if not all(manifest_path(folder, prefix).is_file() for prefix in series):
        _write_folder(folder, series, kind, seed)
    return {"folder": str(folder), **{prefix: expand_urls(str(folder / f"{prefix}-*.tar")) for prefix in series}}


def _write_folder(folder: Path, series: Dict[str, Callable], kind: str, seed: int) -> None:
    if folder.exists():
        shutil.rmtree(folder)  # no manifest: an unfinished folder of an older run
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        for prefix, samples in series.items():  # dict order: train first (the eval series excludes its captions)
            write_shards(samples(), tmp, prefix=prefix, samples_per_shard=512, source=kind, seed=seed)
        try:
            os.rename(tmp, folder)
        except OSError:
            if not all(manifest_path(folder, prefix).is_file() for prefix in series):
                raise  # not a lost race with another process: a real failure
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
