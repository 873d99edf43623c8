"""Training-free anchor baselines: planted answers and brute-force references written here."""

import numpy as np
import pytest
import torch

from prh_stitch.evaluation.baselines import BASELINES
from prh_stitch.metrics import retrieval


def _clustered(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) + 3.0 * torch.randn(1, d, generator=g)


@pytest.mark.parametrize("name", BASELINES.names())
def test_identical_encoders_retrieve_perfectly(name):
    # Two "encoders" that are the same map (up to a rotation, which cosine-to-anchors ignores).
    x = _clustered(300, 24, 0)
    rotation, _ = torch.linalg.qr(torch.randn(24, 24, generator=torch.Generator().manual_seed(1)))
    y = x @ rotation
    anchors, queries = slice(0, 200), slice(200, 300)
    options = {"m": 32} if name == "asif" else {}
    base = BASELINES.get(name)(**options).fit(x[anchors], y[anchors])
    s, t = base.transform_source(x[queries]), base.transform_target(y[queries])
    torch.testing.assert_close(s, t, atol=1e-4, rtol=1e-4)
    scores = retrieval(s, t)
    assert scores["a2b/recall@1"] == 1.0 and scores["b2a/recall@1"] == 1.0


def test_relative_matches_numpy_cosines_and_centering():
    x, y = _clustered(50, 8, 2), _clustered(50, 5, 3)
    anchors_x, anchors_y = x[:20].double().numpy(), y[:20].double().numpy()

    def cosines(q, a):
        q = q / np.linalg.norm(q, axis=1, keepdims=True)
        a = a / np.linalg.norm(a, axis=1, keepdims=True)
        return q @ a.T

    base = BASELINES.get("relative")().fit(x[:20], y[:20])
    np.testing.assert_allclose(base.transform_source(x[20:]).numpy(), cosines(x[20:].double().numpy(), anchors_x),
                               atol=1e-5)
    centered = BASELINES.get("relative")(center=True).fit(x[:20], y[:20])
    mu = anchors_y.mean(0)
    np.testing.assert_allclose(centered.transform_target(y[20:]).numpy(),
                               cosines(y[20:].double().numpy() - mu, anchors_y - mu), atol=1e-5)


def test_asif_keeps_top_m_raised_to_the_exponent():
    x, y = _clustered(40, 6, 4), _clustered(40, 7, 5)
    base = BASELINES.get("asif")(m=3, exponent=2.0).fit(x[:10], y[:10])
    out = base.transform_source(x[10:]).numpy()
    sims = BASELINES.get("relative")().fit(x[:10], y[:10]).transform_source(x[10:]).double().numpy()
    for row, s in zip(out, sims):
        top = sorted(range(10), key=lambda j: (-s[j], j))[:3]
        expected = np.zeros(10)
        expected[top] = np.maximum(s[top], 0) ** 2
        np.testing.assert_allclose(row, expected, atol=1e-5)
        assert (row != 0).sum() <= 3


def test_num_anchors_picks_the_same_seeded_rows_on_both_sides():
    x, y = _clustered(100, 6, 6), _clustered(100, 4, 7)
    a = BASELINES.get("relative")(num_anchors=17, seed=3).fit(x, y)
    b = BASELINES.get("relative")(num_anchors=17, seed=3).fit(x, y)
    assert len(a.anchor_indices) == 17 and torch.equal(a.anchor_indices, b.anchor_indices)
    full = BASELINES.get("relative")().fit(x[a.anchor_indices], y[a.anchor_indices])
    torch.testing.assert_close(a.transform_target(y[:5]), full.transform_target(y[:5]))
    assert a.transform_source(x[:5]).shape == (5, 17)


@pytest.mark.parametrize(
    "options, call, message",
    [
        ({"num_anchors": 500}, "fit", "num_anchors=500 but only 20 anchor pairs"),
        ({"num_anchors": 0}, "init", "num_anchors must be a positive integer"),
        ({"m": 64}, "fit", "m=64 exceeds the number of anchors"),
        ({"exponent": 0}, "init", "exponent must be > 0"),
        ({}, "unpaired", "paired row by row"),
        ({}, "width", "has 3 features but the anchors of that side have 6"),
        ({}, "unfitted", "before fit"),
    ],
)
def test_bad_input_is_a_clear_error(options, call, message):
    x, y = _clustered(20, 6, 8), _clustered(20, 4, 9)
    error = RuntimeError if call == "unfitted" else ValueError
    with pytest.raises(error, match=message):
        base = BASELINES.get("asif")(**options)
        if call == "fit":
            base.fit(x, y)
        elif call == "unpaired":
            base = BASELINES.get("asif")(m=4).fit(x, y[:10])
        elif call == "width":
            BASELINES.get("asif")(m=4).fit(x, y).transform_source(x[:, :3])
        elif call == "unfitted":
            base.transform_target(y)
