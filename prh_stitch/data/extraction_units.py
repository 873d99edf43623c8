"""Who extracts what: the ranks extracting one entry together, and each consumer's units of work.

A unit is a block of ``chunk_size`` raw samples of one shard. ``UnitReader`` yields this consumer's samples
(only its units are decoded) and a ``UnitDone`` at the end of each of its units; ``unit_batches`` turns them into
encoder batches that never span two units, so the features do not depend on how many consumers did the work.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Set, Tuple

from contextlib import closing

from torch.utils.data import IterableDataset

from prh_stitch.data.batches import Prepare, collate
from prh_stitch.data.split import contiguous_owner, current_consumer, owner, split_mode
from prh_stitch.data.store_entry import BadFeatures, EntryMismatch, IncompleteShards
from prh_stitch.data.stream import PROBLEM, SkipStats, count_problem, decoded, read_shard
from prh_stitch.encoders.base import FrozenEncoder
from prh_stitch.errors import UserError

# -- the processes that extract one entry together -----------------------------------------------------


@dataclass
class Ranks:
    """This process's place among those extracting together, and one collective: ``exchange``.

    ``exchange(obj)`` returns every rank's ``obj`` in rank order; all ranks must call it the same number of
    times. ``Ranks()`` is a single process; ``from_torch()`` uses an initialised torch.distributed group.
    """

    rank: int = 0
    world: int = 1
    exchange: Callable[[Any], List[Any]] = field(default=lambda obj: [obj])

    @classmethod
    def from_torch(cls) -> "Ranks":
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return cls()

        def exchange(obj: Any) -> List[Any]:
            gathered: List[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, obj)
            return gathered

        return cls(dist.get_rank(), dist.get_world_size(), exchange)

    @classmethod
    def from_trainer(cls, trainer: Any) -> "Ranks":
        """The trainer's processes (Lightning has initialised torch.distributed for multi-process strategies)."""
        if trainer is None or trainer.world_size <= 1:
            return cls()
        return cls.from_torch()

    def agree(self, error: Optional[BaseException]) -> List[Optional[Tuple[str, str]]]:
        """Share whether each rank failed; raise on every rank if any did (no rank is left waiting)."""
        mine = None if error is None else (type(error).__name__, str(error))
        everyone = self.exchange(mine)
        failed = [(rank, e) for rank, e in enumerate(everyone) if e is not None]
        if failed:
            if error is not None:
                raise error
            rank, (kind, message) = failed[0]
            known = (BadFeatures, EntryMismatch, IncompleteShards, UserError, ValueError)  # user errors stay user errors
            cls = {k.__name__: k for k in known}.get(kind, RuntimeError)
            raise cls(f"feature extraction failed on rank {rank}: {message}")
        return everyone


# -- units of work -------------------------------------------------------------------------------------


@dataclass
class UnitDone:
    """End of one unit of work (shard ``shard``, block ``block``), with its counts."""

    shard: int
    block: int
    url: str
    raw: int  # raw samples in the block, good or bad
    last: bool  # the block ends its shard
    good: int
    skipped: Dict[str, int]


def _label(meta: Any) -> int:
    label = meta.get("label", -1) if isinstance(meta, dict) else -1
    return int(label) if isinstance(label, (int, float)) else -1


class UnitReader(IterableDataset):
    """Reads this consumer's units of the shards, skipping done ones; yields samples and ``UnitDone`` events.

    The split is ``split.py``'s rule. With ``counts`` (samples per shard, from the manifests) the units still to do
    are dealt in contiguous runs of equal sample counts (``contiguous_owner``): a consumer reads a shard only if its
    run lies in it, and only up to the end of its run (one sample further, to learn whether its last unit ends the
    shard); the owner of a shard's last unit still to do reads to the end, so a shard longer than its manifest
    still ends in one unit. Without counts: whole shards when there are at least as many as consumers, else units
    (numbered over all shards in order) round robin. Samples (decoded, tagged with their ``unit``) come in shard
    order; each unit this consumer owns ends with a ``UnitDone`` carrying its skip counts by reason, so counts reach
    the main process with the data even from DataLoader workers. Shard-level problems count in the unit that ends
    the shard. ``finished_shards``: {shard: its number of units} of shards done in an earlier run (not read again).
    """

    def __init__(self, urls: Sequence[str], chunk_size: int, done: Set[Tuple[int, int]],
                 finished_shards: Dict[int, int], rank: int = 0, world: int = 1,
                 counts: Optional[Sequence[int]] = None) -> None:
        super().__init__()
        self.urls, self.chunk_size, self.done, self.finished = list(urls), int(chunk_size), set(done), dict(finished_shards)
        self.rank, self.world = rank, world
        self.counts = None if counts is None else list(counts)
        if self.counts is not None and len(self.counts) != len(self.urls):
            raise ValueError(f"counts gives {len(self.counts)} shards' sample counts for {len(self.urls)} shards")

    def __iter__(self) -> Iterator[Any]:
        index, count = current_consumer(True, True, self.rank, self.world)
        if self.counts is not None:
            yield from self._planned(index, count)
            return
        by_shard = split_mode("auto", len(self.urls), count) == "shard"
        units_before = 0  # units of the shards before this one: the running unit number of the "sample" split
        for shard, url in enumerate(self.urls):
            if shard in self.finished:
                units_before += self.finished[shard]
                continue
            if by_shard and owner(shard, count) != index:
                continue

            def mine(block: int, shard: int = shard, first: int = units_before) -> bool:
                return (by_shard or owner(first + block, count) == index) and (shard, block) not in self.done

            units_before += yield from self._shard(shard, url, mine)

    def _planned(self, index: int, count: int) -> Iterator[Any]:
        """This consumer's contiguous run of the units still to do (see the class docstring)."""
        size = self.chunk_size
        plan = [(shard, block, min(size, n - block * size))
                for shard, n in enumerate(self.counts) if shard not in self.finished
                for block in range(max(1, -(-n // size))) if (shard, block) not in self.done]
        total, start, owned, last_block = sum(n for _, _, n in plan), 0, set(), {}
        for shard, block, n in plan:
            if contiguous_owner(start, n, total, count) == index:
                owned.add((shard, block))
                last_block[shard] = block  # the plan is in order: each shard's last owned block wins
            start += n
        last_planned = {shard: block for shard, block, _ in plan}
        for shard, url in enumerate(self.urls):
            if shard not in last_block:
                continue
            # The owner of the shard's last unit still to do reads to the end, and owns any unit past it not done yet
            # (a shard longer than its manifest says still ends in one unit).
            final = last_planned[shard]
            to_end = (shard, final) in owned

            def mine(block: int, shard: int = shard, final: int = final, to_end: bool = to_end) -> bool:
                return (shard, block) in owned or (to_end and block > final and (shard, block) not in self.done)

            yield from self._shard(shard, url, mine, None if to_end else (last_block[shard] + 1) * size)

    def _shard(self, shard: int, url: str, mine: Callable[[int], bool], stop: Optional[int] = None):
        """The shard's samples and unit ends; returns its number of units. With ``stop``, reading ends at the first
        sample at or past position ``stop`` (that it exists says the unit before it does not end the shard)."""
        block, position, stats = 0, 0, SkipStats()
        problems = []
        with closing(read_shard(url)) as items:  # closed when stopping early: a command is killed, a file closed
            for item in items:
                if PROBLEM in item:
                    problems.append(item)
                    continue
                if position // self.chunk_size != block:
                    if mine(block):
                        yield UnitDone(shard, block, url, self.chunk_size, False, stats.good, dict(stats.skipped))
                    block, stats = position // self.chunk_size, SkipStats()
                if stop is not None and position >= stop:
                    return block
                position += 1
                if mine(block):  # else not decoded: someone else's unit, or one finished in an earlier run
                    for sample in decoded([item], stats, "RGB"):
                        yield dict(sample, unit=(shard, block), label=_label(sample["meta"]))
        if mine(block):
            for problem in problems:
                count_problem(problem, stats)
            yield UnitDone(shard, block, url, position - block * self.chunk_size, True, stats.good, dict(stats.skipped))
        return block + 1


def unit_batches(items: Iterable[Any], batch_size: int, encoder: FrozenEncoder) -> Iterator[Tuple[str, Any]]:
    """The worker side of extraction: ``("batch", batch)`` of prepared samples, never spanning two units, and
    ``("done", UnitDone)`` once a unit's samples are all in batches.

    A text encoder's output depends on the caption alone, so a caption already seen in the unit is not prepared
    or encoded again: its sample travels in the batch with ``repeat`` True and no model input, and the main
    process copies the rows of its first occurrence (captions repeat: templated scenes, one caption per class).
    """
    prepare, batch, seen = Prepare({"encoder": encoder}), [], set()
    by_caption = encoder.modality == "text"
    for item in items:
        if isinstance(item, UnitDone) or len(batch) == batch_size:
            if batch:
                yield "batch", _collate_new(batch, encoder)
            batch = []
        if isinstance(item, UnitDone):
            seen = set()
            yield "done", item
        elif by_caption and item["caption"] in seen:
            batch.append(dict(item, repeat=True))  # only its key, caption, label and unit leave the worker
        else:
            seen.add(item["caption"])
            batch.append(dict(prepare(item), repeat=False))
    if batch:
        yield "batch", _collate_new(batch, encoder)


def _collate_new(samples: List[Dict[str, Any]], encoder: FrozenEncoder) -> Dict[str, Any]:
    """Every sample's fields as lists; the model input of the samples that are not repeats only."""
    new = [s for s in samples if not s["repeat"]]
    batch = collate(new, {"encoder": encoder}) if new else {"inputs": {}}
    for name in ("key", "caption", "label", "unit", "repeat"):
        batch[name] = [s[name] for s in samples]
    return batch
