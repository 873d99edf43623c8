"""The DataModules: stitching features served from the memory-mapped store, and raw streaming batches
(exactly once over 2 DDP ranks x 2 workers, resampled epochs, per-encoder preprocessing, visible skip counts).
"""

import json
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from prh_stitch.data.datamodule import FeatureRequest, StitchingDataModule, StreamingDataModule
from prh_stitch.data.stream import SkipStats
from prh_stitch.data.streaming import Batcher, ResampledShards, StreamLoader
from prh_stitch.encoders import build_encoder
from test_features import mapped_ranges, scene

# The shared fixtures of test_features, by name, so pytest finds them here too.
from test_features import dataset, tiny_vit  # noqa: F401  (pytest fixtures)


@pytest.fixture(scope="module")
def tiny_bert():
    return build_encoder("tiny_bert")


# -- streaming: exactly once across 2 ranks x 2 workers --------------------------------------------------


def _stream_on_rank(rank, world, rendezvous, patterns, out):
    import torch.distributed as dist

    torch.set_num_threads(1)
    torch.multiprocessing.set_start_method("fork", force=True)  # as in Lightning's DDP ranks (see test_features)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        report = {}
        for name, pattern in patterns.items():
            dm = StreamingDataModule(train=pattern, batch_size=2, num_workers=2, shuffle_buffer=3, seed=5)
            epochs, skipped = [], []
            for _ in range(2):
                epochs.append([key for batch in dm.train_dataloader() for key in batch["key"]])
                skipped.append(dm.skipped["train"])
            repeat = StreamingDataModule(train=pattern, batch_size=2, num_workers=2, shuffle_buffer=3, seed=5)
            report[name] = {"epochs": epochs, "skipped": skipped,
                            "repeat": [key for batch in repeat.train_dataloader() for key in batch["key"]]}
        Path(out, f"stream{rank}.json").write_text(json.dumps(report))
    finally:
        dist.destroy_process_group()


def test_two_ranks_with_two_workers_each_get_every_sample_exactly_once_per_epoch(tmp_path, dataset):
    urls, good, skips = dataset
    # 5 shards for 4 consumers: whole shards are split; 2 shards: samples are split within shards.
    patterns = {"by_shard": ",".join(urls), "by_sample": ",".join(urls[:2])}
    torch.multiprocessing.spawn(_stream_on_rank, args=(2, str(tmp_path / "rendezvous"), patterns, str(tmp_path)), nprocs=2)
    ranks = [json.loads((tmp_path / f"stream{r}.json").read_text()) for r in range(2)]
    for name, expected_skips in (("by_shard", skips), ("by_sample", {})):
        expected = sorted(k for k in good if name == "by_shard" or k.startswith(("s0", "s1")))
        for epoch in range(2):
            together = [key for r in ranks for key in r[name]["epochs"][epoch]]
            assert sorted(together) == expected, (name, epoch)  # the union is the data, and nothing twice
            summed = sum((Counter(r[name]["skipped"][epoch]) for r in ranks), Counter())
            assert summed == Counter({k: v * (epoch + 1) for k, v in expected_skips.items()})
        for r in ranks:
            assert r[name]["repeat"] == r[name]["epochs"][0]  # same seed and epoch: same order
        assert any(r[name]["epochs"][0] != r[name]["epochs"][1] for r in ranks)  # a new epoch reshuffles


# -- resampled epochs ------------------------------------------------------------------------------------


def test_resampled_epochs_have_a_fixed_length_and_the_same_number_of_batches_on_every_rank(dataset):
    urls, good, _ = dataset
    pattern = ",".join(urls)
    per_rank = {}
    for rank in range(2):
        stream = ResampledShards(pattern, epoch_length=11, rank=rank, world_size=2, split_by_node=True,
                                 shuffle_buffer=4, seed=1)
        loader = StreamLoader(Batcher(stream, 2, stats=stream.stats), SkipStats(), epoch=lambda: 0, num_workers=2)
        batches = list(loader)
        per_rank[rank] = [key for batch in batches for key in batch["key"]]
        assert len(batches) == len(loader) == 3  # 11 // 2 = 5 samples a rank: workers take 3 and 2, batches of 2
        assert len(per_rank[rank]) == 5 and set(per_rank[rank]) <= set(good)
    dm = StreamingDataModule(train=pattern, batch_size=4, num_workers=2, resampled=True, epoch_length=11, seed=2)
    epochs = []
    for _ in range(3):
        epochs.append([])
        for batch in dm.train_dataloader():
            epochs[-1] += batch["key"]
            for key, image in zip(batch["key"], batch["image"]):  # no encoder: the decoded pixels, (C, H, W)
                expected = torch.from_numpy(np.array(scene(*good[key])))
                assert image.dtype == torch.uint8 and torch.equal(image, expected.permute(2, 0, 1))
    assert [len(e) for e in epochs] == [11, 11, 11]
    again = StreamingDataModule(train=pattern, batch_size=4, num_workers=2, resampled=True, epoch_length=11, seed=2)
    assert [key for batch in again.train_dataloader() for key in batch["key"]] == epochs[0]
    assert epochs[0] != epochs[1]
    with pytest.raises(ValueError, match="give epoch_length"):
        StreamingDataModule(train=pattern, resampled=True)


def test_batches_carry_each_encoders_own_preprocessing_and_workers_skip_counts(dataset, tiny_vit, tiny_bert):
    urls, good, skips = dataset
    dm = StreamingDataModule(val=",".join(urls), batch_size=4, num_workers=2)
    dm.set_encoders({"image": tiny_vit, "text": tiny_bert})
    keys = []
    for batch in dm.val_dataloader():
        assert "image" not in batch  # preprocessed in the workers: no PIL images travel back
        for row, key in enumerate(batch["key"]):
            shard, index = good[key]
            torch.testing.assert_close(batch["inputs"]["image"][row], tiny_vit.transform(scene(shard, index)))
            ids = tiny_bert.transform(f"shard {shard} sample {index}")["input_ids"]
            assert batch["inputs"]["text"]["input_ids"][row, : len(ids)].tolist() == ids
        keys += batch["key"]
    assert sorted(keys) == sorted(good)
    assert dm.skipped["val"] == skips  # counted in two worker processes, added up here


# -- stitching features from the store ------------------------------------------------------------------


def test_stitching_datamodule_serves_memory_mapped_features_and_reports_skips(tmp_path, dataset, tiny_vit, tiny_bert, caplog):
    urls, good, skips = dataset
    dm = StitchingDataModule(train=",".join(urls), val=",".join(urls[:2]), cache_dir=str(tmp_path), batch_size=5)
    source, target = FeatureRequest(tiny_vit, -1), FeatureRequest(tiny_bert, -1, "mean")
    dm.prepare_features([source, target], "cpu")
    assert dm.store.extractions == 0  # extraction waits for setup, where every rank can share it
    with caplog.at_level(logging.INFO):
        dm.setup_features(source, target)
    assert dm.store.extractions == 4
    assert dm.skipped == {"train": skips, "val": {}}
    assert any("train: 17 pairs" in r.getMessage() and "skipped 6" in r.getMessage() for r in caplog.records)

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

    again = StitchingDataModule(train=",".join(urls), val=",".join(urls[:2]), cache_dir=str(tmp_path))
    again.setup_features(source, target)
    assert again.store.extractions == 0 and again.store.hits == 4 and again.skipped == dm.skipped


# -- the workers' ring of shared-memory slots --------------------------------------------------------------


def test_ring_ships_nested_tensors_and_reuses_a_slot_only_once_its_tensors_are_gone():
    import gc

    from prh_stitch.data.streaming import Received, _Ring

    ring, received = _Ring(worker=0, max_slots=2), Received()
    arrays = [np.full((5, 7, 3), 17, np.uint8), np.arange(2 * 3, dtype=np.uint8).reshape(2, 3, 1)]
    inputs = {"image": torch.randn(2, 3, 4, 4), "text": {"input_ids": torch.arange(6).view(2, 3),
                                                          "mask": torch.tensor([[True, False, True]] * 2)}}
    first = ring.ship(arrays, inputs)
    assert first.buffer is not None and first.busy is not None  # a slot's memory travels on its first trip only
    (flat, shapes), opened = first.unpack(received)
    assert shapes == [(5, 7, 3), (2, 3, 1)]
    assert torch.equal(flat, torch.cat([torch.from_numpy(a).flatten() for a in arrays]))
    for got, want in ((opened["image"], inputs["image"]), (opened["text"]["input_ids"], inputs["text"]["input_ids"]),
                      (opened["text"]["mask"], inputs["text"]["mask"])):
        assert got.dtype == want.dtype and torch.equal(got, want)

    # While any tensor of the first packet lives, its slot is not written: the next packet takes the other one.
    image = opened["image"]
    del flat, opened, got, want
    gc.collect()
    second = ring.ship(None, {"x": torch.ones(3)})
    assert second.slot != first.slot
    (_, x) = second.unpack(received)
    assert ring.ship(None, {"x": torch.zeros(3)}) is None  # both slots in use: no slot (the caller sends it plainly)
    assert torch.equal(image, inputs["image"])
    del image
    gc.collect()
    # Now the first slot is free: reused, named but not sent again.
    third = ring.ship(None, {"x": torch.full((3,), 2.0)})
    assert third.slot == first.slot and third.buffer is None and third.busy is None
    assert torch.equal(x["x"], torch.ones(3))
    assert torch.equal(third.unpack(received)[1]["x"], torch.full((3,), 2.0))
    del x
    gc.collect()
    # A slot that must grow is sent again, under a new generation.
    bigger = ring.ship(None, {"x": torch.arange(10_000.0)})
    assert bigger.buffer is not None and bigger.generation == 1
    assert torch.equal(bigger.unpack(received)[1]["x"], torch.arange(10_000.0))
    gc.collect()
    # A packet naming a slot this process never received is an error, not garbage.
    orphan = ring.ship(None, {"x": torch.ones(3)})
    with pytest.raises(RuntimeError, match="receive"):
        orphan.unpack(Received())


@pytest.mark.parametrize("workers", [1, 2])
def test_batches_from_workers_stay_intact_while_later_batches_arrive(dataset, tiny_vit, workers):
    urls, good, _ = dataset
    dm = StreamingDataModule(val=",".join(urls), batch_size=2, num_workers=workers)
    raw = list(dm.val_dataloader())  # every batch kept: the workers' few slots are reused many times over
    assert len(raw) > 4
    dm.set_encoders({"image": tiny_vit})
    preprocessed = list(dm.val_dataloader())
    for batch in raw:
        for key, image in zip(batch["key"], batch["image"]):
            shard, index = good[key]
            assert torch.equal(image, torch.from_numpy(np.array(scene(shard, index))).permute(2, 0, 1))
    for batch in preprocessed:
        for key, pixels in zip(batch["key"], batch["inputs"]["image"]):
            shard, index = good[key]
            assert torch.equal(pixels, tiny_vit.transform(scene(shard, index)))
    assert sorted(k for b in raw for k in b["key"]) == sorted(good)


def test_a_consumer_that_holds_packets_unopened_gets_the_rest_the_ordinary_way(dataset):
    from prh_stitch.data.stream import PairedShards

    from prh_stitch.data.streaming import receive

    urls, good, _ = dataset
    batcher = Batcher(PairedShards(urls), batch_size=1)
    loader = torch.utils.data.DataLoader(batcher, batch_size=None, num_workers=1)
    packets = [p for p in loader if p.samples]  # none opened: each keeps its slot
    assert len(packets) == len(good) > 8
    through_ring = [p.shipment is not None for p in packets]
    assert through_ring[:8] == [True] * 8 and not any(through_ring[8:])  # 8 slots at most, then plain transfer
    for packet in receive(packets, batcher.received):
        image = packet.batch()["image"][0]
        shard, index = good[packet.samples[0]["key"]]
        assert torch.equal(image, torch.from_numpy(np.array(scene(shard, index))).permute(2, 0, 1))


@pytest.mark.parametrize("workers", [0, 2])
def test_a_loader_reused_over_epochs_reshuffles_and_counts_skips_once_per_epoch(dataset, workers):
    urls, good, skips = dataset
    pattern = ",".join(urls)
    dm = StreamingDataModule(train=pattern, batch_size=3, num_workers=workers, shuffle_buffer=4, seed=2)
    loader = dm.train_dataloader()  # as Lightning does: one loader for the whole fit; workers persist
    assert loader.persistent_workers == (workers > 0)
    epochs = []
    for _ in range(2):
        epochs.append([key for batch in loader for key in batch["key"]])
        assert sorted(epochs[-1]) == sorted(good)
    assert epochs[0] != epochs[1]  # the persistent workers saw the new epoch
    assert dm.skipped["train"] == {reason: 2 * n for reason, n in skips.items()}
    # Each epoch's order depends only on the seed and the epoch: a fresh module's second pass repeats it.
    fresh = StreamingDataModule(train=pattern, batch_size=3, num_workers=workers, shuffle_buffer=4, seed=2)
    for expected in epochs:
        assert [key for batch in fresh.train_dataloader() for key in batch["key"]] == expected


@pytest.mark.parametrize("workers", [0, 1])
def test_a_batch_with_an_image_that_is_not_8_bit_keeps_it_as_pil(workers):
    from PIL import Image

    from prh_stitch.data.streaming import receive

    rgb = Image.new("RGB", (5, 4), (1, 2, 3))
    deep = Image.fromarray(np.arange(12, dtype=np.uint16).reshape(3, 4) * 1000)  # 16-bit grayscale
    samples = [{"key": str(i), "image": image, "caption": "c", "meta": {}, "url": "u"}
               for i, image in enumerate([rgb, deep, rgb])]
    batcher = Batcher(samples, batch_size=3, keep_images=True)
    loader = torch.utils.data.DataLoader(batcher, batch_size=None, num_workers=workers)
    (packet,) = [p for p in receive(loader, batcher.received) if p.samples]
    images = packet.batch()["image"]
    assert torch.equal(images[0], torch.tensor(np.array(rgb)).permute(2, 0, 1)) and torch.equal(images[2], images[0])
    assert isinstance(images[1], Image.Image) and np.array_equal(np.array(images[1]), np.array(deep))
