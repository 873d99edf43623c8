"""The one split rule (prh_stitch/data/split.py), by brute force over small layouts."""

import itertools
from collections import Counter

import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from prh_stitch.data.split import consumer_of, contiguous_owner, current_consumer, owner, split_mode, unit_size


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


def test_units_are_an_eighth_of_a_share_at_most_never_below_a_batch_nor_above_the_chunk():
    assert unit_size(1024, None, 8) == 1024  # unknown counts: the default
    assert unit_size(1024, [10], 1) == 1024  # one consumer: nothing to balance
    assert unit_size(1024, [5000, 3000], 8) == 125  # 8000 // (8 x 8)
    assert unit_size(1024, [5000, 3000], 8, batch_size=300) == 300  # never below a batch
    assert unit_size(1024, [5000, 3000], 8, batch_size=32) == 96  # whole batches: 125 would end in a sliver
    assert unit_size(1024, [5000, 3000], 8, batch_size=2000) == 1000  # nor above a share
    assert unit_size(512, [5000, 3000], 8, batch_size=2000) == 512  # nor above the chunk
    assert unit_size(1024, [500] * 100, 2) == 1024  # plenty of work: the chunk
    assert unit_size(4, [2, 1], 8) == 1  # fewer samples than consumers: one sample a unit
    for chunk, consumers, batch in itertools.product((1, 3, 16), range(1, 9), (1, 4)):
        for counts in itertools.product((0, 1, 5, 40), repeat=2):
            size = unit_size(chunk, list(counts), consumers, batch)
            assert 1 <= size <= chunk and size >= min(chunk, batch, sum(counts) // consumers)
            if consumers == 1:
                assert size == chunk
            elif max(1, min(chunk, batch, sum(counts) // consumers)) < size < chunk:
                floor = min(batch, sum(counts) // consumers)
                balanced = sum(counts) // (8 * consumers)
                assert size == balanced - balanced % floor and size % floor == 0


def _runs(counts, size, consumers):
    """Samples per consumer when the units of ``counts`` (blocks of ``size``) are dealt by contiguous_owner."""
    units = [min(size, n - b * size) for n in counts for b in range(max(1, -(-n // size)))]
    total, start, load, owners = sum(units), 0, [0] * consumers, []
    for n in units:
        owners.append(contiguous_owner(start, n, total, consumers))
        load[owners[-1]] += n
        start += n
    return owners, load, max(units)


def test_contiguous_runs_give_every_consumer_its_share_to_within_one_unit():
    for consumers in range(1, 9):
        for counts in itertools.product((0, 3, 7, 64, 500), repeat=3):
            size = unit_size(1024, list(counts), consumers)
            owners, load, largest = _runs(counts, size, consumers)
            assert owners == sorted(owners) and all(0 <= o < consumers for o in owners)  # contiguous runs
            share = sum(counts) / consumers
            assert all(abs(n - share) <= largest for n in load)
            if sum(counts) >= 8 * consumers:  # enough work for the eighth-share units
                assert sum(counts) / consumers / max(load) >= 8 / 9  # every consumer busy >= 8/9 of the time
    assert contiguous_owner(0, 0, 0, 3) == 0 and contiguous_owner(10, 0, 10, 3) == 2  # units of no samples
    for total, consumers in itertools.product(range(1, 12), range(1, 6)):  # the middle's consumer, by brute force
        for start, size in itertools.product(range(total), range(1, 4)):
            middle = start + size / 2
            expected = min(c for c in range(consumers) if middle < (c + 1) * total / consumers or c == consumers - 1)
            assert contiguous_owner(start, size, total, consumers) == expected, (start, size, total, consumers)


def test_the_layout_that_kept_half_the_workers_idle_is_balanced():
    """4,096 scenes in shards of 500 for 12 workers: round robin over units of total // consumers kept half the
    workers idle for half the time (5 of them had two units of 341); contiguous runs of eighth-share units do not."""
    counts = [500] * 8 + [96]
    _, load, _ = _runs(counts, unit_size(1024, counts, 12), 12)
    assert sum(counts) / 12 / max(load) >= 8 / 9


class _WorkerTagged(IterableDataset):
    def __init__(self, inner):
        self.inner = inner

    def __iter__(self):
        worker = get_worker_info().id
        for item in self.inner:
            yield worker, item


def test_unit_split_feeds_every_worker_with_few_shards(tmp_path):
    """Item 6 of issue 11 end to end: one 8-sample shard, 2 ranks x 2 workers, units from the manifest."""
    from prh_stitch.data.features import UnitDone, UnitReader
    from prh_stitch.data.shards import samples_per_shard, write_shards
    from prh_stitch.data.sources import scenes

    manifest = write_shards(scenes(8, size=32), tmp_path, prefix="one", samples_per_shard=10)
    urls = [str(tmp_path / manifest["pattern"])]
    assert samples_per_shard(urls) == [8]
    assert samples_per_shard([str(tmp_path / "elsewhere.tar")]) is None
    counts = samples_per_shard(urls)
    size = unit_size(1024, counts, 4)
    torch.manual_seed(0)
    got, per_consumer = {}, Counter()
    for rank in range(2):
        reader = UnitReader(urls, size, set(), {}, rank=rank, world=2, counts=counts)
        loader = DataLoader(_WorkerTagged(reader), batch_size=None, num_workers=2, collate_fn=lambda x: x)
        for worker, item in loader:
            if not isinstance(item, UnitDone):
                got.setdefault(item["unit"], []).append(item["key"])
                per_consumer[(rank, worker)] += 1
    assert sorted(got) == [(0, b) for b in range(8)] and sorted(sum(got.values(), [])) == [f"train-{i:08d}" for i in range(8)]
    assert sorted(per_consumer.values()) == [2, 2, 2, 2]  # every rank x worker: its share, no more


def test_a_consumer_reads_only_the_shards_of_its_run_and_stops_one_sample_past_it(tmp_path, monkeypatch):
    from prh_stitch.data import extraction_units
    from prh_stitch.data.features import UnitDone, UnitReader
    from prh_stitch.data.shards import expand_urls, samples_per_shard, write_shards
    from prh_stitch.data.sources import scenes

    manifest = write_shards(scenes(32, size=16), tmp_path, prefix="s", samples_per_shard=8)
    urls = expand_urls(str(tmp_path / manifest["pattern"]))
    counts = samples_per_shard(urls)
    read, original = Counter(), extraction_units.read_shard

    def counting(url):
        for item in original(url):
            read[url] += 1
            yield item

    monkeypatch.setattr(extraction_units, "read_shard", counting)
    for world, size, expected in ((4, 2, {0: {0: 8}, 1: {1: 8}, 2: {2: 8}, 3: {3: 8}}),  # a shard each
                                  (8, 1, {0: {0: 5}, 1: {0: 8}, 6: {3: 5}, 7: {3: 8}})):  # half a shard each
        for rank in range(world):
            read.clear()
            done = [item for item in UnitReader(urls, size, set(), {}, rank=rank, world=world, counts=counts)
                    if isinstance(item, UnitDone)]
            assert sum(d.raw for d in done) == 32 // world
            if rank in expected:
                assert {urls.index(url): n for url, n in read.items()} == expected[rank], (world, rank)


def _scene_shards(folder, sizes, image=None):
    """Shards of ``sizes`` samples each (tiny scenes, or one ``image`` repeated), their URLs and manifest counts."""
    from prh_stitch.data.shards import samples_per_shard, write_shards
    from prh_stitch.data.sources import scenes

    urls = []
    for i, n in enumerate(sizes):
        samples = scenes(n, seed=i, size=16) if image is None else (
            (f"k{i}-{j}", image, f"caption {j}", {}) for j in range(n))
        manifest = write_shards(samples, folder / f"set{i}", prefix="s", samples_per_shard=max(1, n),
                                image_format="png")
        urls.append(str(folder / f"set{i}" / manifest["pattern"]))
    return urls, samples_per_shard(urls)


def _unit_ends(urls, size, world, counts):
    from prh_stitch.data.features import UnitDone, UnitReader

    return {rank: [item for item in UnitReader(urls, size, set(), {}, rank=rank, world=world, counts=counts)
                   if isinstance(item, UnitDone)] for rank in range(world)}


def test_the_reader_deals_exactly_the_runs_the_rule_computes(tmp_path):
    """Uneven shards (one of a single sample, one smaller than a unit): each consumer's raw samples are its load
    under contiguous_owner, computed from the counts alone."""
    urls, counts = _scene_shards(tmp_path, [7, 1, 5, 3])
    for world in range(1, 6):
        ends = _unit_ends(urls, 2, world, counts)
        units = [min(2, n - b * 2) for n in counts for b in range(max(1, -(-n // 2)))]
        expected, start = [0] * world, 0
        for n in units:
            expected[contiguous_owner(start, n, sum(units), world)] += n
            start += n
        assert [sum(d.raw for d in ends[rank]) for rank in range(world)] == expected, world


def test_without_counts_unit_u_over_all_shards_goes_to_consumer_u_mod_count(tmp_path):
    urls, _ = _scene_shards(tmp_path, [7, 5])  # 4 + 3 units of 2; 2 shards for 3 consumers: the "sample" split
    ends = _unit_ends(urls, 2, 3, None)
    numbered = {(0, b): b for b in range(4)} | {(1, b): 4 + b for b in range(3)}
    got = {(d.shard, d.block): rank for rank, done in ends.items() for d in done}
    assert got == {unit: u % 3 for unit, u in numbered.items()}


def test_the_reader_defaults_to_one_process_and_checks_its_counts(tmp_path):
    from prh_stitch.data.features import UnitDone, UnitReader

    urls, counts = _scene_shards(tmp_path, [3, 2])
    alone = [i for i in UnitReader(urls, 2, set(), {}, counts=counts) if isinstance(i, UnitDone)]
    assert sum(d.raw for d in alone) == 5 and sum(d.last for d in alone) == 2
    with pytest.raises(ValueError, match=r"^counts gives 1 shards' sample counts for 2 shards$"):
        UnitReader(urls, 2, set(), {}, counts=[3])


def test_images_reach_the_encoders_as_rgb_whatever_their_mode(tmp_path):
    from PIL import Image

    from prh_stitch.data.features import UnitDone, UnitReader

    urls, counts = _scene_shards(tmp_path, [2], image=Image.new("L", (8, 8), 77))
    samples = [i for i in UnitReader(urls, 4, set(), {}, counts=counts) if not isinstance(i, UnitDone)]
    assert [s["image"].mode for s in samples] == ["RGB", "RGB"]
