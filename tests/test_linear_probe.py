"""The linear probe: planted separable problems are solved, shuffled labels sit at chance, λ is chosen on the
validation part of the training items only, and the closed form matches a direct solve."""

import torch

from prh_stitch.evaluation.linear_probe import DEFAULT_GRID, linear_probe
from prh_stitch.metrics.proportions import wilson_interval


def planted(n, d=20, classes=5, seed=0, spread=6.0):
    """Gaussian blobs around random class centres ``spread`` apart (unit noise): linearly separable w.h.p."""
    gen = torch.Generator().manual_seed(seed)
    centres = spread * torch.randn(classes, d, generator=torch.Generator().manual_seed(1234))
    y = torch.randint(classes, (n,), generator=gen)
    scales = torch.linspace(0.1, 10, d)  # mixed feature scales: the standardisation matters
    return (centres[y] + torch.randn(n, d, generator=gen)) * scales, y


def test_a_planted_linearly_separable_problem_is_solved():
    x, y = planted(3000)
    out = linear_probe(x[:2000], y[:2000], x[2000:], y[2000:])
    assert out["top1"] >= 0.97
    assert out["ci"][0] <= out["top1"] <= out["ci"][1] and out["n_test"] == 1000 and out["chance"] == 0.2
    assert out["n_fit"] + out["n_val"] == 2000 and out["n_val"] == 200


def test_shuffled_labels_sit_at_chance():
    x, y = planted(6000, classes=4)
    shuffled = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(1))]
    out = linear_probe(x[:4000], shuffled[:4000], x[4000:], shuffled[4000:])
    # The majority class of the shuffled labels can be up to a few points above 1/4; 2,000 test items: SE ~ 1 pt.
    assert abs(out["top1"] - 0.25) < 0.06
    assert out["ci"][0] < 0.3


def test_the_regulariser_is_chosen_on_the_validation_part_only():
    x, y = planted(1500, spread=0.5)
    test_x, test_y = planted(500, seed=7, spread=0.5)
    a = linear_probe(x, y, test_x, test_y)
    # Other test items, and test labels scrambled: the choice and the validation curve must not move.
    b = linear_probe(x, y, test_x.flip(0), torch.zeros_like(test_y))
    assert a["g"] == b["g"] and a["val_top1"] == b["val_top1"] and a["lambda"] == b["lambda"]
    assert a["top1"] != b["top1"]
    # The choice is the best validation score (ties to the larger g), recomputed here by a direct solve per g.
    gen = torch.Generator().manual_seed(0)
    order = torch.randperm(len(x), generator=gen)
    val, fit = order[:150], order[150:]
    xd = x.double()
    mean, std = xd[fit].mean(0), xd[fit].std(0)
    f, v = (xd[fit] - mean) / std, (xd[val] - mean) / std
    onehot = torch.nn.functional.one_hot(y[fit], 5).double()
    accs = {}
    for g in DEFAULT_GRID:
        lam = g * float((f * f).sum()) / f.shape[1]
        w = torch.linalg.solve(f.T @ f + lam * torch.eye(f.shape[1], dtype=torch.float64),
                               f.T @ (onehot - onehot.mean(0)))
        accs[g] = float(((v @ w + onehot.mean(0)).argmax(1) == y[val]).double().mean())
    assert [a["val_top1"][str(g)] for g in DEFAULT_GRID] == [accs[g] for g in DEFAULT_GRID]
    best = max(accs.values())
    assert a["g"] == max(g for g, acc in accs.items() if acc == best)


def test_a_grid_that_only_overregularises_does_worse_and_the_grid_is_used():
    x, y = planted(2000, d=40)
    good = linear_probe(x[:1500], y[:1500], x[1500:], y[1500:])
    crushed = linear_probe(x[:1500], y[:1500], x[1500:], y[1500:], grid=[1e6])
    assert crushed["g"] == 1e6 and crushed["top1"] < good["top1"] - 0.1


def test_wilson_interval_matches_the_formula_and_bad_input_is_one_line():
    lo, hi = wilson_interval(0.9, 100)
    assert abs(lo - 0.8256) < 1e-3 and abs(hi - 0.9448) < 1e-3
    import pytest

    with pytest.raises(ValueError, match="one label per row"):
        linear_probe(torch.zeros(10, 3), [0] * 9, torch.zeros(2, 3), [0, 1])
    with pytest.raises(ValueError, match="same D"):
        linear_probe(torch.zeros(10, 3), [0] * 10, torch.zeros(2, 4), [0, 1])
