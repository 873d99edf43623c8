"""PreparedLayers: per-layer preparation shared across model pairs gives exactly the unshared scores."""

import pytest
import torch

from prh_stitch.metrics import layer_alignment
from prh_stitch.metrics.layers import PreparedLayers


def layers(seed, n=60, widths=(5, 8, 3)):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(n, d, generator=gen) for d in widths]


@pytest.mark.parametrize("metric, opts", [("mutual_knn", {"k": 5}), ("cycle_knn", {"k": 4}), ("cka", {}),
                                          ("cknna", {"k": 6})])
def test_shared_preparation_gives_the_unshared_scores_and_is_reused(metric, opts):
    a, b, c = layers(0), layers(1, widths=(4, 6)), layers(2, widths=(7,))
    prepared = PreparedLayers()
    for x, y in ((a, b), (a, c), (c, b)):  # a, b and c each meet two partners
        shared = layer_alignment(x, y, metric, prepared=prepared, **opts)["scores"]
        assert torch.equal(shared, layer_alignment(x, y, metric, **opts)["scores"])
    assert prepared.hits == len(a) + len(b) + len(c)  # each layer prepared once, reused at its second partner
    # Rows in another order are other features: prepared anew, and scored as such.
    perm = torch.randperm(60, generator=torch.Generator().manual_seed(3))
    moved = layer_alignment(a, [y[perm] for y in b], metric, prepared=prepared, **opts)["scores"]
    assert prepared.hits == len(a) + len(b) + len(c) + len(a)
    assert torch.equal(moved, layer_alignment(a, [y[perm] for y in b], metric, **opts)["scores"])


def test_other_options_are_other_entries_and_the_byte_budget_holds():
    a, b = layers(0), layers(1)
    prepared = PreparedLayers()
    k5 = layer_alignment(a, b, "mutual_knn", prepared=prepared, k=5)["scores"]
    k9 = layer_alignment(a, b, "mutual_knn", prepared=prepared, k=9)["scores"]
    assert prepared.hits == 0 and not torch.equal(k5, k9)
    one_layer = 60 * 5 * (4 + 8)  # k=5 neighbour lists of 60 rows: float32 similarities, int64 indices
    assert sorted(set(prepared.sizes.values())) == [one_layer, 60 * 9 * 12]
    small = PreparedLayers(max_bytes=2 * one_layer)
    layer_alignment(a, b, "mutual_knn", prepared=small, k=5)
    assert len(small.entries) == 2 and sum(small.sizes.values()) <= 2 * one_layer
