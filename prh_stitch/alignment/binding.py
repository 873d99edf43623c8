"""A binding test that bag-of-words cannot pass: does the image pick its own caption over the attribute-swapped one?

On templated captions, mutual-kNN alignment rewards any text representation that separates captions by their
words: a randomly initialised text encoder gets most of a trained one's score. Here every test scene with two or
more groups also has a hard-negative caption (``prh_stitch.data.scenes.binding_swap``): the same multiset of
words with the attributes exchanged between two objects, so a different scene. A bag of words gives both captions
the same features, and the choice between them is a coin flip (chance 0.5).

Protocol (one vision x text pair):

* features: the final layer of each encoder (the vision model's pooled output, the text model's last hidden
  state under the study's pooling), from the feature store for the train / val / test splits of the built-in
  scenes; the two candidate captions of each test scene are encoded directly, in the same batches, by the text
  encoder (they are few);
* stitcher: the closed-form ridge stitcher (``affine``, standardised input, :func:`prh_stitch.closed_form.
  fit_closed_form`) fitted on the training split's pairs, its ridge strength, whitening and gain chosen on the
  validation split by caption-retrieval recall@1; the test split is used only here;
* choice: a test scene scores 1 when its stitched image features are nearer (cosine) to the true caption's text
  features than to the swapped caption's, 0 when farther, 1/2 when the two cosines agree to within
  ``TIE_TOLERANCE`` (the text side gave both captions the same features: a bag of words always does);
* accuracy: the mean score, with a Wilson score 95 % interval (ties at 1/2 make it conservative) and the exact
  two-sided sign test of wins against losses (ties dropped) for "no better than chance".
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from prh_stitch.closed_form import fit_closed_form
from prh_stitch.metrics.proportions import wilson_interval
from prh_stitch.stitchers import Stitcher

CHANCE = 0.5
# Cosine differences this small are round-off: a word-averaging encoder gives the two captions (the same words in
# another order) features that differ only in the order of a float32 sum, ~1e-8 relative.
TIE_TOLERANCE = 1e-6
STITCHER = {"name": "affine", "input_norm": "standard", "output_norm": "none"}
PROTOCOL = ("closed-form ridge stitcher (affine, standardised input) fitted on the train split; ridge strength, "
            "whitening and gain chosen on the val split (caption-retrieval recall@1); each test scene with a "
            "swapped caption counts 1 when the stitched image is nearer (cosine) to its true caption's text "
            "features than to the swapped one's, 0 when farther, 1/2 on a tie; final layer of every encoder")
INTERVAL = ("Wilson score 95% interval of the accuracy over test scenes (ties count 1/2, which makes it "
            "conservative); p: exact two-sided sign test of wins vs losses (ties dropped), chance 0.5")


# ---- statistics ---------------------------------------------------------------------------------------


def sign_test(wins: int, losses: int) -> float:
    """Exact two-sided p-value of ``wins`` against ``losses`` under a fair coin (1.0 when there is no trial)."""
    n = wins + losses
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(wins, losses) + 1))  # exact integers: no underflow at large n
    return min(1.0, 2 * tail / 2 ** n)


def choice_scores(predicted: Tensor, true_text: Tensor, swapped_text: Tensor) -> Tensor:
    """Per row: 1 when ``predicted`` is nearer (cosine) to ``true_text`` than to ``swapped_text``, 0 when farther,
    1/2 on a tie (the two cosines within ``TIE_TOLERANCE``)."""
    if not (predicted.shape == true_text.shape == swapped_text.shape) or predicted.ndim != 2:
        raise ValueError(f"predicted, true and swapped text features must be N x D of one shape, got "
                         f"{tuple(predicted.shape)}, {tuple(true_text.shape)} and {tuple(swapped_text.shape)}")
    unit = lambda t: torch.nn.functional.normalize(t.double(), dim=1)  # noqa: E731
    p = unit(predicted)
    margin = (p * unit(true_text)).sum(1) - (p * unit(swapped_text)).sum(1)
    return torch.where(margin.abs() <= TIE_TOLERANCE, 0.5, (margin > 0).double())


def summarise(scores: Tensor) -> Dict[str, Any]:
    """Accuracy, wins / losses / ties, the Wilson interval and the sign test of per-scene choice scores."""
    n = int(scores.numel())
    wins, losses = int((scores == 1).sum()), int((scores == 0).sum())
    accuracy = float(scores.double().mean()) if n else None
    low, high = wilson_interval(accuracy, n) if n else (None, None)
    return {"n": n, "accuracy": accuracy, "ci_low": low, "ci_high": high, "wins": wins, "losses": losses,
            "ties": n - wins - losses, "p_chance": sign_test(wins, losses), "chance": CHANCE}


# ---- one vision x text pair ------------------------------------------------------------------------------

def fit_stitcher(train: Tuple[Tensor, Tensor], val: Tuple[Tensor, Tensor], val_captions: Sequence[str]
                 ) -> Tuple[Stitcher, Dict[str, Any]]:
    """The closed-form ridge stitcher from image to text features: fitted on ``train``, tuned on ``val``."""
    from prh_stitch.data.datamodule import caption_groups

    x, y = (t.float() for t in train)
    stitcher = Stitcher(STITCHER["name"], x.shape[1], y.shape[1], STITCHER["input_norm"], STITCHER["output_norm"])
    stitcher.fit_normalization(x, y)
    result = fit_closed_form(stitcher, (x, y), "ridge", val=(val[0].float(), val[1].float()),
                             val_groups=caption_groups(list(val_captions)))
    return stitcher.eval(), result.as_dict()


def binding_accuracy(train: Tuple[Tensor, Tensor], val: Tuple[Tensor, Tensor], val_captions: Sequence[str],
                     test_images: Tensor, true_text: Tensor, swapped_text: Tensor,
                     attributes: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Image -> caption choice accuracy between each test scene's true and swapped caption (row i of
    ``test_images``, ``true_text`` and ``swapped_text`` is one scene), overall and per swapped attribute."""
    stitcher, fit = fit_stitcher(train, val, val_captions)
    with torch.no_grad():
        predicted = stitcher(test_images.float())
    scores = choice_scores(predicted, true_text, swapped_text)
    out = summarise(scores)
    if attributes is not None:
        if len(attributes) != len(scores):
            raise ValueError(f"one swapped attribute per test scene is needed: {len(attributes)} for {len(scores)}")
        out["by_attribute"] = {a: summarise(scores[[i for i, b in enumerate(attributes) if b == a]])
                               for a in sorted(set(attributes))}
    out["fit"] = {k: fit[k] for k in ("ridge", "gain", "whiten", "n_train", "select_by")}
    out["n_val"] = int(len(val[0]))
    return out


# ---- the study's binding table --------------------------------------------------------------------------

def swap_choices(test_urls: Sequence[str]) -> Dict[str, Dict[str, str]]:
    """``{key: {"true", "swapped", "attribute"}}`` of every test scene that has a swapped caption, from the
    shards' own captions and meta (the scene generator's structured attributes)."""
    import json

    from prh_stitch.data.scenes import binding_swap
    from prh_stitch.data.stream import PROBLEM, read_shard

    choices: Dict[str, Dict[str, str]] = {}
    for url in test_urls:
        for raw in read_shard(url):
            if PROBLEM in raw or "json" not in raw or "txt" not in raw:
                continue
            swap = binding_swap(json.loads(raw["json"]))
            if swap is not None:
                choices[raw["__key__"]] = {"true": raw["txt"].decode("utf-8").strip(), "swapped": swap.caption,
                                           "attribute": swap.attribute}
    return dict(sorted(choices.items()))


def encode_captions(encoder, captions: Sequence[str], pooling: Optional[str], device, batch_size: int = 64) -> Tensor:
    """Final-layer features of ``captions`` (in order), encoded directly by ``encoder`` on ``device``."""
    encoder.to(device)
    try:
        rows = []
        for start in range(0, len(captions), batch_size):
            batch = encoder.collate([encoder.transform(c) for c in captions[start:start + batch_size]])
            rows.append(encoder.encode(batch, [encoder.num_layers - 1], pooling)[0].float().cpu())
    finally:
        encoder.to("cpu")
    return torch.cat(rows) if rows else torch.zeros(0, 0)


def split_rows(feature_set, keys: Optional[Sequence[str]] = None) -> Tuple[List[str], Tensor]:
    """Keys and final-layer rows of a feature set (only ``keys``, in that order, when given)."""
    from prh_stitch.alignment.features import layer_names

    x = feature_set.features[layer_names(feature_set)[-1]]
    if keys is None:
        return list(feature_set.keys), x
    position = {k: i for i, k in enumerate(feature_set.keys)}
    missing = [k for k in keys if k not in position]
    if missing:
        raise ValueError(f"{len(missing)} test scene(s) with a swapped caption lack features, e.g. {missing[0]!r}")
    return list(keys), x[torch.tensor([position[k] for k in keys])]
