"""Unsupervised translation on planted problems with a known answer: a rotated, permuted, noisy copy of a
structured point cloud is recovered without pairs; widths may differ; the fit never reads the pairing."""

import pytest
import torch

from prh_stitch.closed_form import fit_closed_form
from prh_stitch.closed_form.unsupervised import (UnsupervisedOptions, fit_unsupervised, fit_unsupervised_stitcher,
                                                 match_structure, procrustes, unpaired_halves)
from prh_stitch.metrics.retrieval import retrieval
from prh_stitch.stitchers import Stitcher

FAST = dict(restarts=3, iterations=15, sample=300, whiten=False)


def _cloud(n: int, d: int = 8, seed: int = 0) -> torch.Tensor:
    """A mixture of 12 anisotropic Gaussian clusters: a shape with no symmetry a rotation could hide in."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(12, d, generator=g, dtype=torch.float64) * 3
    labels = torch.randint(12, (n,), generator=g)
    return centres[labels] + torch.randn(n, d, generator=g, dtype=torch.float64) * torch.linspace(1.2, 0.4, d)


def _rotation(d: int, seed: int = 1) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q


def test_rotated_permuted_noisy_copy_is_recovered_without_pairs():
    x = _cloud(600)
    q = _rotation(8)
    perm = torch.randperm(600, generator=torch.Generator().manual_seed(2))
    noise = 0.02 * torch.randn(600, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    y = (x @ q)[perm] + noise  # row i of y is not row i of x: nothing pairs them
    fitted = fit_unsupervised(x, y, UnsupervisedOptions(dim=8, **FAST))
    # The recovered linear part is the planted rotation (the frames' means are the clouds' means).
    assert torch.linalg.matrix_norm(fitted.weight - q) / torch.linalg.matrix_norm(q) < 0.05
    held_out = _cloud(300, seed=9)
    scores = retrieval(fitted(held_out).float(), (held_out @ q).float(), ks=(1,))
    assert scores["a2b/recall@1"] > 0.95
    # Chance on 300 items is 1/300: a wrong rotation would be near that, not near 1.
    wrong = retrieval(held_out.float() @ _rotation(8, seed=5).float(), (held_out @ q).float(), ks=(1,))
    assert wrong["a2b/recall@1"] < 0.2


def test_different_widths_are_mapped_through_a_common_frame():
    x = _cloud(600)
    # B is 12-d: the planted 8-d rotation embedded in 12-d by orthonormal rows, plus a constant offset.
    embed = torch.linalg.qr(torch.randn(12, 12, generator=torch.Generator().manual_seed(4), dtype=torch.float64))[0][:8]
    m = _rotation(8) @ embed
    offset = torch.linspace(-1, 1, 12, dtype=torch.float64)
    perm = torch.randperm(600, generator=torch.Generator().manual_seed(6))
    y = (x @ m + offset)[perm]
    fitted = fit_unsupervised(x, y, UnsupervisedOptions(dim=8, **FAST))
    assert fitted.weight.shape == (8, 12) and fitted.info["dim"] == 8
    held_out = _cloud(300, seed=9)
    assert retrieval(fitted(held_out).float(), (held_out @ m + offset).float(), ks=(1,))["a2b/recall@1"] > 0.95
    # And the other way round: 12-d -> 8-d.
    back = fit_unsupervised(y, x, UnsupervisedOptions(dim=8, **FAST))
    assert retrieval(back(held_out @ m + offset).float(), held_out.float(), ks=(1,))["a2b/recall@1"] > 0.95


def test_row_order_carries_no_information():
    x, y = _cloud(300), _cloud(300, seed=4) @ _rotation(8)
    opts = UnsupervisedOptions(dim=6, restarts=1, iterations=5, sample=60)
    first = fit_unsupervised(x, y, opts)
    g = torch.Generator().manual_seed(7)
    again = fit_unsupervised(x[torch.randperm(300, generator=g)], y[torch.randperm(300, generator=g)], opts)
    assert torch.equal(first.weight, again.weight) and torch.equal(first.bias, again.bias)


def test_fit_closed_form_unsupervised_never_reads_the_pairing():
    """``fit: unsupervised`` splits the training pairs into a source half and a target half: the targets paired
    with the source half (and the sources paired with the target half) are never read."""
    x = _cloud(400).float()
    y = (x.double() @ _rotation(8)).float()
    options = dict(dim=8, restarts=3, iterations=10, sample=200, whiten=False)
    fitted = Stitcher("affine", 8, 8)
    result = fit_closed_form(fitted, (x, y), "unsupervised", unsupervised=options)
    rows_a, rows_b = unpaired_halves(400, seed=0)
    assert set(rows_a.tolist()).isdisjoint(rows_b.tolist()) and len(rows_a) + len(rows_b) == 400
    x_spoiled, y_spoiled = x.clone(), y.clone()
    x_spoiled[rows_b] = torch.randn(len(rows_b), 8)  # the partners of the target half
    y_spoiled[rows_a] = torch.randn(len(rows_a), 8)  # the partners of the source half
    spoiled = Stitcher("affine", 8, 8)
    fit_closed_form(spoiled, (x_spoiled, y_spoiled), "unsupervised", unsupervised=options)
    for name, tensor in fitted.state_dict().items():
        assert torch.equal(tensor, spoiled.state_dict()[name]), name
    assert result.method == "unsupervised" and result.n_train == 400 and result.unsupervised["dim"] == 8
    assert retrieval(fitted(x[:200]), y[:200], ks=(1,))["a2b/recall@1"] > 0.9


def test_linear_core_with_centring_norms_and_errors():
    # Disjoint samples of one distribution on the two sides (no item is on both), B offset by a constant.
    x = _cloud(1000).float()
    y = (x.double() @ _rotation(8) + 5.0).float()
    stitcher = Stitcher("linear", 8, 8, input_norm="center", output_norm="center").fit_normalization(x, y)
    fit_unsupervised_stitcher(stitcher, x[:500], y[500:], UnsupervisedOptions(dim=8, **FAST))
    held_out = _cloud(300, seed=9)
    with torch.no_grad():
        scores = retrieval(stitcher(held_out.float()), (held_out @ _rotation(8) + 5.0).float(), ks=(1,))
    assert scores["a2b/recall@1"] > 0.9
    with pytest.raises(ValueError, match="cannot be split over processes"):
        fit_closed_form(Stitcher("affine", 8, 8), (x, y), "unsupervised", distributed=True)
    with pytest.raises(ValueError, match="unknown unsupervised option"):
        UnsupervisedOptions.coerce({"dims": 4})
    with pytest.raises(ValueError, match="init must be one of"):
        UnsupervisedOptions(init="spectral")
    with pytest.raises(ValueError, match="NaN"):
        fit_unsupervised(torch.full((10, 3), float("nan")), torch.randn(10, 3))


def test_structure_matching_recovers_a_planted_permutation():
    """The QAP step alone: similarity matrices of the same centroids in another order give back that order."""
    c = torch.nn.functional.normalize(_cloud(20, d=6).double(), dim=1)
    perm = torch.randperm(20, generator=torch.Generator().manual_seed(3))
    ca, cb = c @ c.T, c[perm] @ c[perm].T
    found, _ = match_structure(ca, cb, starts=3, seed=0)
    # A's centroid i is B's centroid found[i], i.e. perm[found[i]] == i.
    assert perm[torch.as_tensor(found)].tolist() == list(range(20))


def test_procrustes_is_the_orthogonal_least_squares_solution():
    x = _cloud(100)
    q = _rotation(8)
    assert torch.allclose(procrustes(x, x @ q), q, atol=1e-10)
