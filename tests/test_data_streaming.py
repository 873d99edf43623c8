"""The StreamingDataModule on the webdataset pipeline: exactly once over 2 DDP ranks x 2 workers, resampled epochs
with the same number of batches on every rank, per-encoder preprocessing, uint8 images, visible skip counts."""

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from prh_stitch.data.batches import BatchLoader, batch_stages
from prh_stitch.data.datamodule import StreamingDataModule
from prh_stitch.data.stream import PairedShards, SkipStats
from prh_stitch.encoders import build_encoder
from test_data_stream import write_tar
from test_features import scene

# The shared fixtures of test_features, by name, so pytest finds them here too.
from test_features import dataset, tiny_vit  # noqa: F401  (pytest fixtures)


@pytest.fixture(scope="module")
def tiny_bert():
    return build_encoder("tiny_bert")


def keys_of(loader):
    return [key for batch in loader for key in batch["key"]]


# -- exactly once across 2 ranks x 2 workers ---------------------------------------------------------------


def _stream_on_rank(rank, world, rendezvous, patterns, out):
    import torch.distributed as dist

    torch.set_num_threads(1)
    torch.multiprocessing.set_start_method("fork", force=True)  # as in Lightning's DDP ranks (see test_features)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        report = {}
        for name, pattern in patterns.items():
            dm = StreamingDataModule(train=pattern, batch_size=2, num_workers=2, shuffle_buffer=3, seed=5)
            loader = dm.train_dataloader()
            epochs, skipped = [], []
            for _ in range(2):
                epochs.append(keys_of(loader))
                skipped.append(dm.skipped["train"])
            repeat = StreamingDataModule(train=pattern, batch_size=2, num_workers=2, shuffle_buffer=3, seed=5)
            report[name] = {"epochs": epochs, "skipped": skipped, "repeat": keys_of(repeat.train_dataloader())}
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
            assert all(r[name]["epochs"][epoch] for r in ranks)  # no rank idles
            summed = sum((Counter(r[name]["skipped"][epoch]) for r in ranks), Counter())
            assert summed == Counter({k: v * (epoch + 1) for k, v in expected_skips.items()})
        for r in ranks:
            assert r[name]["repeat"] == r[name]["epochs"][0]  # same seed and epoch: same order
        assert any(r[name]["epochs"][0] != r[name]["epochs"][1] for r in ranks)  # a new epoch reshuffles


# -- resampled epochs --------------------------------------------------------------------------------------


def test_resampled_epochs_have_a_fixed_length_and_the_same_number_of_batches_on_every_rank(dataset):
    urls, good, _ = dataset
    pattern = ",".join(urls)
    for rank in range(2):
        stream = PairedShards(pattern, resampled=True, epoch_length=11, rank=rank, world_size=2, split_by_node=True,
                              shuffle_buffer=4, seed=1)
        for stage in batch_stages(2, {}, None, stream.stats):
            stream.append(stage)
        loader = BatchLoader(stream, SkipStats(), epoch=lambda: 0, num_workers=2,
                             length=stream.batches_per_rank(2, 2))
        batches = list(loader)
        keys = [key for batch in batches for key in batch["key"]]
        assert len(batches) == len(loader) == 3  # 11 // 2 = 5 samples a rank: workers take 3 and 2, batches of 2
        assert len(keys) == 5 and set(keys) <= set(good)
    dm = StreamingDataModule(train=pattern, batch_size=4, num_workers=2, resampled=True, epoch_length=11, seed=2)
    loader = dm.train_dataloader()
    assert len(loader) == 4  # workers take 6 and 5 samples: 2 batches each
    epochs = []
    for _ in range(3):
        epochs.append([])
        for batch in loader:
            epochs[-1] += batch["key"]
            for key, image in zip(batch["key"], batch["image"]):  # no encoder: the decoded pixels, (C, H, W)
                expected = torch.from_numpy(np.array(scene(*good[key])))
                assert image.dtype == torch.uint8 and torch.equal(image, expected.permute(2, 0, 1))
    assert [len(e) for e in epochs] == [11, 11, 11]
    again = StreamingDataModule(train=pattern, batch_size=4, num_workers=2, resampled=True, epoch_length=11, seed=2)
    assert keys_of(again.train_dataloader()) == epochs[0]
    assert epochs[0] != epochs[1]
    with pytest.raises(ValueError, match="give epoch_length"):
        StreamingDataModule(train=pattern, resampled=True)


# -- batches -----------------------------------------------------------------------------------------------


def test_batches_carry_each_encoders_own_preprocessing_and_workers_skip_counts(dataset, tiny_vit, tiny_bert):
    urls, good, skips = dataset
    dm = StreamingDataModule(val=",".join(urls), batch_size=4, num_workers=2)
    dm.set_encoders({"image": tiny_vit, "text": tiny_bert})
    keys = []
    for batch in dm.val_dataloader():
        assert "image" not in batch  # preprocessed in the workers: no images travel back
        for row, key in enumerate(batch["key"]):
            shard, index = good[key]
            assert batch["caption"][row] == f"shard {shard} sample {index}" and batch["meta"][row] == {"label": index % 3}
            torch.testing.assert_close(batch["inputs"]["image"][row], tiny_vit.transform(scene(shard, index)))
            ids = tiny_bert.transform(f"shard {shard} sample {index}")["input_ids"]
            assert batch["inputs"]["text"]["input_ids"][row, : len(ids)].tolist() == ids
        keys += batch["key"]
    assert sorted(keys) == sorted(good)
    assert dm.skipped["val"] == skips  # counted in two worker processes, added up here


@pytest.mark.parametrize("workers", [0, 2])
def test_a_loader_reused_over_epochs_reshuffles_and_counts_skips_once_per_epoch(dataset, workers):
    urls, good, skips = dataset
    pattern = ",".join(urls)
    dm = StreamingDataModule(train=pattern, batch_size=3, num_workers=workers, shuffle_buffer=4, seed=2)
    loader = dm.train_dataloader()  # as Lightning does: one loader for the whole fit; workers persist
    assert loader.persistent_workers == (workers > 0)
    epochs = []
    for _ in range(2):
        epochs.append(keys_of(loader))
        assert sorted(epochs[-1]) == sorted(good)
    assert epochs[0] != epochs[1]  # the persistent workers saw the new epoch
    assert dm.skipped["train"] == {reason: 2 * n for reason, n in skips.items()}
    # Each epoch's order depends only on the seed and the epoch: a fresh module's second pass repeats it.
    fresh = StreamingDataModule(train=pattern, batch_size=3, num_workers=workers, shuffle_buffer=4, seed=2)
    for expected in epochs:
        assert keys_of(fresh.train_dataloader()) == expected


def test_images_are_resized_to_one_uint8_tensor_per_batch(dataset):
    urls, good, _ = dataset
    dm = StreamingDataModule(val=urls[0], batch_size=3, image_size=16)
    for batch in dm.val_dataloader():
        assert batch["image"].dtype == torch.uint8 and batch["image"].shape == (len(batch["key"]), 3, 16, 16)
        for key, image in zip(batch["key"], batch["image"]):
            resized = scene(*good[key]).resize((16, 16), Image.BILINEAR)
            assert torch.equal(image, torch.from_numpy(np.array(resized)).permute(2, 0, 1))


@pytest.mark.parametrize("workers", [0, 1])
def test_a_batch_with_an_image_that_is_not_8_bit_keeps_it_as_pil(tmp_path, workers):
    import io

    def png(image):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue()

    rgb = Image.new("RGB", (5, 4), (1, 2, 3))
    deep = Image.fromarray(np.arange(12, dtype=np.uint16).reshape(3, 4) * 1000)  # 16-bit grayscale
    members = []
    for i, image in enumerate([rgb, deep, rgb]):
        members += [(f"k{i}.png", png(image)), (f"k{i}.txt", b"c")]
    url = write_tar(tmp_path / "mixed.tar", members)
    dm = StreamingDataModule(val=url, batch_size=3, num_workers=workers, image_mode=None)
    (batch,) = list(dm.val_dataloader())
    images = batch["image"]
    assert torch.equal(images[0], torch.tensor(np.array(rgb)).permute(2, 0, 1)) and torch.equal(images[2], images[0])
    assert isinstance(images[1], Image.Image) and np.array_equal(np.array(images[1]), np.array(deep))
