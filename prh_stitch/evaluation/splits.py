"""Which split ``evaluate.py stitch`` reads, which split every choice behind the mapping was made on, and the
training captions that tell seen from unseen.

A checkpoint of ``train.py`` records its three shard patterns (``prh_stitch.data`` in its metadata): without
``--data`` the report reads the checkpoint's ``test`` split (``--split val`` reads val, labelled as the split the
choices were made on). A baseline is fitted on ``--anchors`` and makes no other choice; evaluating it on its own
anchors is refused, as is a checkpoint on its own training split: no report scores data a choice was made on
without saying so, and none scores the data it was fitted to.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from prh_stitch.errors import UserError

SPLIT_NAMES = ("test", "val")


@dataclass
class EvaluatedSplit:
    """The evaluated data and the provenance of every choice behind the mapping."""

    name: str  # test | val | custom (a --data pattern that is none of the recorded splits)
    pattern: str
    source: str  # "checkpoint" (its recorded split) or "--data"
    train_pattern: Optional[str]  # whose captions count as seen; None: unknown
    choices: List[Dict[str, str]] = field(default_factory=list)
    warning: Optional[str] = None

    def record(self) -> Dict[str, Any]:
        out = {"name": self.name, "pattern": self.pattern, "from": self.source, "train": self.train_pattern,
               "choices": self.choices}
        if self.warning:
            out["warning"] = self.warning
        return out


def _urls(pattern: Optional[str]) -> Optional[List[str]]:
    from prh_stitch.data.shards import expand_urls

    return None if pattern is None else sorted(expand_urls(pattern))


def checkpoint_choices(meta: Dict[str, Any]) -> List[Dict[str, str]]:
    """What was chosen on which split, as the checkpoint records it."""
    recorded = meta.get("data") or {}
    on = recorded.get("choices_made_on", "unknown (the checkpoint predates split records)")
    choices = [{"choice": "checkpoint selection (checkpoint.monitor)", "split": on}]
    closed_form = (meta.get("fit") or {}).get("closed_form")
    if closed_form:
        choices.append({"choice": "closed-form ridge strength / whitening / gain", "split": on})
    choices.append({"choice": "stitcher weights (fit)", "split": "train"})
    return choices


def resolve_split(data: Optional[str], split: str, ckpt_meta: Optional[Dict[str, Any]], anchors: Optional[str],
                  train_data: Optional[str]) -> EvaluatedSplit:
    """The split to evaluate: ``data`` when given (named after the recorded split it equals), else the
    checkpoint's recorded ``split``."""
    if split not in SPLIT_NAMES:
        raise UserError(f"--split {split!r}: choose one of {', '.join(SPLIT_NAMES)}")
    recorded = dict((ckpt_meta or {}).get("data") or {})
    if ckpt_meta is not None:
        choices = checkpoint_choices(ckpt_meta)
        train = train_data or recorded.get("train")
    else:
        choices = [{"choice": "baseline fit (anchor pairs)", "split": f"anchors: {anchors}"}]
        train = train_data or anchors
    if data is None:
        if recorded.get(split) is None:
            raise UserError(f"the checkpoint records no {split!r} split (trained before splits were recorded, or "
                            "not by train.py): pass the held-out pairs with --data PATTERN"
                            if ckpt_meta is not None else "--baseline needs --data PATTERN (the held-out pairs)")
        name, pattern, source = split, recorded[split], "checkpoint"
    else:
        urls = _urls(data)  # a baseline's anchors overlapping the data are refused where the anchors are read
        if recorded.get("train") is not None and urls == _urls(recorded["train"]):
            raise UserError("--data is the checkpoint's training split: pass its test split (or drop --data to read "
                            "it from the checkpoint)")
        matches = [s for s in SPLIT_NAMES if recorded.get(s) is not None and urls == _urls(recorded[s])]
        name = matches[0] if matches else (split if not recorded else "custom")
        pattern, source = data, "--data"
    warning = None
    if any(c["split"] == name for c in choices):
        made = ", ".join(c["choice"] for c in choices if c["split"] == name)
        warning = f"choices were made on the {name} split ({made}): these numbers are not held-out; report test"
    return EvaluatedSplit(name, pattern, source, train, choices, warning)


_SCENES_FOLDER = re.compile(r"scenes-v(?P<version>\d+)-(?P<counts>[a-z0-9-]+?)-s(?P<seed>\d+)-(?P<size>\d+)px")


def local_scene_pattern(pattern: Optional[str], cache_root: Path) -> Optional[str]:
    """A recorded split of the built-in scenes, made on another machine (its cache elsewhere), as this machine's.

    A checkpoint records absolute shard paths. The scenes are generated, seeded and named by their parameters
    (``scenes-v{version}-{counts}-s{seed}-{size}px``, see ``ensure_scene_splits``), so a recorded scenes split
    that is missing here is regenerated under ``cache_root`` and its local pattern returned: the same images and
    captions when the scene generator's version matches. Any other pattern (shards of your own, existing
    scenes, another generator version) comes back unchanged, and a missing one fails where it is read.
    """
    from prh_stitch.data.scenes import SCENES_VERSION
    from prh_stitch.data.shards import ensure_scene_splits, expand_urls
    from prh_stitch.data.sources import SCENE_SPLITS

    if not pattern or "://" in pattern or pattern.startswith("pipe:"):
        return pattern
    try:
        expand_urls(pattern)
        return pattern
    except ValueError:
        pass
    path = Path(pattern)
    match = _SCENES_FOLDER.fullmatch(path.parent.name)
    split = path.name.split("-")[0]
    if match is None or int(match["version"]) != SCENES_VERSION or split not in SCENE_SPLITS:
        return pattern
    parts = match["counts"].split("-")
    if all(p.isdigit() for p in parts):  # train-val(-test), counts only
        counts = dict(zip(("train", "val", "test"), map(int, parts)))
    else:  # each count tagged with its split, e.g. train256-test256
        tagged = [re.fullmatch(r"([a-z]+)(\d+)", p) for p in parts]
        if not all(tagged):
            return pattern
        counts = {m[1]: int(m[2]) for m in tagged}
    if len(parts) != len(counts) or split not in counts or not set(counts) <= set(SCENE_SPLITS):
        return pattern
    local = ensure_scene_splits(Path(cache_root) / "scenes", counts, seed=int(match["seed"]), size=int(match["size"]))
    return local[split]


def local_split_record(recorded: Dict[str, Any], cache_root: Path) -> Dict[str, Any]:
    """A checkpoint's split record with each scenes split made available here (see ``local_scene_pattern``)."""
    return {k: local_scene_pattern(v, cache_root) if k in ("train", "val", "test") and isinstance(v, str) else v
            for k, v in recorded.items()}


def train_captions(split: EvaluatedSplit) -> Optional[frozenset]:
    """The training captions (None when the training split is unknown: seen/unseen is then not reported)."""
    from prh_stitch.data.datamodule import shard_captions
    from prh_stitch.data.shards import expand_urls

    if split.train_pattern is None:
        return None
    return frozenset(shard_captions(expand_urls(split.train_pattern)))


def split_lines(record: Dict[str, Any]) -> Sequence[str]:
    """Markdown lines naming the evaluated split and where each choice was made."""
    lines = [f"Evaluated split: **{record['name']}** ({record['pattern']}, from {record['from']}); seen captions: "
             f"those in {record['train'] or 'an unknown training split (seen/unseen not reported)'}."]
    lines += [f"- {c['choice']}: made on {c['split']}" for c in record["choices"]]
    if record.get("warning"):
        lines.append(f"\n**Warning:** {record['warning']}.")
    return lines
