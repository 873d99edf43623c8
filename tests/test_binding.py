"""The binding test: swapped-caption hard negatives, the choice accuracy and its statistics, the study's table."""

import hashlib
import json
import re
from collections import Counter

import numpy as np
import pytest
import torch

from prh_stitch.alignment import binding as bt
from prh_stitch.data.scenes import SHAPES, binding_swap, caption_from_meta, generate_scene, swapped_caption

PHRASE = r"(a|two|three) (small|large) (\w+) (\w+)"
CONVERSE = {"to the right of": "to the left of", "below": "above"}
COUNTS = {"a": 1, "two": 2, "three": 3}


def parse(caption):
    """(objects in order of mention, relation, background) of a caption; each object is (count, size, colour,
    shape). Fails unless the caption is one of the generator's templates with grammatical nouns."""
    body, background = re.fullmatch(r"(.*) on a (\w+) background", caption).groups()
    if body.startswith("from left to right: "):
        words = re.fullmatch(rf"from left to right: {PHRASE}, {PHRASE} and {PHRASE}", body).groups()
        relation = "left to right"
    elif re.fullmatch(PHRASE, body):
        words, relation = re.fullmatch(PHRASE, body).groups(), None
    else:
        match = re.fullmatch(rf"{PHRASE} (to the left of|to the right of|above|below) {PHRASE}", body)
        words, relation = match.groups()[:4] + match.groups()[5:], match.group(5)
    objects = []
    for count_word, size, colour, noun in zip(*[iter(words)] * 4):
        count = COUNTS[count_word]
        shape = noun if count == 1 else noun[:-1]
        assert shape in SHAPES and (noun == shape) == (count == 1), caption  # "a circle", "two circles"
        objects.append((count, size, colour, shape))
    return objects, relation, background


def canonical(caption):
    """The scene a caption states, one form per scene: "B right of A" is "A left of B"."""
    objects, relation, background = parse(caption)
    if relation in CONVERSE:
        objects, relation = objects[::-1], CONVERSE[relation]
    return tuple(objects), relation, background


def _scenes(n=1500):
    for split in range(3):
        for i in range(n // 3):
            yield generate_scene(np.random.default_rng([11, split, i]), 16, hold_out=split == 0)[1:]


@pytest.fixture(scope="module")
def scenes():
    return list(_scenes())


# ---- the hard negatives -----------------------------------------------------------------------------

def test_swapped_caption_has_the_same_words_and_states_another_scene(scenes):
    seen = Counter()
    for caption, meta in scenes:
        swap = binding_swap(meta)
        if swap is None:
            continue
        seen[swap.attribute] += 1
        assert swap.caption == swapped_caption(meta)
        assert Counter(swap.caption.split()) == Counter(caption.split()) and swap.caption != caption
        assert canonical(swap.caption) != canonical(caption), (caption, swap.caption)
        true_objects, relation, background = parse(caption)
        objects, swapped_relation, swapped_background = parse(swap.caption)
        assert (swapped_relation, swapped_background) == (relation, background)
        i, j = swap.objects
        others = [k for k in range(len(objects)) if k not in (i, j)]
        assert [objects[k] for k in others] == [true_objects[k] for k in others]
        if swap.attribute == "shape":  # the two descriptions traded places; no two objects differ in colour/size
            assert (objects[i], objects[j]) == (true_objects[j], true_objects[i])
            assert len({o[1:3] for o in true_objects}) == 1
        else:
            slot = {"size": 1, "colour": 2}[swap.attribute]
            assert objects[i][slot] == true_objects[j][slot] != true_objects[i][slot] == objects[j][slot]
            assert all(objects[k][:slot] + objects[k][slot + 1:] == true_objects[k][:slot] + true_objects[k][slot + 1:]
                       for k in (i, j))
            if swap.attribute == "size":
                assert len({o[2] for o in true_objects}) == 1  # colour is tried first
    assert set(seen) == {"colour", "size", "shape"} and sum(seen.values()) > 600


def test_a_swap_exists_exactly_for_scenes_of_two_or_more_groups(scenes):
    kinds = Counter()
    for caption, meta in scenes:
        kinds[meta["kind"], binding_swap(meta) is None] += 1
        assert (binding_swap(meta) is None) == (len(meta["counts"]) == 1) == (meta["kind"] in ("single", "group"))
    assert {k for k, _ in kinds} == {"single", "group", "pair", "three"}


def test_caption_from_meta_rebuilds_every_caption_and_the_stream_is_unchanged(scenes):
    assert all(caption_from_meta(meta) == caption for caption, meta in scenes)
    digest = hashlib.sha256()
    for i in range(200):  # the generator's draws and captions as before the hard negatives (pinned at that commit)
        _, caption, meta = generate_scene(np.random.default_rng([0, 2, i]), 16)
        digest.update(caption.encode())
        digest.update(json.dumps(meta, sort_keys=True).encode())
    assert digest.hexdigest() == "b861e09c25db896a5bf1a488c8fcfb687813d01c4ebc9ed5ffb62bdf8feec98e"


def test_swap_is_a_pure_function_of_meta(scenes):
    caption, meta = next((c, m) for c, m in scenes if m["kind"] == "three")
    assert binding_swap(json.loads(json.dumps(meta))) == binding_swap(meta)


# ---- the statistics --------------------------------------------------------------------------------------

def test_sign_test_equals_the_brute_force_binomial_tails():
    from itertools import product

    for n in range(1, 11):
        outcomes = Counter(sum(flips) for flips in product((0, 1), repeat=n))  # every coin sequence, equally likely
        for wins in range(n + 1):
            extreme = abs(wins - n / 2)
            brute = sum(c for k, c in outcomes.items() if abs(k - n / 2) >= extreme) / 2 ** n
            assert bt.sign_test(wins, n - wins) == pytest.approx(brute, abs=1e-12)
    assert bt.sign_test(0, 0) == 1.0
    assert 0 < bt.sign_test(1500, 1000) < 1e-20  # large n: exact integers, no underflow to nonsense


def test_wilson_interval_covers_the_true_accuracy_at_the_nominal_rate():
    generator = torch.Generator().manual_seed(0)
    for p, n in ((0.5, 40), (0.8, 200), (0.95, 300)):
        draws = (torch.rand(4000, n, generator=generator) < p).double().mean(1)
        covered = [low <= p <= high for low, high in (bt.wilson_interval(float(a), n) for a in draws)]
        assert 0.93 <= sum(covered) / len(covered) <= 0.975, (p, n)  # Wilson: close to 95 %, never far below
    assert bt.wilson_interval(1.0, 10)[1] == 1.0 and bt.wilson_interval(0.0, 10)[0] == 0.0


def test_the_sign_test_holds_its_size_under_chance():
    generator = torch.Generator().manual_seed(1)
    wins = (torch.rand(4000, 60, generator=generator) < 0.5).sum(1).tolist()
    rejected = sum(bt.sign_test(w, 60 - w) < 0.05 for w in wins) / len(wins)
    assert 0.02 < rejected <= 0.05 + 0.01  # exact test: at most its level, up to simulation error


def test_choice_scores_wins_losses_and_round_off_ties():
    p = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    true = torch.tensor([[1.0, 0.1], [0.0, 1.0], [1.0, 0.5]])
    swapped = torch.tensor([[0.0, 1.0], [1.0, 0.1], [1.0, 0.5 + 1e-9]])
    assert bt.choice_scores(p, true, swapped).tolist() == [1.0, 0.0, 0.5]
    summary = bt.summarise(bt.choice_scores(p, true, swapped))
    assert (summary["wins"], summary["losses"], summary["ties"], summary["accuracy"]) == (1, 1, 1, 0.5)
    with pytest.raises(ValueError, match="one shape"):
        bt.choice_scores(p, true[:2], swapped)


# ---- a planted problem ------------------------------------------------------------------------------------

VOCABULARY = sorted({w for c, _ in _scenes(300) for w in c.split()} | {"from", "left", "right", "to", "of",
                                                                       "the", "and", "above", "below"})


def structured(caption):
    """Features that bind: per mention slot, one-hot count / size / colour / shape, plus the relation."""
    from prh_stitch.data.scenes import COLOURS, SIZE_RADIUS

    objects, relation, _ = parse(caption)
    slots = []
    for slot in range(3):
        one = [0.0] * (3 + 2 + len(COLOURS) + len(SHAPES))
        if slot < len(objects):
            count, size, colour, shape = objects[slot]
            for offset, index in ((0, count - 1), (3, list(SIZE_RADIUS).index(size)),
                                  (5, list(COLOURS).index(colour)), (5 + len(COLOURS), SHAPES.index(shape))):
                one[offset + index] = 1.0
        slots += one
    relations = [None, "to the left of", "to the right of", "above", "below", "left to right"]
    return slots + [float(relation == r) for r in relations]


def bag_of_words(caption):
    counts = Counter(caption.split())
    return [float(counts[w]) for w in VOCABULARY]


@pytest.fixture(scope="module")
def planted_scenes():
    """(caption, meta) of train / val / test scenes of the planted problem."""
    return [[generate_scene(np.random.default_rng([5, index, i]), 16, hold_out=index == 0)[1:] for i in range(n)]
            for index, n in enumerate((600, 200, 400))]


def planted(text_features, scenes, noise=0.05):
    """Image features = a fixed random mixing of the binding features plus noise; text features by ``text_features``."""
    generator = torch.Generator().manual_seed(2)
    mixing = torch.randn(len(structured("a small red circle on a gray background")), 48, generator=generator)

    def split(index, _):
        rows = scenes[index]
        image = torch.tensor([structured(c) for c, _ in rows]) @ mixing
        image = image + noise * torch.randn(image.shape, generator=generator)
        return rows, image, torch.tensor([text_features(c) for c, _ in rows])

    (_, xt, yt), (val_rows, xv, yv), (test_rows, xs, _) = split(0, 600), split(1, 200), split(2, 400)
    keep = [i for i, (_, meta) in enumerate(test_rows) if binding_swap(meta) is not None]
    true = torch.tensor([text_features(test_rows[i][0]) for i in keep])
    swapped = torch.tensor([text_features(swapped_caption(test_rows[i][1])) for i in keep])
    attributes = [binding_swap(test_rows[i][1]).attribute for i in keep]
    return bt.binding_accuracy((xt, yt), (xv, yv), [c for c, _ in val_rows], xs[keep], true, swapped, attributes)


def test_features_that_bind_choose_the_true_caption(planted_scenes):
    result = planted(structured, planted_scenes)
    assert result["n"] > 150 and result["accuracy"] > 0.97 and result["ci_low"] > 0.9 and result["p_chance"] < 1e-20
    assert set(result["by_attribute"]) <= {"colour", "size", "shape"} and result["fit"]["n_train"] == 600
    assert sum(s["n"] for s in result["by_attribute"].values()) == result["n"]


def test_a_bag_of_words_text_side_is_exactly_at_chance(planted_scenes):
    result = planted(bag_of_words, planted_scenes)
    assert result["ties"] == result["n"] > 150 and result["accuracy"] == 0.5 and result["p_chance"] == 1.0
    assert result["ci_low"] < 0.5 < result["ci_high"]


# ---- the study's hook ---------------------------------------------------------------------------------------

def test_the_study_writes_the_binding_table_fitted_on_train_only(tmp_path, monkeypatch):
    import csv

    from prh_stitch.alignment.binding_report import scene_split_urls
    from prh_stitch.alignment.study import run_study
    from prh_stitch.alignment.study_config import BindingBlock, ScenesData
    from prh_stitch.data.features import FeatureStore
    from prh_stitch.encoders import build_encoder

    config = {"vision": ["tiny_vit"], "text": ["tiny_bert", {"name": "random:tiny_bert", "pooling": "mean"}],
              "data": [{"name": "scenes", "scenes": {"n": 48, "n_train": 96, "image_size": 32}}],
              "metrics": ["mutual_knn"], "k": 5, "permutations": 3, "bootstrap": 4, "max_null": 1, "half_samples": 4,
              "stability_halves": 0, "knn_k": [], "knn_n": [], "binding": {"n_test": 40, "n_train": 64},
              "cache_dir": str(tmp_path / "cache"), "device": "cpu"}
    fits = []
    original = bt.fit_closed_form
    monkeypatch.setattr(bt, "fit_closed_form", lambda s, train, *a, **k: fits.append((train, k["val"])) or
                        original(s, train, *a, **k))
    summary = run_study(config, out=str(tmp_path / "first"), progress=False)
    table = summary["datasets"][0]["binding"]
    assert [(r["vision"], r["text"]) for r in table["rows"]] == [("tiny_vit", "tiny_bert"),
                                                                 ("tiny_vit", "random:tiny_bert")]
    urls = scene_split_urls(BindingBlock(n_test=40, n_train=64), ScenesData(n=48, n_train=96, image_size=32), tmp_path / "cache")
    choices = bt.swap_choices(urls["test"])
    vit = build_encoder("tiny_vit")
    store = FeatureStore(tmp_path / "cache" / "features")
    rows = {s: store.get(vit, urls[s], [vit.num_layers - 1], None, progress=False) for s in ("train", "val")}
    assert len(fits) == 2 and len(rows["train"]) == 64 and len(rows["val"]) == 48  # binding's n_train, block's n
    for (x, _), (val_x, _) in fits:  # the stitcher saw exactly the training split's rows; val only for its choices
        assert torch.equal(x, bt.split_rows(rows["train"])[1]) and torch.equal(val_x, bt.split_rows(rows["val"])[1])
    for r in table["rows"]:
        assert r["n"] == len(choices) > 10 and r["n_train"] == 64 and r["n_val"] == 48
        assert r["ci_low"] <= r["accuracy"] <= r["ci_high"] and r["wins"] + r["losses"] + r["ties"] == r["n"]
        assert r["vision_layer"] == vit.layer_names[-1]
    folder = tmp_path / "first" / "scenes"
    with open(folder / "binding.csv", newline="") as handle:
        assert [float(r["accuracy"]) for r in csv.DictReader(handle)] == [r["accuracy"] for r in table["rows"]]
    markdown = (folder / "binding.md").read_text()
    assert "Wilson" in markdown and "fitted on the train split" in markdown and "chance 0.5" in markdown
    assert (folder / "binding.png").is_file() and json.loads((folder / "binding.json").read_text())["rows"]
    # A rerun reads features and results back: no encoder runs, no caption is encoded again.
    monkeypatch.setattr(FeatureStore, "_extract", lambda *a, **k: pytest.fail("an encoder ran on a warm store"))
    monkeypatch.setattr(bt, "encode_captions", lambda *a, **k: pytest.fail("captions encoded again"))
    again = run_study(config, out=str(tmp_path / "again"), progress=False)
    assert again["datasets"][0]["binding"]["rows"] == table["rows"]


def test_binding_config_is_checked(tmp_path):
    from prh_stitch.alignment.study_config import load_config
    from prh_stitch.errors import UserError

    base = {"vision": ["tiny_vit"], "text": ["tiny_bert"], "data": [{"name": "s", "scenes": {"n": 8}}]}
    assert load_config(base).binding is None and load_config({**base, "binding": {}}).binding.n_test == 1024
    for bad in ({"n_test": 0}, {"n_train": 0}, {"n_val": -1}):
        with pytest.raises(UserError, match="binding.n_test, n_train and n_val must be >= 1"):
            load_config({**base, "binding": bad})
    with pytest.raises(UserError, match="n_tset"):
        load_config({**base, "binding": {"n_tset": 5}})
