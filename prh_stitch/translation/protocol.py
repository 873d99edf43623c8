"""The translation protocol: unpaired halves in, held-out retrieval out, with the supervised bound and chance.

Protocol (every report states it):

1. Features of both encoders on the train series and on the evaluation series (the feature store).
2. The train rows are split (seeded) into two disjoint halves. The unsupervised fit gets **source features of
   half A and target features of half B** (the B side additionally in a random order): no item is seen by both
   encoders, and nothing pairs them.
3. Held-out evaluation on ``n`` pairs of the evaluation series (a seeded subset), which no fit ever sees: each
   translated source row queries all ``n`` target rows by cosine; top-1 / top-5 accuracy and mean / median rank
   of the true counterpart, both directions, and the mean cosine of true pairs (next to the mean cosine of all
   pairs, its chance level).
4. References on the same evaluation pairs: the supervised ridge stitcher (fitted on half A's *pairs*, its
   strength, gain and whitening chosen on half B's pairs: the upper bound), the paired orthogonal Procrustes map in
   the unsupervised method's own frames (the best its function class can do), and chance (top-1 = 1/n, mean rank
   (n + 1)/2).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import torch
from torch import Tensor

from prh_stitch.closed_form import fit_closed_form
from prh_stitch.closed_form.unsupervised import (UnsupervisedMap, UnsupervisedOptions, fit_unsupervised_stitcher,
                                                 procrustes, unpaired_halves)
from prh_stitch.stitchers import Stitcher


@dataclass
class SideFeatures:
    """One encoder's features on the train and evaluation series (rows aligned across the two encoders)."""

    train: Tensor
    eval: Tensor


@dataclass
class TranslationOutcome:
    """Scores per method and the fitted unsupervised stitcher."""

    scores: Dict[str, Dict[str, float]]
    stitcher: Stitcher
    info: Dict[str, Any] = field(default_factory=dict)


def retrieval_scores(pred: Tensor, target: Tensor) -> Dict[str, float]:
    """Top-1/5 and mean/median rank both ways, mean cosine of true pairs and of all pairs (its chance level)."""
    from prh_stitch.metrics.retrieval import retrieval

    scores = retrieval(pred.float(), target.float(), ks=(1, 5))
    a = torch.nn.functional.normalize(pred.double(), dim=1)
    b = torch.nn.functional.normalize(target.double(), dim=1)
    scores["mean_cosine_all_pairs"] = float((a @ b.T).mean())
    return scores


def chance_scores(n: int) -> Dict[str, float]:
    """Exact chance of a uniformly random ranking of ``n`` candidates with one correct item."""
    top5 = min(5, n) / n
    return {"a2b/recall@1": 1.0 / n, "a2b/recall@5": top5, "b2a/recall@1": 1.0 / n, "b2a/recall@5": top5,
            "a2b/mean_rank": (n + 1) / 2, "b2a/mean_rank": (n + 1) / 2, "a2b/median_rank": (n + 1) / 2,
            "b2a/median_rank": (n + 1) / 2}


def evaluation_rows(available: int, n: Optional[int], seed: int) -> Tensor:
    """``n`` of the ``available`` evaluation rows (seeded, in row order); all of them when ``n`` is None."""
    if n is None or n == available:
        return torch.arange(available)
    if n < 2 or n > available:
        raise ValueError(f"n = {n} evaluation pairs asked, but the evaluation series holds {available}; choose "
                         f"2 <= n <= {available} or raise n_eval")
    return torch.randperm(available, generator=torch.Generator().manual_seed(seed + 1))[:n].sort().values


def run_protocol(source: SideFeatures, target: SideFeatures, n: Optional[int] = 1024, seed: int = 0,
                 options: Optional[UnsupervisedOptions] = None) -> TranslationOutcome:
    """Fit the unsupervised map on unpaired halves, the references on pairs, and score all on held-out pairs."""
    if len(source.train) != len(target.train) or len(source.eval) != len(target.eval):
        raise ValueError("source and target features must have the same rows (the same series, aligned by key)")
    options = options or UnsupervisedOptions(seed=seed)
    half_a, half_b = unpaired_halves(len(source.train), seed)
    # The target half in a random order: the fit is given two unrelated sets, and this makes that visible.
    shuffled_b = half_b[torch.randperm(len(half_b), generator=torch.Generator().manual_seed(seed + 2))]
    rows = evaluation_rows(len(source.eval), n, seed)
    eval_x, eval_y = source.eval[rows].float(), target.eval[rows].float()

    unsup = Stitcher("affine", source.train.shape[1], target.train.shape[1])
    fitted = fit_unsupervised_stitcher(unsup, source.train[half_a], target.train[shuffled_b], options)
    with torch.no_grad():
        scores = {"unsupervised": retrieval_scores(unsup(eval_x), eval_y)}

    x_a, y_a = source.train[half_a].float(), target.train[half_a].float()
    x_b, y_b = source.train[half_b].float(), target.train[half_b].float()
    ridge = Stitcher("affine", x_a.shape[1], y_a.shape[1], input_norm="standard")
    ridge.fit_normalization(x_a, None)
    ridge_fit = fit_closed_form(ridge, (x_a, y_a), "ridge", val=(x_b, y_b))
    with torch.no_grad():
        scores["ridge (supervised)"] = retrieval_scores(ridge(eval_x), eval_y)
    oracle = UnsupervisedMap(fitted.source, fitted.target,
                             procrustes(fitted.source(x_a), fitted.target(y_a)))
    scores["procrustes (paired, same frames)"] = retrieval_scores(oracle(eval_x), eval_y)
    scores["chance"] = chance_scores(len(rows))
    top1 = scores["ridge (supervised)"]["a2b/recall@1"]
    scores["unsupervised"]["fraction_of_ridge@1"] = scores["unsupervised"]["a2b/recall@1"] / top1 if top1 else float("nan")
    info = {"n_train_rows": len(source.train), "half_a": len(half_a), "half_b": len(half_b), "n": len(rows),
            "unsupervised": fitted.info, "ridge": ridge_fit.as_dict(), "rotation_vs_paired": float(
                (fitted.rotation - oracle.rotation).norm() / oracle.rotation.norm())}
    return TranslationOutcome(scores, unsup, info)
