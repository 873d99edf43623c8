"""Held-out evaluation: the scenes' held-out combinations, grouped chance, seen/unseen retrieval, split provenance."""

import itertools
import math

import pytest
import torch

from prh_stitch.data.scenes import HELD_OUT_OBJECTS, HELD_OUT_TEMPLATES, is_held_out
from prh_stitch.data.sources import scenes
from prh_stitch.evaluation.captions import caption_retrieval, logged_scores, seen_mask
from prh_stitch.metrics.retrieval import chance_recall

# Share of val/test scenes that contain a held-out combination, measured on 20,000 val scenes (seed 0): 0.2151.
HELD_OUT_SHARE = 0.215


def _scene_records(n, split, seed=0):
    return [(caption, meta) for _, _, caption, meta in scenes(n, seed=seed, size=16, split=split)]


@pytest.fixture(scope="module")
def scene_splits():
    return {"train": _scene_records(600, "train"), "test": _scene_records(600, "test")}


# -- the scene hold-out -------------------------------------------------------------------------------------------

def test_training_scenes_never_contain_a_held_out_combination(scene_splits):
    train = scene_splits["train"]
    for caption, meta in train:
        objects = set(zip(meta["shapes"], meta["colours"], meta["sizes"]))
        assert not objects & HELD_OUT_OBJECTS, caption
        assert (meta["relation"], tuple(meta["counts"])) not in HELD_OUT_TEMPLATES, caption
        assert meta["held_out"] is False
    # Only combinations are held out: every single attribute value and relation still occurs in training.
    metas = [m for _, m in train]
    assert {s for m in metas for s in m["shapes"]} == {s for s, _, _ in HELD_OUT_OBJECTS}
    assert {c for m in metas for c in m["colours"]} == {c for _, c, _ in HELD_OUT_OBJECTS}
    assert {r for m in metas for r in [m["relation"]] if r} == {"above", "below", "to the left of", "to the right of"}


def test_hold_out_is_deterministic(scene_splits):
    assert _scene_records(50, "train") == scene_splits["train"][:50]
    assert _scene_records(50, "test") == scene_splits["test"][:50]
    assert _scene_records(50, "train", seed=1) != scene_splits["train"][:50]


def test_test_split_has_the_documented_unseen_share(scene_splits):
    train_captions = {c for c, _ in scene_splits["train"]}
    test = scene_splits["test"]
    held = [is_held_out(m) for _, m in test]
    assert held == [m["held_out"] for _, m in test]
    share = sum(held) / len(test)
    sd = math.sqrt(HELD_OUT_SHARE * (1 - HELD_OUT_SHARE) / len(test))
    assert abs(share - HELD_OUT_SHARE) < 4 * sd, share
    # Both kinds of hold-out occur, and every held-out scene's caption is unseen in training by construction.
    assert any(set(zip(m["shapes"], m["colours"], m["sizes"])) & HELD_OUT_OBJECTS for _, m in test)
    assert any((m["relation"], tuple(m["counts"])) in HELD_OUT_TEMPLATES for _, m in test)
    assert all(c not in train_captions for (c, _), h in zip(test, held) if h)


# -- grouped chance -------------------------------------------------------------------------------------------------

def _chance_by_enumeration(groups, k):
    """Mean over queries of P(a correct item in the first k) over all N! orders of the items."""
    n, hits, orders = len(groups), 0, 0
    for order in itertools.permutations(range(n)):
        orders += 1
        hits += sum(any(groups[j] == groups[i] for j in order[:k]) for i in range(n))
    return hits / (orders * n)


@pytest.mark.parametrize("groups", [[0, 0, 1, 2, 2, 2], [0, 1, 2, 3, 4, 5], [7, 7, 7, 7, 3, 3]])
@pytest.mark.parametrize("k", [1, 2, 4, 6, 9])
def test_grouped_chance_equals_enumeration_over_all_orders(groups, k):
    exact = _chance_by_enumeration(groups, min(k, len(groups)))
    assert float(chance_recall(torch.tensor(groups), k).mean()) == pytest.approx(exact, abs=1e-12)
    if k == 1:
        sizes = torch.bincount(torch.tensor(groups)).double()
        assert exact == pytest.approx(float((sizes ** 2).sum()) / len(groups) ** 2, abs=1e-12)


def test_grouped_chance_matches_a_random_scorer_by_simulation():
    # Many random scorers at once: i.i.d. scores give every order of the items the same probability.
    groups = torch.tensor([0] * 5 + [1] * 3 + list(range(2, 14)))
    n, trials, k = len(groups), 4000, 3
    scores = torch.rand(trials, n, n, generator=torch.Generator().manual_seed(0))
    correct = groups[:, None] == groups[None, :]
    best_correct = scores.masked_fill(~correct, -1.0).amax(dim=2, keepdim=True)
    rank = (scores > best_correct).sum(dim=2) + 1
    simulated = float((rank <= k).double().mean())
    expected = float(chance_recall(groups, k).mean())
    # Queries of one trial share their scorer but not their scores: the trials are independent.
    per_trial = (rank <= k).double().mean(dim=1)
    assert abs(simulated - expected) < 4 * float(per_trial.std()) / math.sqrt(trials)


def test_chance_rejects_bad_input():
    with pytest.raises(ValueError, match="k must be a positive integer"):
        chance_recall(torch.tensor([0, 1]), 0)
    with pytest.raises(ValueError, match="integer tensor"):
        chance_recall(torch.tensor([0.0, 1.0]), 1)


# -- seen / unseen retrieval ---------------------------------------------------------------------------------------

def _brute_force_ranks(a, b, captions):
    """1-based rank of the first item with the query's caption, cosine order, ties by lower index."""
    a = a / a.norm(dim=1, keepdim=True)
    b = b / b.norm(dim=1, keepdim=True)
    out = []
    for i in range(len(a)):
        scores = [(float(a[i] @ b[j]), j) for j in range(len(b))]
        order = sorted(scores, key=lambda s: (-s[0], s[1]))
        out.append(next(pos + 1 for pos, (_, j) in enumerate(order) if captions[j] == captions[i]))
    return out


def test_seen_and_unseen_recall_equal_a_brute_force():
    g = torch.Generator().manual_seed(3)
    captions = ["red", "blue", "red", "green", "pink", "blue", "grey", "teal", "red", "navy", "gold", "teal"]
    train = {"red", "teal", "lime"}
    a = torch.randn(12, 5, generator=g)
    b = a + 0.9 * torch.randn(12, 5, generator=g)
    result = caption_retrieval(a, b, captions, train, ks=(1, 2, 5))
    seen = [c in train for c in captions]
    assert seen_mask(captions, train).tolist() == seen
    ranks = {"a2b": _brute_force_ranks(a, b, captions), "b2a": _brute_force_ranks(b, a, captions)}
    for name, keep in (("all", [True] * 12), ("seen", seen), ("unseen", [not s for s in seen])):
        subset = result["subsets"][name]
        rows = [i for i in range(12) if keep[i]]
        assert subset["n"] == len(rows) and subset["distinct"] == len({captions[i] for i in rows})
        for k in (1, 2, 5):
            for d in ("a2b", "b2a"):
                assert subset[f"{d}/recall@{k}"] == pytest.approx(sum(ranks[d][i] <= k for i in rows) / len(rows))
            sizes = [captions.count(captions[i]) for i in rows]
            assert subset[f"chance@{k}"] == pytest.approx(
                sum(1 - math.comb(12 - s, k) / math.comb(12, k) for s in sizes) / len(rows))
    assert result["subsets"]["all"]["a2b/recall@1"] == pytest.approx(result["a2b/recall@1"])
    logged = logged_scores("test", result, ks=(1, 2, 5))
    assert logged["test/seen/recall@1"] == result["subsets"]["seen"]["a2b/recall@1"]
    assert logged["test/unseen/n"] == 7 and logged["test/chance@1"] == pytest.approx((9 + 4 + 4 + 1 + 1 + 1 + 1 + 1) / 144)


def test_unknown_training_split_reports_all_only_and_an_empty_subset_is_nan_free_in_logs():
    a = torch.randn(4, 3)
    result = caption_retrieval(a, a, ["x", "y", "z", "w"], None)
    assert set(result["subsets"]) == {"all"}
    result = caption_retrieval(a, a, ["x", "y", "z", "w"], {"x", "y", "z", "w"})
    assert result["subsets"]["unseen"]["n"] == 0
    assert not any(key.startswith("test/unseen/recall") for key in logged_scores("test", result))


# -- data write: a test series ---------------------------------------------------------------------------------------

def test_write_adds_a_test_series_from_the_scenes_test_stream_and_interleaves_files_exactly(tmp_path):
    from PIL import Image

    from prh_stitch.data.commands import write_shards
    from prh_stitch.data.datamodule import shard_captions
    from prh_stitch.data.shards import expand_urls

    written = write_shards("scenes", str(tmp_path / "scenes"), n=20, val_fraction=0.25, test_fraction=0.25, size=16)
    assert [written[s]["num_samples"] for s in ("train", "val", "test")] == [10, 5, 5]
    for split in ("train", "test"):  # each series is its split's own seed stream (train with the hold-out)
        assert list(shard_captions(expand_urls(written[split]["pattern"]))) == [c for c, _ in _scene_records(
            written[split]["num_samples"], split)]
    for i in range(10):
        Image.new("RGB", (8, 8), (i * 20, 0, 0)).save(tmp_path / f"{i}.png")
    (tmp_path / "pairs.tsv").write_text("path\ttext\n" + "".join(f"{i}.png\tcaption {i}\n" for i in range(10)))
    written = write_shards("folder", str(tmp_path / "files"), captions=str(tmp_path / "pairs.tsv"),
                           val_fraction=0.2, test_fraction=0.3)
    series = {s: list(shard_captions(expand_urls(written[s]["pattern"]))) for s in ("train", "val", "test")}
    assert [len(series[s]) for s in ("train", "val", "test")] == [5, 2, 3]  # floor(10 * 0.5) held, 3/5 of them test
    assert sorted(sum(series.values(), [])) == sorted(f"caption {i}" for i in range(10))  # each row exactly once
    with pytest.raises(ValueError, match="--test-fraction must be in"):
        write_shards("scenes", str(tmp_path / "bad"), n=10, val_fraction=0.5, test_fraction=0.5)


def _members(urls):
    """Every file member of the shards, name and bytes, in order: equal lists are the same samples."""
    import tarfile

    out = []
    for url in urls:
        with tarfile.open(url) as tf:
            out += [(m.name, tf.extractfile(m).read()) for m in tf.getmembers() if m.isfile()]
    assert out
    return out


def test_a_recorded_scenes_split_from_another_cache_is_regenerated_here_with_the_same_samples(tmp_path):
    from prh_stitch.data.shards import ensure_scene_splits, expand_urls
    from prh_stitch.evaluation.splits import local_scene_pattern, local_split_record

    there = ensure_scene_splits(tmp_path / "there" / "scenes", {"train": 6, "val": 3, "test": 4}, seed=1, size=16)
    moved = {k: v.replace(str(tmp_path / "there"), "/elsewhere/cache") for k, v in there.items()}
    here = local_split_record({**moved, "choices_made_on": "val"}, tmp_path / "here")
    assert here["choices_made_on"] == "val"
    for split in ("train", "val", "test"):
        assert here[split].startswith(str(tmp_path / "here" / "scenes"))
        assert _members(expand_urls(here[split])) == _members(expand_urls(there[split]))
    # Splits named by tag (any other choice of splits) are remade too.
    tagged = ensure_scene_splits(tmp_path / "there" / "scenes", {"train": 5, "test": 3}, seed=0, size=16)["test"]
    remade = local_scene_pattern(tagged.replace(str(tmp_path / "there"), "/elsewhere"), tmp_path / "here")
    assert "train5-test3" in remade and _members(expand_urls(remade)) == _members(
        expand_urls(tagged))


def test_patterns_that_are_not_missing_built_in_scenes_come_back_unchanged(tmp_path):
    from prh_stitch.data.scenes import SCENES_VERSION
    from prh_stitch.data.shards import ensure_scene_splits
    from prh_stitch.evaluation.splits import local_scene_pattern

    existing = ensure_scene_splits(tmp_path / "scenes", {"train": 4, "val": 2}, seed=0, size=16)["val"]
    other_version = f"/elsewhere/scenes/scenes-v{SCENES_VERSION + 1}-4-2-s0-16px/val-{{000000..000000}}.tar"
    for pattern in (existing, "/elsewhere/my_shards/test-{000000..000003}.tar", other_version,
                    f"/elsewhere/scenes-v{SCENES_VERSION}-4-2-s0-16px/test-000000.tar",  # no test split in that folder
                    "https://example.org/shards/test-{0000..0009}.tar", "pipe:cat x.tar", None):
        assert local_scene_pattern(pattern, tmp_path / "here") == pattern
    assert not (tmp_path / "here").exists()  # nothing was generated for them
