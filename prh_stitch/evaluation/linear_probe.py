"""Linear-probe top-1: how much class information an encoder's frozen features carry, by a fixed closed-form protocol.

The protocol (stated in every report that uses it, :data:`PROTOCOL`):

1. The training items are split once, by a seeded permutation, into a fit part and a validation part
   (``val_fraction``, default 10 %). The test items are never looked at until step 4.
2. Features are standardised with the fit part's mean and standard deviation.
3. A ridge regression onto one-hot class targets (one-vs-rest, intercept by centring) is solved in closed form for
   every regulariser λ of a fixed grid (λ = g · tr(XᵀX)/d for g in ``grid``, so the grid follows the feature
   scale); the λ with the best validation top-1 wins (ties: the larger λ, the simpler model).
4. The probe is refitted with that λ on all training items (standardisation recomputed on them) and scored on the
   test items: top-1 accuracy, with a 95 % Wilson interval over test items.

Closed form (one eigendecomposition of the d × d Gram matrix serves every λ) rather than iterative logistic
regression: the answer is exact and deterministic, and a 1,280-d probe over tens of thousands of items takes
seconds on a CPU.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

import torch
from torch import Tensor

from prh_stitch.metrics.proportions import wilson_interval

DEFAULT_GRID = tuple(10.0 ** e for e in range(-6, 3))  # g of λ = g · tr(XᵀX)/d

PROTOCOL = ("closed-form ridge regression onto one-hot labels (one-vs-rest, intercept by centring) on standardised "
            "features; λ = g·tr(XᵀX)/d with g on a fixed grid ({grid}) chosen by top-1 on a seeded {val:.0%} validation part of "
            "the training items (never the test items), then refitted on all training items; top-1 on the test "
            "items with a 95% Wilson interval")


def _standardise(fit: Tensor, *others: Tensor):
    mean = fit.mean(dim=0)
    std = fit.std(dim=0).clamp_min(1e-8)  # a constant feature (e.g. a dead ReLU) stays 0 instead of dividing by 0
    return [(x - mean) / std for x in (fit, *others)]


class _RidgePath:
    """Ridge solutions for any λ from one eigendecomposition of XᵀX (X standardised, so already centred)."""

    def __init__(self, x: Tensor, y_onehot: Tensor) -> None:
        self.y_mean = y_onehot.mean(dim=0)
        gram = x.T @ x
        self.scale = float(torch.trace(gram)) / x.shape[1]
        self.eigenvalues, self.eigenvectors = torch.linalg.eigh(gram)
        self.projected = self.eigenvectors.T @ (x.T @ (y_onehot - self.y_mean))

    def weights(self, g: float) -> Tensor:
        lam = g * self.scale
        return self.eigenvectors @ (self.projected / (self.eigenvalues.clamp_min(0) + lam)[:, None])

    def predict(self, g: float, x: Tensor) -> Tensor:
        return (x @ self.weights(g) + self.y_mean).argmax(dim=1)


def linear_probe(train_x: Tensor, train_y: Sequence[int] | Tensor, test_x: Tensor, test_y: Sequence[int] | Tensor,
                 grid: Sequence[float] = DEFAULT_GRID, val_fraction: float = 0.1, seed: int = 0,
                 num_classes: Optional[int] = None) -> Dict[str, Any]:
    """Top-1 of a ridge probe under :data:`PROTOCOL`; the regulariser is chosen on the training items only.

    Returns ``top1``, ``ci`` (Wilson 95 %), ``correct``, ``g`` and ``lambda`` (the chosen regulariser),
    ``val_top1`` ({g: validation top-1} for the grid), ``n_fit``, ``n_val``, ``n_test``, ``num_classes``,
    ``chance`` (1 / classes) and ``protocol``.
    """
    train_x = torch.as_tensor(train_x).double()
    test_x = torch.as_tensor(test_x).double()
    train_y = torch.as_tensor(train_y, dtype=torch.long)
    test_y = torch.as_tensor(test_y, dtype=torch.long)
    if train_x.ndim != 2 or test_x.ndim != 2 or train_x.shape[1] != test_x.shape[1]:
        raise ValueError(f"linear probe: features must be (N, D) with the same D, got {tuple(train_x.shape)} and "
                         f"{tuple(test_x.shape)}")
    if len(train_y) != len(train_x) or len(test_y) != len(test_x):
        raise ValueError(f"linear probe: {len(train_x)}/{len(test_x)} feature rows but {len(train_y)}/{len(test_y)} "
                         "labels; give one label per row")
    if not 0 < val_fraction < 1 or not grid:
        raise ValueError(f"linear probe: val_fraction must lie in (0, 1) and the grid be non-empty, got "
                         f"{val_fraction} and {list(grid)}")
    classes = int(num_classes or int(max(train_y.max(), test_y.max())) + 1)
    n_val = max(1, int(round(len(train_x) * val_fraction)))
    if len(train_x) - n_val < 2:
        raise ValueError(f"linear probe: {len(train_x)} training items leave too few to fit after a {val_fraction:.0%} "
                         "validation part; give more training items")
    order = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(seed))
    fit_idx, val_idx = order[n_val:], order[:n_val]

    fit_x, val_x = _standardise(train_x[fit_idx], train_x[val_idx])
    path = _RidgePath(fit_x, torch.nn.functional.one_hot(train_y[fit_idx], classes).double())
    val_top1 = {float(g): float((path.predict(g, val_x) == train_y[val_idx]).double().mean()) for g in grid}
    best = max(val_top1.values())
    g_best = max(g for g, acc in val_top1.items() if acc == best)  # ties: the strongest regulariser

    all_x, eval_x = _standardise(train_x, test_x)
    final = _RidgePath(all_x, torch.nn.functional.one_hot(train_y, classes).double())
    correct = int((final.predict(g_best, eval_x) == test_y).sum())
    return {"top1": correct / len(test_x), "ci": list(wilson_interval(correct / len(test_x), len(test_x))), "correct": correct,
            "g": g_best, "lambda": g_best * final.scale, "val_top1": {str(g): a for g, a in val_top1.items()},
            "n_fit": len(fit_idx), "n_val": n_val, "n_test": len(test_x), "num_classes": classes,
            "chance": 1.0 / classes, "protocol": PROTOCOL.format(val=val_fraction, grid=", ".join(f"{g:g}" for g in grid))}
