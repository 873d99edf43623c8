"""The cache's inventory and pruning by last use (prh_stitch/cache_inventory.py, `python -m prh_stitch.data cache|prune`)."""

import json
import os
import time
from pathlib import Path

import pytest
import torch

from prh_stitch.alignment.score_cache import ScoreCache
from prh_stitch.cache_inventory import DAY, _Item, _remove, cache_inventory, entry_last_used, prune_cache
from prh_stitch.cli.data import main as data_main
from prh_stitch.data.features import FeatureStore
from prh_stitch.data.shards import expand_urls, write_shards
from prh_stitch.data.sources import scenes
from prh_stitch.data.store_safety import entry_lock
from prh_stitch.encoders import build_encoder
from prh_stitch.errors import UserError
from prh_stitch.figure_cache import FigureCache
from prh_stitch.last_used import ENTRY_MARKER


def _age(path: Path, days: float) -> None:
    """Make ``path`` look last used ``days`` ago."""
    when = time.time() - days * DAY
    os.utime(path, (when, when))


@pytest.fixture()
def cache(tmp_path):
    """A cache folder with two feature entries (one encoder, two data sets), two scores, two figures, and an input
    folder (scenes) that pruning must never touch."""
    root = tmp_path / "cache"
    urls = []
    for i in range(2):
        manifest = write_shards(scenes(6, seed=i, size=16), root / "scenes" / f"set{i}", prefix="train")
        urls.append(expand_urls(str(root / "scenes" / f"set{i}" / manifest["pattern"])))
    store = FeatureStore(root / "features")
    encoder = build_encoder("tiny_vit")
    entries = [Path(store.get(encoder, u, progress=False).info["entry"]) for u in urls]
    scores = ScoreCache(root / "scores")
    for key in ("a" * 24, "b" * 24):
        scores.put(key, {"score": 0.5})
    figures = FigureCache(root / "figures")
    for key in ("c" * 64, "d" * 64):
        figures.put(key, {".png": b"png bytes", ".pdf": b"pdf bytes"})
    return root, store, encoder, urls, entries


def _tree_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def test_the_inventory_lists_every_folder_and_entry_with_its_true_size(cache):
    root, _, _, _, entries = cache
    report = cache_inventory(str(root))
    assert set(report["folders"]) == {"features", "scenes", "scores", "figures"}
    for name, folder in report["folders"].items():
        assert folder["bytes"] == _tree_bytes(root / name) and folder["prunable"] == (name != "scenes")
    assert report["bytes"] == _tree_bytes(root)
    assert [report["folders"][n]["items"] for n in ("features", "scores", "figures")] == [2, 2, 2]
    listed = {e["entry"]: e for e in report["features"]}
    assert set(listed) == {e.name for e in entries}
    for entry in entries:
        record = listed[entry.name]
        assert record["complete"] and record["encoder"] == "tiny_vit" and record["samples"] == 6
        assert record["bytes"] == _tree_bytes(entry) and record["shards"] == 1
        assert "unreadable" not in record


def test_every_cache_hit_records_its_use(cache):
    root, store, encoder, urls, entries = cache
    _age(entries[0] / ENTRY_MARKER, 40)
    score = root / "scores" / f"{'a' * 24}.json"
    figure = root / "figures" / f"{'c' * 64}.json"
    _age(score, 40)
    _age(figure, 40)
    before = time.time() - 60
    store.get(encoder, urls[0], progress=False)
    assert store.hits == 1 and entry_last_used(entries[0]) > before
    assert ScoreCache(root / "scores").get("a" * 24) == {"score": 0.5} and score.stat().st_mtime > before
    assert FigureCache(root / "figures").get("c" * 64) is not None and figure.stat().st_mtime > before
    assert ScoreCache(root / "scores").get("e" * 24) is None  # a miss records nothing and fails nothing


def test_pruning_deletes_exactly_what_was_not_used_and_it_comes_back_the_same(cache):
    root, store, encoder, urls, entries = cache
    features_before = store.get(encoder, urls[1], progress=False).features
    _age(entries[1] / ENTRY_MARKER, 40)
    _age(root / "scores" / f"{'b' * 24}.json", 40)
    _age(root / "figures" / f"{'d' * 64}.json", 40)
    sizes = (_tree_bytes(entries[1]) + (root / "scores" / f"{'b' * 24}.json").stat().st_size
             + sum((root / "figures" / f"{'d' * 64}{s}").stat().st_size for s in (".json", ".png", ".pdf")))
    untouched = {p: p.read_bytes() for p in (root / "scenes").rglob("*") if p.is_file()}

    dry = prune_cache(30, str(root), dry_run=True)
    assert dry["removed"] == {"features": [entries[1].name], "scores": ["b" * 24], "figures": ["d" * 64]}
    assert dry["freed_bytes"] == sizes and entries[1].is_dir()  # a dry run deletes nothing

    report = prune_cache(30, str(root))
    assert report["removed"] == dry["removed"] and report["freed_bytes"] == sizes and report["in_use"] == []
    assert not entries[1].exists() and entries[0].is_dir()
    assert sorted(p.name for p in (root / "scores").iterdir()) == [f"{'a' * 24}.json"]
    assert sorted(p.name for p in (root / "figures").iterdir()) == [f"{'c' * 64}{s}" for s in (".json", ".pdf", ".png")]
    assert {p: p.read_bytes() for p in (root / "scenes").rglob("*") if p.is_file()} == untouched
    assert ScoreCache(root / "scores").get("b" * 24) is None and FigureCache(root / "figures").get("d" * 64) is None

    extractions = store.extractions
    again = store.get(encoder, urls[1], progress=False)  # computed again, identically
    assert store.extractions == extractions + 1
    for name, tensor in features_before.items():
        torch.testing.assert_close(again.features[name], tensor, rtol=0, atol=0)


def test_an_entry_in_use_is_left_alone_and_only_the_folders_asked_for_are_pruned(cache):
    root, _, _, _, entries = cache
    for entry in entries:
        _age(entry / ENTRY_MARKER, 40)
    _age(root / "scores" / f"{'a' * 24}.json", 40)
    with entry_lock(entries[0]):  # another extraction or reader holds it
        report = prune_cache(30, str(root), only=["features"])
    assert report["in_use"] == [entries[0].name] and report["removed"] == {"features": [entries[1].name]}
    assert entries[0].is_dir() and (root / "scores" / f"{'a' * 24}.json").is_file()
    # An unfinished extraction goes by its newest file: kept while recent, pruned once that file is old.
    unfinished = root / "features" / "unfinished"
    (unfinished / "parts").mkdir(parents=True)
    (unfinished / "parts" / "s000000-b000000.safetensors").write_bytes(b"x")
    assert entry_last_used(unfinished) > time.time() - 60
    assert prune_cache(1, str(root))["removed"]["features"] == [entries[0].name]  # no longer held: pruned now
    for path in (unfinished / "parts" / "s000000-b000000.safetensors", unfinished / "parts", unfinished):
        _age(path, 5)
    assert prune_cache(1, str(root))["removed"]["features"] == ["unfinished"]


def test_bad_requests_are_one_line_errors(cache, tmp_path, capsys):
    root = cache[0]
    with pytest.raises(UserError, match=r"--unused-days must be a number of days >= 0"):
        prune_cache(-1, str(root))
    with pytest.raises(UserError, match=r"cannot prune \['zoo'\]: choose from features, scores, figures"):
        prune_cache(3, str(root), only=["zoo"])
    with pytest.raises(UserError, match="no cache folder at"):
        cache_inventory(str(tmp_path / "missing"))
    for argv in (["prune", "--unused-days", "-1", "--root", str(root)],
                 ["prune", "--unused-days", "3", "--only", "zoo", "scores", "--root", str(root)],
                 ["cache", "--root", str(tmp_path / "missing")]):
        assert data_main(argv) == 2
        out, err = capsys.readouterr()
        assert out == "" and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_the_commands_print_the_reports(cache, capsys):
    root, _, _, _, entries = cache
    _age(entries[0] / ENTRY_MARKER, 10)
    assert data_main(["cache", "--root", str(root)]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed == cache_inventory(str(root))
    assert data_main(["prune", "--unused-days", "7", "--only", "features", "scores", "--dry-run", "--root",
                      str(root)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["dry_run"] and report["removed"] == {"features": [entries[0].name], "scores": []}
    assert entries[0].is_dir()


def _aged_items(root: Path, entries) -> list:
    """Give the six prunable items distinct last uses (the oldest first in the returned list) with their sizes."""
    items = [("figures", "d" * 64, [root / "figures" / f"{'d' * 64}{s}" for s in (".json", ".png", ".pdf")]),
             ("features", entries[1].name, [entries[1]]),
             ("scores", "a" * 24, [root / "scores" / f"{'a' * 24}.json"]),
             ("features", entries[0].name, [entries[0]]),
             ("figures", "c" * 64, [root / "figures" / f"{'c' * 64}{s}" for s in (".json", ".png", ".pdf")]),
             ("scores", "b" * 24, [root / "scores" / f"{'b' * 24}.json"])]
    aged = []
    for days, (folder, name, paths) in zip((50, 40, 30, 20, 10, 5), items):
        _age(paths[0] / ENTRY_MARKER if folder == "features" else paths[0], days)
        size = sum(_tree_bytes(p) if p.is_dir() else p.stat().st_size for p in paths)
        aged.append((folder, name, size))
    return aged


def test_a_size_budget_deletes_the_least_recently_used_until_the_cache_fits(cache):
    root, _, _, _, entries = cache
    aged = _aged_items(root, entries)
    total = _tree_bytes(root)
    inputs = _tree_bytes(root / "scenes")
    # Brute force: the budget is met by deleting the shortest oldest-first prefix that brings the total under it.
    cuts = [total - sum(size for _, _, size in aged[:k]) for k in range(len(aged) + 1)]
    for budget in sorted({c + d for c in cuts for d in (-1, 0, 1)} | {0, inputs, total * 2}):
        k = next((k for k, c in enumerate(cuts) if c <= budget), len(aged))
        report = prune_cache(root=str(root), max_gb=budget / 1e9, dry_run=True)
        expected = {name: [n for f, n, _ in aged[:k] if f == name] for name in ("features", "scores", "figures")}
        assert report["removed"] == expected, budget
        assert report["freed_bytes"] == total - cuts[k] and report["bytes_after"] == cuts[k]
        assert report["fits"] == (cuts[k] <= budget) and report["in_use"] == []
    assert _tree_bytes(root) == total  # dry runs delete nothing

    # Real: a budget that needs the three oldest gone; the age rule alone would take only the two oldest.
    with entry_lock(entries[1]):  # the second oldest is in use: left alone, and the next oldest goes instead
        report = prune_cache(35, str(root), max_gb=cuts[3] / 1e9)
    assert report["in_use"] == [entries[1].name] and entries[1].is_dir()
    assert report["removed"] == {"figures": ["d" * 64], "features": [entries[0].name], "scores": ["a" * 24]}
    assert report["bytes_after"] == _tree_bytes(root) == total - aged[0][2] - aged[2][2] - aged[3][2]
    assert report["fits"] == (report["bytes_after"] <= cuts[3])

    # Nothing prunable can bring the cache under its inputs: everything goes and the report says it does not fit.
    report = prune_cache(root=str(root), max_gb=0)
    assert report["fits"] is False and report["bytes_after"] == _tree_bytes(root) == inputs


def test_the_size_rule_through_the_command_line(cache, capsys):
    root, _, _, _, entries = cache
    aged = _aged_items(root, entries)
    total = _tree_bytes(root)
    budget = (total - aged[0][2]) / 1e9
    assert data_main(["prune", "--max-gb", str(budget), "--root", str(root)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["removed"]["figures"] == ["d" * 64] and report["fits"] is True
    assert report["removed"]["features"] == [] and report["removed"]["scores"] == []
    for argv, problem in ((["prune", "--root", str(root)], "say what to prune"),
                          (["prune", "--max-gb", "-2", "--root", str(root)], "--max-gb must be a number")):
        assert data_main(argv) == 2
        out, err = capsys.readouterr()
        assert out == "" and len(err.strip().splitlines()) == 1 and problem in err


def test_pruning_deletes_only_the_items_own_files_and_a_file_gone_meanwhile_is_no_error(cache):
    root = cache[0]
    stray = root / "scores" / f"{'b' * 24}.png"  # not part of the score record (figures have .png files, scores not)
    stray.write_bytes(b"someone else's")
    report = prune_cache(0, str(root), only=["scores"])
    assert sorted(report["removed"]["scores"]) == ["a" * 24, "b" * 24] and stray.read_bytes() == b"someone else's"
    # Another prune (or a repair) deleted the files between the listing and the deletion: nothing to do, no error.
    gone = _Item("figures", "e" * 64, 0.0, (root / "figures" / "gone.json", root / "figures" / "gone.png"))
    assert _remove(gone, dry_run=False) == 0


def test_hidden_folders_and_loose_files_are_neither_listed_nor_counted_as_folders(cache):
    root = cache[0]
    (root / ".tmp").mkdir()
    (root / ".tmp" / "half-written").write_bytes(b"x" * 100)
    (root / "notes.txt").write_text("a file beside the folders")
    report = cache_inventory(str(root))
    assert set(report["folders"]) == {"features", "scenes", "scores", "figures"}
    assert report["bytes"] == sum(_tree_bytes(root / name) for name in report["folders"])


def test_asking_for_no_rule_names_both(cache):
    with pytest.raises(UserError) as raised:
        prune_cache(root=str(cache[0]))
    assert str(raised.value) == ("say what to prune: --unused-days N (not used for N days), --max-gb G (least "
                                 "recently used until the cache holds G gigabytes), or both")


def test_the_prune_report_states_its_rules(cache):
    from datetime import datetime

    root = cache[0]
    before = time.time()
    report = prune_cache(30, str(root), dry_run=True, max_gb=2)
    cutoff = datetime.fromisoformat(report["cutoff"]).timestamp()
    assert report["root"] == str(root) and report["unused_days"] == 30 and report["dry_run"] is True
    assert before - 30 * DAY - 1 <= cutoff <= time.time() - 30 * DAY
    assert report["max_bytes"] == 2_000_000_000 and report["fits"] is True  # gigabytes of 10^9 bytes
    only_size = prune_cache(root=str(root), dry_run=True, max_gb=0.5)
    assert only_size["unused_days"] is None and only_size["cutoff"] is None and only_size["max_bytes"] == 500_000_000
    only_age = prune_cache(7, str(root), dry_run=True)
    assert only_age["max_bytes"] is None and only_age["fits"] is None and only_age["bytes_after"] is None
