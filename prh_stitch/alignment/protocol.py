"""Measurement protocols: prh_stitch's own (the default) and the paper's (``--protocol paper``, study ``protocol:``).

The two differ in five places; every report records which one produced it (``protocol`` in the JSON header and in
each record, a ``protocol`` column in the CSV, a line at the top of the markdown).

- **Outlier clamp.** prh_stitch: off, or with ``outlier_quantile`` q each layer clamped on its own at t = the exact
  ⌈q·n⌉-th smallest |x| of that layer. paper: q = 0.95 unless given, one threshold per model, the mean over
  samples of each sample's interpolated q quantile of |x| over all its layers (platonic-rep
  ``metrics.remove_outliers`` as ``measure_alignment.py`` calls it).
- **Normalisation.** prh_stitch: rows L2-normalised inside each metric. paper: rows L2-normalised after the clamp,
  per layer (the metrics then see unit rows).
- **Layers.** prh_stitch: every layer the encoder exposes (text: ``embeddings`` and every hidden state; vision:
  blocks and ``pre_logits``). paper: vision block outputs only (``pre_logits``, the head's own pooling, is dropped);
  text every hidden state, embedding output included.
- **Pooling.** prh_stitch: the spec's (``null`` = the encoder's natural one). paper: vision the natural one (the
  class token of a ViT), text the mean over real tokens; other poolings are an error.
- **Bits per byte.** prh_stitch: ``pooled``, total nats / total bytes, every text after a start token (all its
  tokens scored). paper: ``per_caption``, each caption's nats / its bytes averaged over captions, tokens as the
  tokenizer encodes the caption, the first one not scored.

Numbers under the two protocols differ slightly; compare numbers only within one protocol.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Dict, List, Sequence

import torch
import torch.nn.functional as F

from prh_stitch.errors import UserError

PROTOCOLS = ("prh_stitch", "paper")
PAPER_QUANTILE = 0.95
HEAD_LAYER = "pre_logits"  # the timm/torchvision encoders' head pooling (see prh_stitch.encoders)

BITS_PER_BYTE_DEFINITION = {"prh_stitch": "pooled", "paper": "per_caption"}

_DESCRIPTIONS = {
    "prh_stitch": ("prh_stitch's own protocol: every layer the encoder exposes; outlier clamp off or per layer "
                   "(exact quantile); rows L2-normalised inside each metric; bits per byte pooled over all captions "
                   "(total nats / total bytes, start token prepended)"),
    "paper": ("the paper's protocol (Huh et al. 2024, as its code computes it): vision block outputs (no "
              "pre_logits) and every text hidden state mean-pooled; one outlier threshold per model = mean over "
              "samples of each sample's {q:g} quantile of |x| over all its layers; rows L2-normalised after the clamp; "
              "bits per byte averaged per caption, first token not scored"),
}


def check_protocol(name: object) -> str:
    if name not in PROTOCOLS:
        raise UserError(f"--protocol {name!r}: use prh_stitch (the default, this project's protocol) or paper "
                        "(the paper's clamp, layers, normalisation and bits per byte)")
    return str(name)


def describe(settings: Any) -> Dict[str, Any]:
    """The ``protocol`` block of a report's header: its name, what it does, and its bits-per-byte definition."""
    name = settings.protocol
    q = settings.outlier_quantile if settings.outlier_quantile is not None else PAPER_QUANTILE
    return {"name": name, "description": _DESCRIPTIONS[name].format(q=q),
            "bits_per_byte": BITS_PER_BYTE_DEFINITION[name]}


def check_poolings(models: Sequence[Any], protocol: str) -> None:
    """The paper pools text by the mean over real tokens and ViT blocks by the class token (the natural pooling)."""
    if protocol != "paper":
        return
    for m in models:
        pooling = m.spec.pooling
        if m.modality == "text" and pooling not in (None, "mean"):
            raise UserError(f"--protocol paper mean-pools text hidden states; {m.label} asks for pooling {pooling!r} "
                            "(give pooling mean or leave it unset)")
        if m.modality == "vision" and pooling is not None:
            raise UserError(f"--protocol paper pools image blocks the natural way (class token of a ViT); "
                            f"{m.label} asks for pooling {pooling!r} (leave it unset)")


def paper_layer_names(names: Sequence[str], modality: str) -> List[str]:
    """The paper's layer set: vision drops the head pooling (``pre_logits``); text keeps every hidden state."""
    return [n for n in names if not (modality == "vision" and n == HEAD_LAYER)]


def paper_features(feature_set: Any, modality: str, quantile: float, label: str) -> Any:
    """A copy of ``feature_set`` transformed as the paper's code does: its layers, its clamp, then L2 rows.

    The threshold is computed over this model's own samples (the paper computes it per feature file). The copy's
    ``info["transform"]`` names the transform, so the score cache keeps its scores apart from untransformed ones.
    """
    from prh_stitch.alignment.features import layer_names
    from prh_stitch.metrics.outliers import clamp_outliers_paper

    names = paper_layer_names(layer_names(feature_set), modality)
    if not names:
        raise UserError(f"{label}: --protocol paper keeps no layer of this encoder (only {HEAD_LAYER})")
    try:
        clamped = clamp_outliers_paper([feature_set.features[n] for n in names], quantile, label)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    features = {n: F.normalize(x, p=2, dim=-1) for n, x in zip(names, clamped)}
    info = dict(feature_set.info or {}, layers=names,
                transform=f"paper: layers {names[0]}..{names[-1]}, clamp q={quantile:g} (mean of per-sample "
                          "quantiles over all layers), L2 rows")
    return replace(feature_set, features=features, info=info)


def for_scoring(feature_sets: Dict[str, Any], models: Sequence[Any], settings: Any):
    """The feature sets and settings that ``score_pair`` sees under ``settings.protocol``.

    Under ``paper`` the clamp is done here, once per model over all its layers, so the settings passed on carry no
    per-layer quantile (score_pair would otherwise clamp a second time).
    """
    if settings.protocol != "paper":
        return feature_sets, settings
    modality = {m.label: m.modality for m in models}
    q = settings.outlier_quantile if settings.outlier_quantile is not None else PAPER_QUANTILE
    with torch.no_grad():
        transformed = {label: paper_features(fs, modality[label], q, label) for label, fs in feature_sets.items()}
    return transformed, replace(settings, outlier_quantile=None)
