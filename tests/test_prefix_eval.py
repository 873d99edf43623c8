"""The prefix evaluation's parts: scene attributes parsed from captions, the shuffled control, the bootstrap."""

import math

import numpy as np
import pytest
import torch

from prh_stitch.data.scenes import generate_scene
from prh_stitch.prefix.attributes import attribute_accuracy, parse_caption, score_caption
from prh_stitch.prefix.evaluation import bootstrap_bits_per_byte, derangement


def test_every_true_scene_caption_parses_back_to_its_own_meta():
    rng = np.random.default_rng(0)
    for _ in range(300):
        _, caption, meta = generate_scene(rng, 32)
        scores = score_caption(caption, meta, caption)
        assert all(v in (True, None) for v in scores.values()), (caption, scores)
        assert (scores["relation"] is None) == (meta["kind"] != "pair")


def test_a_wrong_word_costs_exactly_its_attribute():
    meta = {"counts": [2, 1], "sizes": ["small", "small", "large"], "colours": ["red", "red", "blue"],
            "shapes": ["star", "star", "circle"], "background": "gray", "relation": "above", "kind": "pair"}
    truth = "two small red stars above a large blue circle on a gray background"
    assert all(score_caption(truth, meta).get(k) for k in ("colour", "shape", "size", "count", "relation"))
    wrong = {
        "colour": "two small green stars above a large blue circle on a gray background",
        "shape": "two small red squares above a large blue circle on a gray background",
        "count": "three small red stars above a large blue circle on a gray background",
        "relation": "two small red stars below a large blue circle on a gray background",
        "background": "two small red stars above a large blue circle on a white background",
    }
    for attribute, text in wrong.items():
        scores = score_caption(text, meta)
        assert [k for k in ("colour", "shape", "size", "count", "relation", "background") if not scores[k]] == \
            [attribute], (attribute, scores)
        assert not scores["objects"] or attribute in ("relation", "background")
    nonsense = score_caption("massage massage coward", meta)
    assert not any(nonsense[k] for k in ("colour", "shape", "size", "count", "relation", "background", "objects"))
    assert parse_caption("from left to right: a small red star, a large blue circle and a small yellow square on a "
                         "beige background")["groups"] == [(1, "small", "red", "star"), (1, "large", "blue", "circle"),
                                                            (1, "small", "yellow", "square")]


def test_attribute_accuracy_counts_only_scenes_where_it_applies():
    scores = [{"colour": True, "relation": None}, {"colour": False, "relation": True}, {"colour": True, "relation": None}]
    acc = attribute_accuracy(scores)
    assert acc["colour"] == {"accuracy": 2 / 3, "n": 3}
    assert acc["relation"] == {"accuracy": 1.0, "n": 1}


@pytest.mark.parametrize("n", [2, 3, 10, 257])
def test_the_shuffled_control_never_keeps_an_image_and_is_a_permutation(n):
    for seed in range(20):
        perm = derangement(n, torch.Generator().manual_seed(seed))
        assert sorted(perm.tolist()) == list(range(n))
        assert bool((perm != torch.arange(n)).all())
    with pytest.raises(ValueError, match="at least 2"):
        derangement(1, torch.Generator())


def test_bootstrap_point_values_are_the_pooled_ratio_and_the_interval_covers_by_simulation():
    """Synthetic captions with known expected bits per byte: the 95 % interval covers it about 95 % of the time."""
    g = torch.Generator().manual_seed(0)
    n, repetitions, hits = 200, 200, 0
    true_bpb = 1.5  # nats = bpb * ln 2 * bytes + zero-mean noise
    for _ in range(repetitions):
        n_bytes = torch.randint(20, 120, (n,), generator=g).double()
        nats = true_bpb * math.log(2) * n_bytes * torch.exp(0.5 * torch.randn(n, generator=g, dtype=torch.float64)
                                                             - 0.125)
        out = bootstrap_bits_per_byte({"prefix": nats}, n_bytes, 400, 0.95, g)
        assert out["prefix"]["bits_per_byte"] == pytest.approx(float(nats.sum() / math.log(2) / n_bytes.sum()))
        low, high = out["prefix"]["interval"]
        hits += low <= true_bpb <= high
    assert 0.88 <= hits / repetitions <= 0.99, hits


def test_paired_contrasts_use_the_same_draws():
    g = torch.Generator().manual_seed(0)
    n_bytes = torch.full((50,), 40.0, dtype=torch.float64)
    alone = torch.rand(50, generator=g, dtype=torch.float64) * 40 + 20
    out = bootstrap_bits_per_byte({"prefix": alone / 2, "lm_alone": alone, "shuffled": alone}, n_bytes, 300, 0.95, g)
    # prefix is exactly half of lm_alone caption by caption: every paired draw gives a reduction of exactly 50 %.
    assert out["reduction_vs_lm_alone"]["value"] == pytest.approx(0.5)
    assert out["reduction_vs_lm_alone"]["interval"] == pytest.approx([0.5, 0.5])
    assert out["shuffled_minus_prefix"]["interval"][0] > 0
