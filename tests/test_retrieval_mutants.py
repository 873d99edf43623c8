"""Retrieval behaviour that the mutation run of metrics/retrieval.py showed no test pinned down: the zero-row
error of the mean cosine (``normalize=False``, where no normalisation catches the row first), the grouped chance
level's default and errors, and the subsets' options and errors."""

import pytest
import torch

from prh_stitch.metrics import retrieval
from prh_stitch.metrics.retrieval import chance_recall, retrieval_subsets

ZERO_ROW = r"^a zero row has no cosine similarity \(mean_cosine\); remove zero rows$"


@pytest.mark.parametrize("side", ["a", "b", "both"])
def test_a_zero_row_on_either_side_is_refused_without_normalisation(side):
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(8, 3, generator=g), torch.randn(8, 3, generator=g)
    if side in ("a", "both"):
        a[2] = 0
    if side in ("b", "both"):
        b[5 if side == "b" else 2] = 0
    with pytest.raises(ValueError, match=ZERO_ROW):
        retrieval(a, b, normalize=False)
    a[a.norm(dim=1) == 0] = 1e-3  # tiny but non-zero rows are fine
    b[b.norm(dim=1) == 0] = 1e-3
    assert -1.0 <= retrieval(a, b, normalize=False)["mean_cosine"] <= 1.0


# -- chance_recall --------------------------------------------------------------------------------------------------

def test_chance_default_k_is_one_and_a_single_row_is_always_found():
    groups = torch.tensor([0, 0, 1, 2, 2, 2])
    assert torch.equal(chance_recall(groups), chance_recall(groups, 1))
    assert chance_recall(groups).tolist() == pytest.approx([2 / 6, 2 / 6, 1 / 6, 3 / 6, 3 / 6, 3 / 6], abs=1e-15)
    assert chance_recall(groups).dtype == torch.float64
    assert chance_recall(torch.tensor([4])).tolist() == [1.0]  # one row: its only item is correct


@pytest.mark.parametrize("k", [True, 2.5, 0, -1])
def test_chance_refuses_a_k_that_is_not_a_positive_integer(k):
    with pytest.raises(ValueError, match=rf"^k must be a positive integer, got {k!r}$"):
        chance_recall(torch.tensor([0, 1, 1]), k)


def test_chance_refuses_no_rows():
    with pytest.raises(ValueError, match=r"^chance_recall needs at least one row$"):
        chance_recall(torch.tensor([], dtype=torch.int64))


# -- retrieval_subsets ----------------------------------------------------------------------------------------------

def _subset_data():
    g = torch.Generator().manual_seed(5)
    a = torch.randn(10, 4, generator=g) * torch.linspace(0.2, 5.0, 10)[:, None]  # row norms far apart
    b = a + 2.0 * torch.randn(10, 4, generator=g)
    groups = torch.tensor([0, 1, 2, 2, 3, 4, 5, 5, 6, 7])
    return a, b, groups


def test_subsets_rank_by_cosine_unless_told_otherwise():
    a, b, groups = _subset_data()
    every = {"all": torch.ones(10, dtype=torch.bool)}
    for normalize in (True, False):
        whole = retrieval(a, b, groups=groups, normalize=normalize, ks=(1, 3))
        sub = retrieval_subsets(a, b, groups, every, normalize=normalize, ks=(1, 3))["all"]
        for key in ("a2b/recall@1", "b2a/recall@1", "a2b/recall@3", "b2a/recall@3"):
            assert sub[key] == whole[key], (normalize, key)
    default = retrieval_subsets(a, b, groups, every, ks=(1, 3))["all"]
    cosine = retrieval(a, b, groups=groups, ks=(1, 3))
    raw = retrieval(a, b, groups=groups, normalize=False, ks=(1, 3))
    assert any(cosine[k] != raw[k] for k in ("a2b/recall@1", "b2a/recall@1", "a2b/recall@3", "b2a/recall@3"))
    assert all(default[k] == cosine[k] for k in ("a2b/recall@1", "b2a/recall@1", "a2b/recall@3", "b2a/recall@3"))


@pytest.mark.parametrize("side", ["a", "b"])
def test_subsets_name_the_side_with_a_zero_row(side):
    a, b, groups = _subset_data()
    (a if side == "a" else b)[3] = 0
    with pytest.raises(ValueError, match=rf"^{side} has 1 zero row\(s\) \(first: \[3\]\); cannot L2-normalise"):
        retrieval_subsets(a, b, groups, {"all": torch.ones(10, dtype=torch.bool)})


@pytest.mark.parametrize("mask", [torch.ones(10, dtype=torch.int64), torch.ones(9, dtype=torch.bool),
                                  [True] * 10, torch.ones(10, 1, dtype=torch.bool)])
def test_subsets_refuse_a_mask_that_is_not_one_bool_per_row(mask):
    a, b, groups = _subset_data()
    with pytest.raises(ValueError, match=r"^subset 'odd' must be a boolean mask with one entry per row \(N=10\)$"):
        retrieval_subsets(a, b, groups, {"odd": mask})


@pytest.mark.parametrize("block_size", [0, -1, 2.5])
def test_subsets_refuse_a_bad_block_size(block_size):
    a, b, groups = _subset_data()
    with pytest.raises(ValueError, match=rf"^block_size must be a positive integer or None, got {block_size!r}$"):
        retrieval_subsets(a, b, groups, {"all": torch.ones(10, dtype=torch.bool)}, block_size=block_size)
