"""The one split rule (prh_stitch/data/split.py), by brute force over small layouts."""

import itertools
from collections import Counter

import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset

from prh_stitch.data.split import consumer_of, current_consumer, owner, split_mode, unit_size


def test_consumer_indices_number_every_rank_and_worker_once():
    for world, workers in itertools.product(range(1, 4), range(1, 4)):
        seen = {}
        for rank, worker in itertools.product(range(world), range(workers)):
            index, count = consumer_of(rank, world, worker, workers)
            assert count == world * workers and index == rank * workers + worker
            seen[index] = (rank, worker)
        assert sorted(seen) == list(range(world * workers))


@pytest.mark.parametrize("rank, world, worker, workers", [(2, 2, 0, 1), (-1, 2, 0, 1), (0, 1, 1, 1), (0, 1, -1, 2)])
def test_a_consumer_outside_its_group_is_an_error(rank, world, worker, workers):
    with pytest.raises(ValueError, match="must be in"):
        consumer_of(rank, world, worker, workers)


class _Report(IterableDataset):
    def __init__(self, **kwargs):
        self.kwargs = kwargs

    def __iter__(self):
        yield current_consumer(**self.kwargs)


def _in_workers(workers, **kwargs):
    loader = DataLoader(_Report(**kwargs), batch_size=None, num_workers=workers, collate_fn=lambda x: x)
    return sorted(tuple(x) for x in loader)


def test_the_current_consumer_combines_rank_and_dataloader_worker():
    assert current_consumer() == (0, 1)  # no process group, no worker
    assert current_consumer(rank=1, world=3) == (1, 3)
    assert current_consumer(split_by_node=False, rank=1, world=3) == (0, 1)
    assert _in_workers(2, rank=1, world=3) == [(2, 6), (3, 6)]
    assert _in_workers(2, split_by_worker=False, rank=1, world=3) == [(1, 3), (1, 3)]
    assert _in_workers(2, split_by_node=False, rank=1, world=3) == [(0, 2), (1, 2)]
    assert _in_workers(0, rank=2, world=3) == [(2, 3)]
    for half in ({"rank": 1}, {"world": 3}):
        with pytest.raises(ValueError, match=r"^pass rank and world together \(or neither"):
            current_consumer(**half)


def test_auto_splits_shards_when_there_are_enough_else_samples():
    for shards, consumers in itertools.product(range(0, 7), range(1, 6)):
        assert split_mode("auto", shards, consumers) == ("shard" if shards >= consumers else "sample")
        assert split_mode("shard", shards, consumers) == "shard"
        assert split_mode("sample", shards, consumers) == "sample"
    with pytest.raises(ValueError, match="split must be one of"):
        split_mode("bytes", 4, 2)


def test_every_item_has_exactly_one_owner_and_shares_differ_by_at_most_one():
    for count, items in itertools.product(range(1, 6), range(0, 13)):
        owners = [owner(position, count) for position in range(items)]
        assert all(0 <= o < count for o in owners)
        shares = Counter(owners)
        assert sum(shares.values()) == items
        if items:
            sizes = [shares.get(c, 0) for c in range(count)]
            assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
        assert owners == [p % count for p in range(items)]  # round robin in the common order


def test_units_shrink_only_when_the_shards_give_fewer_units_than_consumers():
    assert unit_size(1024, None, 8) == 1024  # unknown counts: the default
    assert unit_size(1024, [5000, 3000], 8) == 1024  # 5 + 3 units: enough
    assert unit_size(1024, [1000], 4) == 250
    assert unit_size(4, [8], 3) == 2  # 8 // 3
    assert unit_size(4, [2, 1], 8) == 1  # fewer samples than consumers: one sample a unit
    assert unit_size(4, [4, 4], 2) == 4  # exactly as many units as consumers
    for chunk, consumers in itertools.product((1, 3, 4, 16), range(1, 9)):
        for counts in itertools.product((1, 2, 5, 9), repeat=2):
            size = unit_size(chunk, list(counts), consumers)
            assert 1 <= size <= chunk
            units = sum(-(-n // size) for n in counts)
            assert units >= min(consumers, sum(counts))  # every consumer has work when there is enough
            if sum(-(-n // chunk) for n in counts) >= consumers:
                assert size == chunk


def test_unit_split_feeds_every_worker_with_few_shards(tmp_path):
    """Item 6 of issue 11 end to end: one 8-sample shard, 2 ranks x 2 workers, units from the manifest."""
    from prh_stitch.data.features import UnitDone, UnitReader
    from prh_stitch.data.shards import samples_per_shard, write_shards
    from prh_stitch.data.sources import scenes

    manifest = write_shards(scenes(8, size=32), tmp_path, prefix="one", samples_per_shard=10)
    urls = [str(tmp_path / manifest["pattern"])]
    assert samples_per_shard(urls) == [8]
    assert samples_per_shard([str(tmp_path / "elsewhere.tar")]) is None
    size = unit_size(1024, samples_per_shard(urls), 4)
    torch.manual_seed(0)
    got = {}
    for rank in range(2):
        reader = UnitReader(urls, size, set(), {}, rank=rank, world=2)
        loader = DataLoader(reader, batch_size=None, num_workers=2, collate_fn=lambda x: x)
        for item in loader:
            if not isinstance(item, UnitDone):
                got.setdefault(item["unit"], []).append(item["key"])
    assert sorted(got) == [(0, b) for b in range(4)] and sorted(sum(got.values(), [])) == [f"train-{i:08d}" for i in range(8)]
