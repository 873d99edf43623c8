"""The model card (``README.md``) of a stitcher folder, generated from its ``config.json`` alone.

A reader of the card should learn, without running anything: which two frozen encoders (and which layers,
pooling and weights) the stitcher connects, what data it was trained, selected and tested on, what it was trained
to do, and how well the selected checkpoint retrieves on the test split, next to the exact chance level.
"""

from __future__ import annotations

import json
from typing import Any, Dict, List, Optional

from huggingface_hub import ModelCardData

from prh_stitch.reports import fmt, markdown_table

SUBSET_NOTES = {"all": "every test pair", "seen": "captions that occur in the training split",
                "unseen": "captions the stitcher never saw in training"}


def model_card_text(config: Dict[str, Any]) -> str:
    """Markdown with a Hub metadata header; every number comes from ``config`` (nothing is recomputed)."""
    data = ModelCardData(library_name="prh_stitch", tags=["prh_stitch", "model-stitching",
                                                          "representation-alignment"])
    source, target = config["source"], config["target"]
    title = f"Stitcher: {source['name']} → {target['name']}"
    parts = [f"---\n{data.to_yaml()}\n---\n", f"# {title}\n",
             f"A trained `{config['stitcher']['name']}` stitcher that maps features of the frozen encoder "
             f"**{source['name']}** into the feature space of the frozen encoder **{target['name']}**, written by "
             f"prh_stitch {config.get('version') or ''} from the checkpoint `{config.get('checkpoint')}`.\n",
             "## Encoders\n", _encoders_table(config), "## Stitcher\n", _stitcher_section(config),
             "## Training data\n", _data_section(config.get("data") or {}), "## Objective\n",
             _objective_section(config), "## Test metrics\n", _test_section(config.get("test")), _usage(config)]
    return "\n".join(parts)


def _encoders_table(config: Dict[str, Any]) -> str:
    rows = []
    for side in ("source", "target"):
        spec = config[side]
        weights = spec.get("checkpoint") or ("pretrained" if spec.get("pretrained", True) else "random init")
        rows.append([side, f"`{spec['name']}`", f"{spec.get('layer')} (`{config.get(f'{side}_layer')}`)",
                     spec.get("pooling") or "the layer's natural pooling", weights,
                     f"`{config.get(f'{side}_fingerprint') or '–'}`"])
    return markdown_table(["side", "encoder", "layer (resolved)", "pooling", "weights", "fingerprint"], rows) + (
        "\nThe fingerprint is a digest of the encoder's weights, preprocessing, layer and pooling: features from an "
        "encoder with another fingerprint are not the features this stitcher was trained on.\n")


def _stitcher_section(config: Dict[str, Any]) -> str:
    stitcher = config["stitcher"]
    options = {k: v for k, v in stitcher.items() if k not in ("name", "in_dim", "out_dim", "input_norm", "output_norm")}
    return (f"`{stitcher['name']}` core, {stitcher['in_dim']}-d source features → {stitcher['out_dim']}-d target "
            f"features; input normalisation `{stitcher['input_norm']}`, output normalisation "
            f"`{stitcher['output_norm']}` (fitted on the training features, stored with the weights)"
            + (f"; options `{json.dumps(options, sort_keys=True)}`" if options else "") + ".\n")


def _data_section(data: Dict[str, Any]) -> str:
    rows = [[split, f"`{data[split]}`", role] for split, role in (
        ("train", "fits the stitcher"), ("val", "every choice (checkpoint selection, closed-form tuning)"),
        ("test", "reported once, on the selected checkpoint")) if data.get(split)]
    if not rows:
        return "Not recorded in the checkpoint.\n"
    return markdown_table(["split", "shards", "role"], rows) + (
        f"\nChoices were made on `{data.get('choices_made_on', 'val')}`.\n")


def _objective_section(config: Dict[str, Any]) -> str:
    objective = config.get("objective") or {}
    fit = config.get("fit") or {}
    text = f"Objective `{objective.get('name', '–')}`"
    if objective.get("options"):
        text += f" with options `{json.dumps(objective['options'], sort_keys=True)}`"
    method = fit.get("method", "gradient")
    text += (", trained by gradient descent (AdamW)" if method == "gradient" else
             f", fitted in closed form (`{method}`) on the training features")
    if fit.get("init"):
        text += f" from a closed-form (`{fit['init']}`) initialisation"
    return text + ".\n"


def _test_section(test: Optional[Dict[str, Any]]) -> str:
    if not test or not test.get("retrieval"):
        return "No test scores were recorded with this folder.\n"
    scores = test["retrieval"]
    rows: List[List[Any]] = []
    for name, subset in scores.get("subsets", {}).items():
        if not subset.get("n"):
            rows.append([name, SUBSET_NOTES.get(name, ""), 0, "–", "–", "–", "–"])
            continue
        rows.append([name, SUBSET_NOTES.get(name, ""), subset["n"], subset.get("distinct"),
                     fmt(subset.get("a2b/recall@1")), fmt(subset.get("chance@1")), fmt(subset.get("a2b/recall@5"))])
    selected = test.get("selected_by") or {}
    return (f"Caption retrieval on the **{test.get('split', 'test')}** split with the checkpoint selected by "
            f"`{selected.get('monitor')}` on `{selected.get('split', 'val')}`: a stitched source feature queries "
            "all target features; a hit is any item with the identical caption.\n\n"
            + markdown_table(["queries", "which", "n", "distinct captions", "recall@1", "chance@1", "recall@5"], rows)
            + f"\nMean rank {fmt(scores.get('a2b/mean_rank'), 2)}, target → source recall@1 "
              f"{fmt(scores.get('b2a/recall@1'))}, mean cosine {fmt(scores.get('mean_cosine'))}. Chance@1 is exact "
              "for a uniformly random ranking.\n")


def _usage(config: Dict[str, Any]) -> str:
    return ("## Use\n\n```python\nimport prh_stitch\nstitcher = prh_stitch.load_stitcher(\"<this folder or hub id>\")\n"
            "stitched = stitcher(source_features)  # source_features: "
            f"[N, {config['stitcher']['in_dim']}] from `{config['source']['name']}`\n```\n")
