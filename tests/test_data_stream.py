"""Streaming shards: exact counts, skip-and-continue on bad data, splitting across workers and ranks.

Shards are written on the fly with captions that encode shard and index ("shard 2 sample 3"), so every
check can say which sample arrived and which one is missing.
"""

import io
import json
import logging
import os
import select
import tarfile
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader

from prh_stitch.data.shards import keys_digest
from prh_stitch.data.stream import PairedShards, SkipStats, scan


def png_bytes(value=0):
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (value % 256, 40, 90)).save(buffer, format="PNG")
    return buffer.getvalue()


def write_tar(path, members):
    """``members``: list of (name, bytes) written in order with fixed metadata."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def good_members(shard, index):
    key = f"s{shard}-{index:03d}"
    meta = json.dumps({"shard": shard, "index": index}).encode()
    return key, [(f"{key}.png", png_bytes(index)), (f"{key}.txt", f"shard {shard} sample {index}".encode()), (f"{key}.json", meta)]


def write_good_shard(path, shard, n):
    members, keys = [], []
    for index in range(n):
        key, files = good_members(shard, index)
        members += files
        keys.append(key)
    return write_tar(path, members), keys


@pytest.fixture
def four_shards(tmp_path):
    urls, keys = [], []
    for shard, n in enumerate((5, 6, 5, 4)):
        url, shard_keys = write_good_shard(tmp_path / f"part-{shard:06d}.tar", shard, n)
        urls.append(url)
        keys += shard_keys
    return urls, keys


def test_every_sample_arrives_once_with_its_caption_and_meta(four_shards, tmp_path):
    urls, keys = four_shards
    samples = list(PairedShards(str(tmp_path / "part-{000000..000003}.tar")))
    assert [s["key"] for s in samples] == keys
    for sample in samples:
        shard, index = sample["meta"]["shard"], sample["meta"]["index"]
        assert sample["caption"] == f"shard {shard} sample {index}"
        assert sample["url"] == urls[shard]
        assert sample["image"].mode == "RGB" and sample["image"].size == (8, 8)
        assert sample["image"].getpixel((0, 0)) == (index, 40, 90)


def test_transforms_apply_to_image_and_caption(four_shards):
    """Transforms are webdataset stages appended to the pipeline (here: to a copy of it)."""
    urls, keys = four_shards
    samples = list(PairedShards(urls).compose(wds.map_dict(image=lambda im: im.size, caption=str.upper)))
    assert {s["image"] for s in samples} == {(8, 8)}
    assert samples[0]["caption"] == "SHARD 0 SAMPLE 0"


def test_bad_samples_are_skipped_by_reason_and_neighbours_delivered(tmp_path):
    members, expected = [], []
    for index in range(9):
        key, files = good_members(0, index)
        if index == 1:
            files[0] = (f"{key}.png", b"\x89PNG but not really an image")
        elif index == 3:
            files = [f for f in files if not f[0].endswith(".txt")]
        elif index == 5:
            files[1] = (f"{key}.txt", b"  \n ")
        elif index == 6:
            files = [f for f in files if not f[0].endswith(".png")]
        elif index == 7:
            files[2] = (f"{key}.json", b"{not json")
        else:
            expected.append(key)
        members += files
    url = write_tar(tmp_path / "mixed.tar", members)
    stats = SkipStats()
    keys = [s["key"] for s in PairedShards(url, stats=stats)]
    assert keys == expected
    assert stats.good == len(expected)
    assert dict(stats.skipped) == {
        "undecodable_image": 1, "missing_caption": 1, "empty_caption": 1, "missing_image": 1, "undecodable_meta": 1,
    }
    assert stats.as_dict()["shards"] == [{"url": url, "good": len(expected), "skipped": dict(sorted(stats.skipped.items()))}]


def test_each_skip_is_logged_once_at_warning(tmp_path, caplog):
    key, files = good_members(0, 0)
    url = write_tar(tmp_path / "bad.tar", [files[0], (f"{key}.txt", b"")])
    with caplog.at_level(logging.WARNING, logger="prh_stitch.data"):
        assert list(PairedShards(url)) == []
    skip_records = [r for r in caplog.records if key in r.getMessage()]
    assert len(skip_records) == 1 and skip_records[0].levelno == logging.WARNING
    assert "empty_caption" in skip_records[0].getMessage()


def _member_ends(path):
    """(key, end offset of its last member's data) for each key, in order."""
    ends = {}
    with tarfile.open(path) as tar:
        for info in tar.getmembers():
            ends[info.name.split(".")[0]] = info.offset_data + info.size
    return list(ends.items())


@pytest.mark.parametrize("cut", ["mid_data", "mid_header", "on_boundary", "drop_end_marker"])
def test_truncated_shard_delivers_everything_before_the_cut(tmp_path, cut):
    url, keys = write_good_shard(tmp_path / "whole.tar", 0, 8)
    data = open(url, "rb").read()
    ends = _member_ends(url)
    with tarfile.open(url) as tar:
        members = tar.getmembers()
    sixth_image = members[5 * 3]  # first member of sample 5
    position = {
        "mid_data": sixth_image.offset_data + 20,  # inside sample 5's image
        "mid_header": sixth_image.offset + 100,  # inside sample 5's header
        "on_boundary": sixth_image.offset,  # exactly before sample 5's header
        "drop_end_marker": members[-1].offset_data + 512,  # all members, no end-of-archive blocks
    }[cut]
    cut_path = tmp_path / "cut.tar"
    cut_path.write_bytes(data[:position])
    expected = [key for key, end in ends if end <= position]
    stats = SkipStats()
    delivered = [s["key"] for s in PairedShards(str(cut_path), stats=stats)]
    assert delivered == expected
    assert len(expected) == (8 if cut == "drop_end_marker" else 5)
    assert stats.skipped["truncated_shard"] == 1
    # Only a member cut in the middle costs its sample; a cut between samples loses nothing read.
    assert stats.skipped["truncated_sample"] == (1 if cut == "mid_data" else 0)


def test_unreadable_shards_are_counted_and_the_rest_read(four_shards, tmp_path):
    urls, keys = four_shards
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(b"this is not a tar file at all" * 40)
    empty = tmp_path / "empty.tar"
    empty.write_bytes(b"")
    stats = SkipStats()
    delivered = [s["key"] for s in PairedShards([urls[0], str(garbage), str(empty), urls[1]], stats=stats)]
    assert delivered == [k for k in keys if k.startswith(("s0-", "s1-"))]
    assert dict(stats.skipped) == {"unreadable_shard": 2}
    assert stats.shards_read == 4


def test_pipe_urls_read_and_failed_commands_are_counted(four_shards):
    urls, keys = four_shards
    assert [s["key"] for s in PairedShards(f"pipe:cat {urls[0]}")] == [k for k in keys if k.startswith("s0-")]
    stats = SkipStats()
    delivered = [s["key"] for s in PairedShards([f"pipe:cat {urls[1]}; exit 3", "pipe:exit 1"], stats=stats)]
    # A command that fails after writing a good tar still delivers it; both failures are counted.
    assert delivered == [k for k in keys if k.startswith("s1-")]
    assert dict(stats.skipped) == {"pipe_failed": 2}


def _child_pids(pid=None):
    """Children of a process, from Linux /proc (zombies included until reaped)."""
    pids = set()
    for children in Path(f"/proc/{pid or os.getpid()}/task").glob("*/children"):
        pids.update(children.read_text().split())
    return pids


def test_stopping_early_ends_the_whole_pipe_command(four_shards, tmp_path):
    urls, _ = four_shards
    before = _child_pids()
    pidfile = tmp_path / "sleep.pid"
    # A background "sleep" that outlives the data, as a slow download would: a grandchild of this process. Its pid
    # is written before any data, so it is there once the first sample arrives. If stopping waited for the command
    # to end, close() would not return for 1000 s.
    iterator = iter(PairedShards(f"pipe:sleep 1000 & echo $! > {pidfile}; cat {urls[0]}; wait"))
    next(iterator)
    sleep = os.pidfd_open(int(pidfile.read_text()))
    assert _child_pids() != before
    iterator.close()
    assert _child_pids() == before  # the shell is killed and reaped
    # The whole process group went, not only the shell: the pidfd becomes readable when the process ends (the
    # timeout only guards against hanging the test run).
    assert select.select([sleep], [], [], 60)[0] == [sleep]
    os.close(sleep)


def test_shuffle_is_reproducible_and_complete(four_shards):
    urls, keys = four_shards

    def order(seed, epoch=0):
        dataset = PairedShards(urls, shuffle_buffer=6, seed=seed)
        dataset.set_epoch(epoch)
        return [s["key"] for s in dataset]

    assert order(0) == order(0)
    assert sorted(order(0)) == sorted(keys)
    assert order(0) != keys
    assert order(1) != order(0)
    assert order(0, epoch=1) != order(0)


def _keys_of_batch(batch):
    return [sample["key"] for sample in batch]


def _read_through_loader(dataset, workers):
    loader = DataLoader(dataset, batch_size=3, num_workers=workers, collate_fn=_keys_of_batch)
    return [key for batch in loader for key in batch]


@pytest.mark.parametrize("num_shards", [4, 1])  # shard split, and the per-sample split for too few shards
def test_two_workers_read_every_sample_once(tmp_path, num_shards):
    keys = []
    for shard in range(num_shards):
        keys += write_good_shard(tmp_path / f"w-{shard:06d}.tar", shard, 7)[1]
    delivered = _read_through_loader(PairedShards(str(tmp_path / "w-*.tar")), workers=2)
    assert sorted(delivered) == sorted(keys) and len(delivered) == len(keys)


@pytest.mark.parametrize("num_shards", [8, 5, 2])  # multiple of 4 consumers, not a multiple, fewer than 4
def test_two_ranks_times_two_workers_read_every_sample_once(tmp_path, num_shards):
    keys = []
    for shard in range(num_shards):
        keys += write_good_shard(tmp_path / f"r-{shard:06d}.tar", shard, 3 + shard % 2)[1]
    per_rank = [
        _read_through_loader(PairedShards(str(tmp_path / "r-*.tar"), split_by_node=True, rank=rank, world_size=2), workers=2)
        for rank in range(2)
    ]
    union = per_rank[0] + per_rank[1]
    assert sorted(union) == sorted(keys) and len(union) == len(keys)
    assert all(per_rank)  # no rank idles, even with fewer shards than consumers


def test_the_sample_split_gives_consumer_r_every_sample_at_position_r_mod_count(four_shards):
    urls, keys = four_shards
    for split in ("sample", "auto"):  # 4 shards for 5 consumers: auto splits samples too
        shares = [[s["key"] for s in PairedShards(urls, split=split, split_by_node=True, rank=r, world_size=5)]
                  for r in range(5)]
        assert shares == [keys[r::5] for r in range(5)]
    # Whole shards, round robin, when there are enough of them (or when asked).
    shares = [[s["key"] for s in PairedShards(urls, split="shard", split_by_node=True, rank=r, world_size=3)]
              for r in range(3)]
    by_shard = [[k for k in keys if k.startswith(f"s{shard}-")] for shard in range(4)]
    assert shares == [by_shard[0] + by_shard[3], by_shard[1], by_shard[2]]


def test_shard_problems_are_counted_once_across_consumers(tmp_path):
    url, keys = write_good_shard(tmp_path / "one.tar", 0, 6)
    with tarfile.open(url) as tar:
        image = next(m for m in tar.getmembers() if m.name == "s0-003.png")
    data = open(url, "rb").read()
    (tmp_path / "one.tar").write_bytes(data[:image.offset_data + 10])  # cut inside sample 3's image
    merged, delivered = SkipStats(), []
    for rank in range(3):  # one shard, three consumers: the per-sample split
        stats = SkipStats()
        delivered.append([s["key"] for s in PairedShards(url, split_by_node=True, rank=rank, world_size=3, stats=stats)])
        merged.merge(stats)
    assert delivered == [[keys[0]], [keys[1]], [keys[2]]]  # sample 3 (consumer 0's) was cut
    assert dict(merged.skipped) == {"truncated_shard": 1, "truncated_sample": 1} and merged.good == 3


def test_rank_overrides_are_validated(four_shards):
    urls, _ = four_shards
    with pytest.raises(ValueError, match="together"):
        PairedShards(urls, rank=0)
    with pytest.raises(ValueError, match="rank must be in"):
        PairedShards(urls, rank=2, world_size=2)
    with pytest.raises(ValueError, match="split must be one of"):
        PairedShards(urls, split="bytes")


def test_a_pattern_matching_nothing_fails_at_construction(tmp_path):
    with pytest.raises(ValueError, match="no shards match"):
        PairedShards(str(tmp_path / "missing-*.tar"))


def test_skip_stats_merge_and_dict():
    a, b = SkipStats(), SkipStats()
    a.add_good("x")
    a.add_skip("x", "empty_caption")
    b.add_good("y")
    b.add_skip("x", "empty_caption")
    merged = a.merge(b).as_dict()
    assert merged["good"] == 2 and merged["skipped"] == {"empty_caption": 2} and merged["shards_read"] == 2
    assert merged["shards"][0] == {"url": "x", "good": 1, "skipped": {"empty_caption": 2}}


def test_scan_reports_counts_skips_and_the_key_hash(four_shards, tmp_path):
    urls, keys = four_shards
    key, files = good_members(9, 0)
    bad = write_tar(tmp_path / "bad.tar", [files[0]])  # image without caption
    duplicate = write_good_shard(tmp_path / "dup.tar", 0, 1)[0]  # repeats key s0-000
    report = scan([*urls, bad])
    assert report["good"] == len(keys) and report["skipped"] == {"missing_caption": 1}
    assert report["keys_sha256"] == keys_digest(keys) and report["duplicate_keys"] == 0
    assert report["num_shards"] == 5 and [s["url"] for s in report["shards"]] == sorted([*urls, bad])
    assert scan([*urls, duplicate])["duplicate_keys"] == 1


@pytest.mark.parametrize("mode", ["I;16", "I;16B"])
def test_16_bit_grayscale_images_are_scaled_to_8_bits_not_clipped(mode):
    """A 16-bit PNG decodes to the same picture in 8 bits (PIL's convert alone would make it almost all white)."""
    import numpy as np
    from PIL import Image

    from prh_stitch.data.stream import decode_sample

    levels = np.array([[0, 257, 32768, 49152, 65535]], dtype=np.uint16)
    image = Image.fromarray(levels)
    if mode != image.mode:
        image = Image.frombytes(mode, image.size, levels.astype(">u2").tobytes())
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    raw = {"__key__": "k", "__url__": "u", "png": buffer.getvalue(), "txt": b"a gray ramp"}
    sample = decode_sample(raw, "RGB")
    pixels = np.asarray(sample["image"])
    assert sample["image"].mode == "RGB" and pixels.shape == (1, 5, 3)
    assert pixels[0, :, 0].tolist() == [0, 1, 128, 191, 255]
    assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()
