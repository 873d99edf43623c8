"""The one rule that splits data over consumers (torch.distributed ranks x DataLoader workers).

Consumers: ``count = world x workers`` and ``index = rank x workers + worker``; every consumer sees the same
items in the same order, and item ``i`` belongs to consumer ``i mod count`` (``owner``). What an item is:

* ``"shard"``: a whole shard. The union over consumers is the data exactly once; counts per consumer are equal
  only when the shards are equally full and their number is a multiple of ``count``.
* ``"sample"``: one raw sample (good or bad) in the common shard order. Every consumer reads every shard and keeps
  its samples: exactly once as well, counts differ by at most one, at the price of every consumer reading all
  the bytes. Shard-level problems are counted by the shard's owner, so merged counts see each problem once.
* ``"auto"`` (the default): "shard" when there are at least as many shards as consumers, else "sample", so no
  consumer idles and nothing is dropped or duplicated.

The feature store's units of work (blocks of a shard) follow the same rule when the shards' sample counts are
unknown: unit ``u``, numbered over all shards in order, belongs to consumer ``u mod count``. When the manifests give
the counts, units are dealt in contiguous runs of equal sample counts instead (``contiguous_owner``): every consumer
gets the same work to within one unit, and reads only the shards its run lies in. ``unit_size`` picks blocks small
enough for that balance (and never smaller than a batch).
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

from torch.utils.data import get_worker_info

from prh_stitch.distributed import rank_world

SPLIT_MODES = ("auto", "shard", "sample")


def consumer_of(rank: int, world: int, worker: int, workers: int) -> Tuple[int, int]:
    """``(index, count)`` of worker ``worker`` of ``workers`` on rank ``rank`` of ``world``."""
    if not 0 <= rank < world:
        raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world}")
    if not 0 <= worker < workers:
        raise ValueError(f"worker must be in [0, num_workers), got worker={worker}, num_workers={workers}")
    return rank * workers + worker, world * workers


def current_consumer(
    split_by_node: bool = True, split_by_worker: bool = True, rank: Optional[int] = None, world: Optional[int] = None
) -> Tuple[int, int]:
    """This process's ``(index, count)``: rank from ``rank``/``world`` or torch.distributed, worker from the DataLoader."""
    if (rank is None) != (world is None):
        raise ValueError("pass rank and world together (or neither, to use torch.distributed)")
    if not split_by_node:
        rank, world = 0, 1
    elif rank is None:
        rank, world = rank_world()
    info = get_worker_info() if split_by_worker else None
    worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
    return consumer_of(rank, world, worker, workers)


def split_mode(split: str, num_shards: int, consumers: int) -> str:
    """``"shard"`` or ``"sample"``: ``split`` itself unless it is ``"auto"`` (see the module docstring)."""
    if split not in SPLIT_MODES:
        raise ValueError(f"split must be one of {SPLIT_MODES}, got {split!r}")
    if split != "auto":
        return split
    return "shard" if num_shards >= consumers else "sample"


def owner(position: int, consumers: int) -> int:
    """The consumer that owns item ``position`` (a shard, sample or unit, counted in the common order)."""
    return position % consumers


def unit_size(chunk_size: int, samples_per_shard: Optional[Sequence[int]], consumers: int, batch_size: int = 1) -> int:
    """Samples per unit of work: ``chunk_size``, or fewer so that the work balances over the consumers.

    ``samples_per_shard`` comes from the shards' manifests (None when unknown: ``pipe:`` URLs, shards written
    elsewhere: then ``chunk_size``). Units are dealt in contiguous runs (``contiguous_owner``), so a consumer's work
    is its share to within one unit: units of at most an eighth of a share (``total // (8 x consumers)``) keep every
    consumer busy at least 8/9 of the time. They stay at least ``batch_size`` (batches never span units, and
    smaller batches would waste an accelerator more than the imbalance does) unless a batch is more than a share,
    a whole number of batches when larger, and at least one sample.
    """
    if samples_per_shard is None or consumers == 1:  # one consumer is balanced with any units: the largest
        return chunk_size
    total = sum(samples_per_shard)
    floor = min(batch_size, total // consumers)  # a batch, unless that is more than a share
    balanced = total // (8 * consumers)
    if balanced > floor:  # whole batches, so that a unit does not end in a sliver of a batch
        balanced -= balanced % floor
    return max(1, min(chunk_size, max(balanced, floor)))


def contiguous_owner(start: int, size: int, total: int, consumers: int) -> int:
    """The consumer of the unit of ``size`` samples whose first sample is number ``start`` of ``total``.

    Consumer ``c`` owns the units whose middle lies in ``[c total / consumers, (c + 1) total / consumers)``:
    contiguous runs of equal sample counts, each boundary off by at most half a unit. (Units of no samples go
    where they start.)
    """
    if total <= 0:
        return 0
    return min(consumers - 1, (2 * start + size) * consumers // (2 * total))
