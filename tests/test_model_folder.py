"""A trained stitcher as a model folder: train.py writes it, load_stitcher and HubStitcher.from_pretrained read it
(bit-identical to the checkpoint), its card names encoders, data and test scores, and nothing is unpickled."""

import json
import shutil
from pathlib import Path

import pytest
import torch

import prh_stitch
from prh_stitch.cli import main
from prh_stitch.model_folder import CONFIG_NAME, WEIGHTS_NAME, HubStitcher

CONFIGS = Path(prh_stitch.__file__).resolve().parent / "configs"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """``train.py --config configs/tiny.yaml``, shrunk as tests/test_train.py does (one epoch)."""
    root = tmp_path_factory.mktemp("run")
    code = main(["--config", str(CONFIGS / "tiny.yaml"), "--trainer.default_root_dir", str(root),
                 "--trainer.enable_progress_bar=false", "--trainer.max_epochs", "2"])
    assert code == 0
    (last,) = root.glob("**/last.ckpt")
    (best,) = root.glob("**/best-*.ckpt")
    return root, last, best


def _features(stitcher, n=37, seed=1):
    return torch.randn(n, stitcher.in_dim, generator=torch.Generator().manual_seed(seed))


def test_train_leaves_a_folder_of_json_safetensors_and_a_card_next_to_last_ckpt(run):
    _, last, _ = run
    folder = last.parent / "stitcher"
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", CONFIG_NAME, WEIGHTS_NAME]
    config = json.loads((folder / CONFIG_NAME).read_text())
    assert config["stitcher"]["name"] == "linear" and config["stitcher"]["input_norm"] == "standard"
    assert config["source"]["name"] == "tiny_vit" and config["target"]["name"] == "tiny_bert"
    assert len(config["source_fingerprint"]) == 20 and config["source_fingerprint"] != config["target_fingerprint"]
    assert set(config["data"]) >= {"train", "val", "test"}


def test_folder_loads_bit_identically_to_the_selected_checkpoint(run):
    _, last, best = run
    folder = last.parent / "stitcher"
    from_checkpoint = prh_stitch.load_stitcher(best)
    x = _features(from_checkpoint)
    expected = from_checkpoint(x)
    for loaded in (prh_stitch.load_stitcher(folder), HubStitcher.from_pretrained(folder)):
        assert isinstance(loaded, HubStitcher) and not loaded.training
        assert torch.equal(loaded(x), expected)
        for key, value in from_checkpoint.state_dict().items():
            assert torch.equal(loaded.state_dict()[key], value), key
        assert loaded.source_spec == from_checkpoint.source_spec and loaded.target_spec == from_checkpoint.target_spec
        assert (loaded.source_layer, loaded.target_layer) == (from_checkpoint.source_layer,
                                                              from_checkpoint.target_layer)


def test_model_card_names_encoders_data_objective_and_the_test_scores_of_test_json(run):
    _, last, best = run
    card = (last.parent / "stitcher" / "README.md").read_text()
    test = json.loads((best.parent / "test.json").read_text())
    config = json.loads((last.parent / "stitcher" / CONFIG_NAME).read_text())
    assert card.startswith("---\n") and "library_name: prh_stitch" in card
    assert "`tiny_vit`" in card and "`tiny_bert`" in card
    assert config["source_fingerprint"] in card
    for split in ("train", "val", "test"):
        assert f"`{config['data'][split]}`" in card
    assert "Objective `contrastive`" in card
    overall = test["retrieval"]["subsets"]["all"]
    row = next(line for line in card.splitlines() if line.startswith("| all |"))
    assert f"{overall['a2b/recall@1']:.4f}" in row and f"{overall['chance@1']:.4f}" in row
    assert config["test"]["checkpoint"] == str(best)


def test_save_pretrained_round_trip_and_a_resave_rewrites_the_card(run, tmp_path):
    _, last, _ = run
    stitcher = HubStitcher.from_pretrained(last.parent / "stitcher")
    stitcher.folder_config = {**stitcher.folder_config, "test": None}
    stitcher.save_pretrained(tmp_path / "again")
    stitcher.save_pretrained(tmp_path / "again")  # an existing README.md is replaced, not kept
    assert "No test scores were recorded" in (tmp_path / "again" / "README.md").read_text()
    x = _features(stitcher)
    assert torch.equal(HubStitcher.from_pretrained(tmp_path / "again")(x), stitcher(x))


def test_a_hub_id_loads_from_the_hub_cache_offline(run, tmp_path, monkeypatch):
    """A Hub repository as huggingface_hub caches it (models--owner--name/snapshots/<commit>/, refs/main), read with
    HF_HUB_OFFLINE=1: the same files reach the same loader; nothing remote is contacted or faked."""
    _, last, _ = run
    commit = "0" * 40
    repo = tmp_path / "hub" / "models--someone--tiny-stitcher"
    shutil.copytree(last.parent / "stitcher", repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    from_folder = prh_stitch.load_stitcher(last.parent / "stitcher")
    loaded = prh_stitch.load_stitcher("someone/tiny-stitcher", cache_dir=str(tmp_path / "hub"))
    x = _features(loaded)
    assert torch.equal(loaded(x), from_folder(x))


def test_folders_without_a_stitcher_config_or_weights_are_refused_clearly(run, tmp_path):
    _, last, _ = run
    empty = tmp_path / "not_a_stitcher"
    empty.mkdir()
    (empty / CONFIG_NAME).write_text(json.dumps({"hidden_size": 3}))
    with pytest.raises(ValueError, match="not a prh_stitch stitcher folder"):
        prh_stitch.load_stitcher(empty)
    no_weights = tmp_path / "no_weights"
    shutil.copytree(last.parent / "stitcher", no_weights)
    (no_weights / WEIGHTS_NAME).unlink()
    with pytest.raises(FileNotFoundError, match="has no model.safetensors"):
        prh_stitch.load_stitcher(no_weights)
    newer = tmp_path / "newer"
    shutil.copytree(last.parent / "stitcher", newer)
    config = json.loads((newer / CONFIG_NAME).read_text())
    (newer / CONFIG_NAME).write_text(json.dumps({**config, "format": 99}))
    with pytest.raises(ValueError, match="newer than this prh_stitch reads"):
        prh_stitch.load_stitcher(newer)


def test_loading_a_folder_never_unpickles(run, monkeypatch):
    _, last, _ = run
    import pickle

    def refuse(*args, **kwargs):
        raise AssertionError("a stitcher folder was unpickled")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    prh_stitch.load_stitcher(last.parent / "stitcher")


def test_a_path_that_is_neither_local_nor_on_the_hub_names_both_readings(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError, match="neither a local checkpoint or stitcher folder nor a Hub repository"):
        prh_stitch.load_stitcher("runs/no_such_stitcher", cache_dir=str(tmp_path / "empty_cache"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        prh_stitch.load_stitcher(tmp_path / "no_such.ckpt")
