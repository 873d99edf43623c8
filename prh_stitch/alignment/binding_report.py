"""The study's binding table: :mod:`~prh_stitch.alignment.binding` for every vision x text pair of a scenes dataset.

Called by the study for each built-in scenes dataset when its config has a ``binding:`` section. Writes
``binding.json`` (everything), ``binding.csv`` (one row per pair), ``binding.md`` (the accuracy matrix with
intervals) and ``binding.png``/``.pdf`` into the dataset's report folder. Features come from the feature store
(train / val / test of the built-in scenes: the default training run's series), every pair's result from the
score cache, so a rerun reads both back and encodes nothing.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any, Dict, List, Sequence

from prh_stitch import reports
from prh_stitch.alignment import binding as bt
from prh_stitch.figure_cache import Drawing

SPLITS = ("train", "val", "test")
FIELDS = ("vision", "text", "n", "accuracy", "ci_low", "ci_high", "wins", "losses", "ties", "p_chance",
          "accuracy_colour", "n_colour", "accuracy_size", "n_size", "accuracy_shape", "n_shape",
          "vision_layer", "text_layer", "ridge", "gain", "whiten", "n_train", "n_val")


def scene_split_urls(block, scenes, root: Path) -> Dict[str, List[str]]:
    """Shard URLs of the built-in scenes' train / val / test series (written into the cache once) of a binding
    block (``BindingBlock``) on a scenes dataset (``ScenesData``: seed, image size and the default counts)."""
    from prh_stitch.data.shards import ensure_scene_splits, expand_urls

    counts = {"train": block.n_train or scenes.n_train, "val": block.n_val or scenes.n, "test": block.n_test}
    # All three splits always: the folder's name lists the counts, so a folder of other splits is never confused
    # with this one.
    patterns = ensure_scene_splits(root / "scenes", counts, seed=scenes.seed, size=scenes.image_size)
    return {split: expand_urls(patterns[split]) for split in SPLITS}


def binding_table(block, scenes, models: Sequence[Any], ex, cache, root: Path, out: Path) -> Dict[str, Any]:
    """Every vision x text pair's choice accuracy on the scenes of a binding block (see :func:`scene_split_urls`);
    reports written under ``out``."""
    from prh_stitch.alignment.features import encoder_record, layer_names, load_features
    from prh_stitch.encoders import encoder_from_spec

    started = time.perf_counter()
    urls = scene_split_urls(block, scenes, root)
    n_test = block.n_test
    choices = bt.swap_choices(urls["test"])
    if not choices:
        raise ValueError(f"none of the {n_test} test scenes has two or more objects: no swapped caption to test")
    keys = list(choices)
    digest = hashlib.sha256(json.dumps(choices, sort_keys=True).encode()).hexdigest()[:20]
    vision = [m for m in models if m.modality == "vision"]
    text = [m for m in models if m.modality == "text"]
    sets: Dict[str, Dict[str, Any]] = {}
    rows: List[Dict[str, Any]] = []
    for model in vision + text:
        encoder = encoder_from_spec(model.spec)
        last = [encoder.num_layers - 1]
        splits = SPLITS if model.modality == "vision" else ("train", "val")  # test captions are encoded below
        sets[model.label] = {s: load_features(ex, encoder, urls[s], model.spec.pooling, layers=last) for s in splits}
        if model.modality == "text":
            candidates = None
            for v in vision:
                key = cache.key({"binding": 1, "choices": digest, "stitcher": bt.STITCHER, "tie": bt.TIE_TOLERANCE,
                                 **{side: {s: encoder_record(f) for s, f in sets[label].items()}
                                    for side, label in (("vision", v.label), ("text", model.label))}})
                result = cache.get(key)
                if result is None:
                    if candidates is None:  # encoded once per text model, only when some pair is not cached
                        candidates = [bt.encode_captions(encoder, [choices[k][side] for k in keys],
                                                         model.spec.pooling, ex.device) for side in ("true", "swapped")]
                    result = _pair(sets[v.label], sets[model.label], keys, choices, candidates)
                    cache.put(key, result)
                rows.append(_row(v.label, model.label, result, layer_names(sets[v.label]["test"])[-1],
                                 layer_names(sets[model.label]["train"])[-1]))
        del encoder
    summary = {"split": f"test ({n_test} scenes; {len(keys)} with a swapped caption), stitcher fitted on train "
                        f"({len(urls_rows(sets, 'train'))}), chosen on val ({len(urls_rows(sets, 'val'))})",
               "protocol": bt.PROTOCOL, "interval_method": bt.INTERVAL, "chance": bt.CHANCE, "layers": "final",
               "swapped_attributes": _counts(choices), "examples": [choices[k] for k in keys[:3]], "rows": rows,
               "seconds": round(time.perf_counter() - started, 2)}
    write_binding(out, summary, [m.label for m in vision], [m.label for m in text])
    return summary


def urls_rows(sets: Dict[str, Dict[str, Any]], split: str) -> List[str]:
    """The keys of a split's features (every model's are the same scenes)."""
    return next(iter(sets.values()))[split].keys if sets else []


def _pair(vision_sets, text_sets, keys, choices, candidates) -> Dict[str, Any]:
    from prh_stitch.data.features import align_by_key

    def paired(split):
        iv, it = align_by_key(vision_sets[split], text_sets[split])
        (_, x), (_, y) = bt.split_rows(vision_sets[split]), bt.split_rows(text_sets[split])
        return (x[iv], y[it]), [text_sets[split].captions[i] for i in it.tolist()]

    (train, _), (val, val_captions) = paired("train"), paired("val")
    _, test_images = bt.split_rows(vision_sets["test"], keys)
    return bt.binding_accuracy(train, val, val_captions, test_images, candidates[0], candidates[1],
                               [choices[k]["attribute"] for k in keys])


def _row(vision: str, text: str, result: Dict[str, Any], vision_layer: str, text_layer: str) -> Dict[str, Any]:
    row = {"vision": vision, "text": text, **{k: result[k] for k in ("n", "accuracy", "ci_low", "ci_high", "wins",
                                                                    "losses", "ties", "p_chance")},
           **{k: result["fit"][k] for k in ("ridge", "gain", "whiten", "n_train")}, "n_val": result["n_val"],
           "vision_layer": vision_layer, "text_layer": text_layer}
    for attribute, sub in result.get("by_attribute", {}).items():
        row[f"accuracy_{attribute}"], row[f"n_{attribute}"] = sub["accuracy"], sub["n"]
    return row


def _counts(choices: Dict[str, Dict[str, str]]) -> Dict[str, int]:
    out: Dict[str, int] = {}
    for choice in choices.values():
        out[choice["attribute"]] = out.get(choice["attribute"], 0) + 1
    return dict(sorted(out.items()))


def binding_markdown(summary: Dict[str, Any], vision: Sequence[str], text: Sequence[str]) -> str:
    """The accuracy matrix (vision rows, text columns) with intervals, then how it was measured."""
    cell = {(r["vision"], r["text"]): r for r in summary["rows"]}

    def show(r):
        return f"{r['accuracy']:.3f} {reports.interval(r['ci_low'], r['ci_high'])}" + (" (ties)" if r["ties"] else "")

    lines = ["# Binding test: true vs attribute-swapped caption", "",
             f"Image -> caption choice accuracy (chance {summary['chance']}); split: {summary['split']}.", "",
             reports.markdown_table(["vision \\ text", *text],
                                    [[v, *(show(cell[v, t]) for t in text)] for v in vision]),
             f"Protocol: {summary['protocol']}.", "", f"Interval: {summary['interval_method']}.", "",
             f"Swapped attribute per test scene: {summary['swapped_attributes']}; e.g. "
             + "; ".join(f"\"{e['true']}\" vs \"{e['swapped']}\"" for e in summary["examples"][:2]) + ".", "",
             "(ties): some scenes' two captions got the same text features (to round-off); each counts 1/2.", ""]
    return "\n".join(lines)


def write_binding(out: Path, summary: Dict[str, Any], vision: Sequence[str], text: Sequence[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    reports.write_csv(out / "binding.csv", summary["rows"], FIELDS)
    reports.write_text(out / "binding.md", binding_markdown(summary, vision, text))
    drawing = Drawing(_figure, (summary["rows"], summary["chance"], list(vision), list(text)))
    summary["figure"] = reports.save_figure(drawing, out / "binding.png").name
    reports.write_json(out / "binding.json", summary)


def _figure(rows: Sequence[Dict[str, Any]], chance: float, vision: Sequence[str], text: Sequence[str]):
    fig, ax = reports.new_figure((max(6.0, 1.3 * len(text) + 2), 4.2))
    cell = {(r["vision"], r["text"]): r for r in rows}
    width = 0.8 / max(1, len(vision))
    for i, v in enumerate(vision):
        xs = [t_i - 0.4 + width * (i + 0.5) for t_i in range(len(text))]
        acc = [cell[v, t]["accuracy"] for t in text]
        err = [[a - cell[v, t]["ci_low"] for a, t in zip(acc, text)],
               [cell[v, t]["ci_high"] - a for a, t in zip(acc, text)]]
        ax.errorbar(xs, acc, yerr=err, fmt="o", capsize=2, label=v)
    ax.axhline(chance, color="gray", linestyle="--", linewidth=1, label="chance")
    ax.set_xticks(range(len(text)), text, rotation=20, ha="right")
    ax.set_ylabel("true-vs-swapped caption accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_title("Binding test (final layers, ridge stitcher fitted on train), 95% Wilson intervals", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    return fig
