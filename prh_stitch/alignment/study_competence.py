"""Competence the study reads or measures besides bits per byte: published tables, and the linear probe.

- **Published** (``scores: imagenet_top1`` / ``published`` / a mapping, plus ``extra_scores``): ``published`` is the
  built-in ImageNet table and every zoo entry's published score for models of the block's side (the zoo records the
  measure and its source; a side whose entries state different measures is an error, as one axis cannot mix them).
- **Linear probe** (``measure: linear_probe``, vision): Fashion-MNIST top-1 (%) of a closed-form ridge probe on the
  encoder's final pooled features (:mod:`prh_stitch.evaluation.linear_probe`; the regulariser is chosen on a
  validation part of the training images). Features come from the feature store: the training images at the last
  layer only; the test images with every layer, the same entry the study's own Fashion-MNIST dataset of those
  images uses, so they are extracted once for both. Results are cached in the score cache.
"""

from __future__ import annotations

from typing import Any, Dict, List, Tuple

from prh_stitch.errors import UserError


def published_table(block: Any, side: str) -> Tuple[Dict[str, float], Dict[str, str]]:
    """``({model: value}, {model: source})`` of a block's published numbers (empty for measured blocks)."""
    from prh_stitch.encoders import IMAGENET_TOP1

    values: Dict[str, float] = {}
    sources: Dict[str, str] = {}
    if block.scores in ("imagenet_top1", "published"):
        values.update(IMAGENET_TOP1 if side == "vision" else {})
        sources.update({name: "EfficientNet-Lite release (built-in table)" for name in values})
    if block.scores == "published":
        from prh_stitch.zoo.entries import ENTRIES

        modality = "image" if side == "vision" else "text"
        scored = [e for e in ENTRIES if e.modality == modality and e.score is not None]
        measures = {e.score.metric for e in scored} | ({"ImageNet-1k top-1 (%)"} if side == "vision" else set())
        if len(measures) > 1:
            raise UserError(f"competence scores 'published' for {side} models mix measures {sorted(measures)}; "
                            "give a mapping {model: value} of one measure instead")
        for e in scored:
            values[e.name] = float(e.score.value)
            sources[e.name] = f"{e.score.metric}: {e.score.source}"
    elif isinstance(block.scores, dict):
        values.update({k: float(v) for k, v in block.scores.items()})
        sources.update({k: block.source or "config" for k in block.scores})
    for name, value in (block.extra_scores or {}).items():
        values[name] = float(value)
        sources[name] = block.source or "config (extra_scores)"
    return values, sources


def probe_urls(block: Any, root) -> Tuple[List[str], List[str]]:
    """Shard URLs of the probe's Fashion-MNIST training and test images (written into the cache once)."""
    from prh_stitch.alignment.study import _fashion_mnist_shards
    from prh_stitch.alignment.study_config import DataBlock, FashionMnistData

    p = block.probe
    train = _fashion_mnist_shards(DataBlock(name="probe", fashion_mnist=FashionMnistData(p.n_train, "train")), root)
    test = _fashion_mnist_shards(DataBlock(name="probe", fashion_mnist=FashionMnistData(p.n_test, "test")), root)
    return train, test


def probe_competence(block: Any, models: List[Any], ex: Any, cache: Any) -> Tuple[Dict[str, float], List[str],
                                                                                 Dict[str, Any]]:
    """Linear-probe top-1 (%) per vision model label, notes for models left out, and each probe's details."""
    from prh_stitch.alignment.features import encoder_record, extraction_layers, layer_names, load_features
    from prh_stitch.encoders import encoder_from_spec
    from prh_stitch.evaluation.linear_probe import DEFAULT_GRID, linear_probe

    root = ex.store.root.parent  # the cache root: the store is its "features" folder
    train_urls, test_urls = probe_urls(block, root)
    values: Dict[str, float] = {}
    excluded: List[str] = []
    details: Dict[str, Any] = {}
    p = block.probe
    for m in models:
        encoder = encoder_from_spec(m.spec)
        deepest = extraction_layers(encoder, m.spec.pooling)[-1:]  # the deepest layer the pooling applies to
        train = load_features(ex, encoder, train_urls, m.spec.pooling, deepest)
        test = load_features(ex, encoder, test_urls, m.spec.pooling)  # every layer: shared with the study's dataset
        del encoder
        last = layer_names(train)[-1]
        if layer_names(test)[-1] != last:
            raise UserError(f"{m.label}: the probe's train and test features end in different layers ({last} vs "
                            f"{layer_names(test)[-1]})")
        key = cache.key({"linear_probe": 1, "train": encoder_record(train), "test": encoder_record(test),
                         "layer": last, "val_fraction": p.val_fraction, "seed": p.seed, "grid": list(DEFAULT_GRID)})
        hit = cache.get(key)
        if hit is None:
            if min(train.labels) < 0 or min(test.labels) < 0:
                excluded.append(f"{m.label}: the probe's shards carry no class labels")
                continue
            hit = linear_probe(train.features[last], train.labels, test.features[last], test.labels,
                               val_fraction=p.val_fraction, seed=p.seed)
            hit["layer"] = last
            cache.put(key, hit)
        values[m.label] = 100.0 * hit["top1"]
        details[m.label] = {k: hit[k] for k in ("top1", "ci", "g", "lambda", "n_fit", "n_val", "n_test", "layer",
                                                  "protocol", "chance")}
    return values, excluded, details
