"""The StitchingDataModule: stitching features served from the memory-mapped store (the StreamingDataModule's
tests are in test_data_streaming.py)."""

import logging
from pathlib import Path

import pytest
import torch

from prh_stitch.data.datamodule import FeatureRequest, StitchingDataModule, shard_captions
from prh_stitch.encoders import build_encoder
from test_features import mapped_ranges, whole_shards

# The shared fixtures of test_features, by name, so pytest finds them here too.
from test_features import dataset, tiny_vit  # noqa: F401  (pytest fixtures)


@pytest.fixture(scope="module")
def tiny_bert():
    return build_encoder("tiny_bert")


# -- stitching features from the store ------------------------------------------------------------------


def test_stitching_datamodule_serves_memory_mapped_features_and_reports_skips(tmp_path, dataset, tiny_vit, tiny_bert, caplog):
    urls, good, skips = whole_shards(dataset)  # the store never commits the fixture's cut and unreadable shards
    dm = StitchingDataModule(train=",".join(urls), val=urls[0], test=urls[1], cache_dir=str(tmp_path), batch_size=5)
    source, target = FeatureRequest(tiny_vit, -1), FeatureRequest(tiny_bert, -1, "mean")
    dm.prepare_features([source, target], "cpu")
    assert dm.store.extractions == 0  # extraction waits for setup, where every rank can share it
    with caplog.at_level(logging.INFO):
        dm.setup_features(source, target)
    assert dm.store.extractions == 6  # two encoders, three splits
    assert dm.skipped == {"train": skips, "val": {}, "test": {}}
    per_shard = [sum(1 for shard, _ in good.values() if shard == i) for i in (0, 1)]
    assert [len(dm.datasets[split]) for split in ("val", "test")] == per_shard
    assert dm.captions["test"] == [dm.feature_sets[("test", "source")].captions[i] for i in range(per_shard[1])]
    assert any("train: 14 pairs" in r.getMessage() and "skipped 3" in r.getMessage() for r in caplog.records)

    src, tgt, index, groups = dm.datasets["train"].tensors
    entry = Path(dm.feature_sets[("train", "source")].info["entry"])
    assert any(lo <= src.data_ptr() < hi for lo, hi in mapped_ranges(entry / "layer-0.npy")), "source rows were copied"
    assert src.shape == (len(good), 64) and tgt.shape == (len(good), 32)
    assert len(set(groups.tolist())) == len(good)  # every caption is distinct

    rows = []
    for batch in dm.train_dataloader():
        s, t, i, g = batch
        assert torch.equal(s, src[i]) and torch.equal(t, tgt[i]) and torch.equal(g, groups[i])
        rows += i.tolist()
    assert sorted(rows) == list(range(len(good)))
    source_train, target_train = dm.training_tensors()
    assert source_train is src and target_train is tgt

    again = StitchingDataModule(train=",".join(urls), val=urls[0], test=urls[1], cache_dir=str(tmp_path))
    again.setup_features(source, target)
    assert again.store.extractions == 0 and again.store.hits == 6 and again.skipped == dm.skipped
    # Seen captions: the training split's, read from the store in cached mode and from the shards without
    # decoding an image in stream mode (its training split is never extracted); the same set either way.
    # The one difference: a sample whose image does not decode keeps its caption in the shard read.
    assert dm.train_captions() == frozenset(dm.captions["train"])
    assert frozenset(shard_captions(urls)) == dm.train_captions() | {"shard 2 sample 1"}


def test_splits_are_all_given_or_all_built_in_and_test_is_its_own_data(tmp_path):
    with pytest.raises(ValueError, match="all of the 'train', 'val' and 'test' shard patterns, or none"):
        StitchingDataModule(train="a.tar", val="b.tar", cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="test split must be its own shards"):
        StitchingDataModule(train="a.tar", val="b.tar", test="b.tar", cache_dir=str(tmp_path))
