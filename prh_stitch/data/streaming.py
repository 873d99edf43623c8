"""Raw streaming: batches of images and captions (preprocessed per encoder in the workers) straight from shards.

For the workflows that need pixels or text rather than cached features: feature extraction itself, evaluation
of a stitched pair end to end, or training anything that is not frozen. The pieces:

* ``Batcher`` -- the worker side. It groups a stream of samples into batches, runs every encoder's own
  per-sample preprocessing (``FrozenEncoder.transform``) and batching (``collate``) inside the DataLoader
  worker, and carries bookkeeping *events* along with the batches: skip-count deltas of the worker's reader,
  or whatever events its source yields (feature extraction sends the end of each unit of work this way).
  This is how skip counts reach the main process: with ``num_workers > 0`` each worker has its own copy of the
  reader's ``SkipStats``, so the worker ships what changed with every batch and the main process adds it up.
* ``ResampledShards`` -- shards drawn with replacement, without end, cut to a fixed epoch length with the
  same number of batches on every rank (``PairedShards`` is the exactly-once alternative).
* ``StreamLoader`` -- the main-process side: a DataLoader that sets the epoch before each pass, adds the
  workers' skip counts up and yields plain batch dicts.

``datamodule.StreamingDataModule`` puts these together as a LightningDataModule. This module imports no
Lightning, so feature extraction (which uses ``Batcher``) starts quickly from the command line.

Batches are dicts: ``key``, ``caption``, ``meta``, ``url`` (lists), ``inputs`` ({encoder name: model input})
and ``image`` (only when no encoder is set, or ``keep_images=True``): a list of uint8 ``(C, H, W)`` tensors,
the torchvision convention. They are views into one flat buffer per batch, which leaves a worker as one
shared-memory segment instead of one pickled PIL image per sample through a pipe (measured: as fast with one
worker, faster with two), and is what a torch consumer needs anyway. (Images that are not 8-bit, possible
with ``image_mode=None``, stay PIL.)
"""

from __future__ import annotations

import itertools
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from prh_stitch.data.stream import PairedShards, SkipStats, _read_shard, _ShardProblem
from prh_stitch.encoders.base import FrozenEncoder

logger = logging.getLogger("prh_stitch.data")


# -- events and packets ------------------------------------------------------------------------------


@dataclass
class StatsEvent:
    """Skip counts a worker's reader gathered since its previous event."""

    stats: SkipStats


@dataclass
class Packet:
    """What a worker hands the main process: samples, their model inputs, and the events that follow them.

    The events are to be applied *after* the samples: a worker emits an event only once everything it
    describes has been put into a packet.
    """

    samples: List[Dict[str, Any]]
    inputs: Dict[str, Any]
    events: List[Any] = field(default_factory=list)
    images: Optional[Tuple[Tensor, List[Tuple[int, int, int]]]] = None  # see pack_images

    def batch(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {name: [s[name] for s in self.samples] for name in ("key", "caption", "meta", "url")}
        if self.images is not None:
            out["image"] = unpack_images(*self.images)
        elif self.samples and "image" in self.samples[0]:
            out["image"] = [s["image"] for s in self.samples]
        out["inputs"] = self.inputs
        return out


def pack_images(images: Sequence[Any]) -> Optional[Tuple[Tensor, List[Tuple[int, int, int]]]]:
    """A batch of PIL images as one flat uint8 tensor and their ``(H, W, C)`` shapes; None unless all are 8-bit."""
    arrays = [np.asarray(image) for image in images]
    if any(a.dtype != np.uint8 for a in arrays):
        return None
    shapes = [a.shape if a.ndim == 3 else (*a.shape, 1) for a in arrays]
    flat = torch.empty(sum(a.size for a in arrays), dtype=torch.uint8)
    buffer, offset = flat.numpy(), 0
    for a in arrays:
        buffer[offset:offset + a.size] = a.reshape(-1)
        offset += a.size
    return flat, shapes


def unpack_images(flat: Tensor, shapes: Sequence[Tuple[int, int, int]]) -> List[Tensor]:
    """``(C, H, W)`` views into ``flat`` (no copy)."""
    out, offset = [], 0
    for h, w, c in shapes:
        out.append(flat[offset:offset + h * w * c].view(h, w, c).permute(2, 0, 1))
        offset += h * w * c
    return out


class _StatsTap:
    """Differences of a live ``SkipStats`` since the previous ``take()``."""

    def __init__(self, stats: SkipStats) -> None:
        self.stats = stats
        self.seen = SkipStats()

    def take(self) -> Optional[SkipStats]:
        current, seen = self.stats, self.seen
        delta = SkipStats(good=current.good - seen.good, skipped=current.skipped - seen.skipped)
        for url, counts in current.shards.items():
            before = seen.shards.get(url)
            if before is None:
                delta.shards[url] = {"good": counts["good"], "skipped": Counter(counts["skipped"])}
            elif counts["good"] != before["good"] or counts["skipped"] != before["skipped"]:
                delta.shards[url] = {"good": counts["good"] - before["good"], "skipped": counts["skipped"] - before["skipped"]}
        if not delta.good and not delta.skipped and not delta.shards:
            return None
        seen.merge(delta)
        return delta


def model_input(sample: Mapping[str, Any], encoder: FrozenEncoder) -> Any:
    """The raw side of a sample an encoder reads: the image for image encoders, the caption for text ones."""
    return sample["image"] if encoder.modality == "image" else sample["caption"]


class Batcher(IterableDataset):
    """Worker side of a stream: batches samples, preprocesses them per encoder, forwards events.

    ``source`` yields sample dicts (``key``, ``image``, ``caption``, ``meta``, ``url``, anything else is kept)
    and optionally event objects. ``stats``: the source's live ``SkipStats``, whose changes are attached to
    packets as ``StatsEvent``. ``flush_on_event``: emit the pending batch as soon as an event arrives (a
    batch then never spans two units of work), instead of letting the event ride with the next full batch.

    A full batch is held back until the next sample arrives, so the last packet of a worker carries its final
    skip counts and the number of packets is exactly the number of batches.
    """

    def __init__(
        self,
        source: IterableDataset,
        batch_size: int,
        encoders: Optional[Mapping[str, FrozenEncoder]] = None,
        keep_images: Optional[bool] = None,
        stats: Optional[SkipStats] = None,
        flush_on_event: bool = False,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.source = source
        self.batch_size = int(batch_size)
        self.encoders = dict(encoders or {})
        # Images are only worth shipping from the workers when nobody has turned them into tensors.
        self.keep_images = (not self.encoders) if keep_images is None else bool(keep_images)
        self.stats = stats
        self.flush_on_event = flush_on_event

    def set_epoch(self, epoch: int) -> None:
        set_epoch = getattr(self.source, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch)

    def _packet(self, samples: List[Dict[str, Any]], events: List[Any]) -> Packet:
        inputs, images = {}, None
        if samples:
            for name, encoder in self.encoders.items():
                inputs[name] = encoder.collate([encoder.transform(model_input(s, encoder)) for s in samples])
            if self.keep_images:
                images = pack_images([s["image"] for s in samples])
            if not self.keep_images or images is not None:
                for s in samples:
                    s.pop("image", None)
        return Packet(samples, inputs, events, images)

    def __iter__(self) -> Iterator[Packet]:
        tap = _StatsTap(self.stats) if self.stats is not None else None

        def events_now(events: List[Any]) -> List[Any]:
            delta = tap.take() if tap is not None else None
            return events + [StatsEvent(delta)] if delta is not None else events

        samples: List[Dict[str, Any]] = []
        events: List[Any] = []
        for item in self.source:
            if not isinstance(item, dict):
                events.append(item)
                if self.flush_on_event:
                    yield self._packet(samples, events_now(events))
                    samples, events = [], []
                continue
            if len(samples) == self.batch_size:
                yield self._packet(samples, events_now(events))
                samples, events = [], []
            samples.append(item)
        final = events_now(events)
        if samples or final:
            yield self._packet(samples, final)


# -- resampled shards ---------------------------------------------------------------------------------


class ResampledShards(PairedShards):
    """Shards drawn with replacement, without end, cut to ``epoch_length`` samples per epoch (all ranks together).

    Each consumer (rank x worker) draws shards from its own generator seeded by (seed, epoch, consumer), so
    a run is reproducible and consumers do not read in lockstep. Every rank gets ``epoch_length // world``
    samples, split over its workers the same way on every rank, so all ranks run the same number of batches
    (what DDP training needs; exactly-once streams cannot promise that). Shard problems are counted each time
    a bad shard is drawn.
    """

    def __init__(self, urls: str | Sequence[str], epoch_length: int, **kwargs: Any) -> None:
        super().__init__(urls, **kwargs)
        if epoch_length < 1:
            raise ValueError(f"epoch_length must be >= 1, got {epoch_length}")
        self.epoch_length = int(epoch_length)

    def _layout(self):
        """``(rank, world, worker, workers)`` of this consumer."""
        index, count = self.consumer()
        info = get_worker_info()
        workers = info.num_workers if (info is not None and self.split_by_worker) else 1
        return index // workers, count // workers, index % workers, workers

    def quota(self) -> int:
        _, world, worker, workers = self._layout()
        per_rank = self.epoch_length // world
        return per_rank // workers + (1 if worker < per_rank % workers else 0)

    def batches_per_rank(self, batch_size: int, num_workers: int) -> int:
        """Batches one rank yields per epoch when each worker batches its own quota (as ``Batcher`` does)."""
        _, world, _, _ = self._layout()  # called in the main process: world only
        workers = max(1, num_workers)
        per_rank = self.epoch_length // world
        return sum(-(-(per_rank // workers + (w < per_rank % workers)) // batch_size) for w in range(workers))

    def _raw_samples(self):
        index, count = self.consumer()
        rng = np.random.default_rng([self.seed, self.epoch, index, count])
        barren = 0  # consecutive draws that gave no sample at all
        while True:
            url = self.urls[int(rng.integers(len(self.urls)))]
            self.stats.shard_opened(url)
            delivered = False
            for item in _read_shard(url):
                if isinstance(item, _ShardProblem):
                    self.stats.add_skip(url, item.reason)
                    logger.warning("shard %s: %s (%s)", url, item.reason, item.detail)
                    continue
                delivered = True
                yield item
            barren = 0 if delivered else barren + 1
            if barren >= 3 * len(self.urls) + 10:
                raise ValueError(
                    f"{barren} shard draws in a row gave no sample from {len(self.urls)} shard(s) ({self.urls[0]} ...); "
                    "check them with: python -m prh_stitch.data check \"PATTERN\""
                )

    def __iter__(self):
        stream = super().__iter__()
        try:
            yield from itertools.islice(stream, self.quota())
        finally:
            stream.close()  # stops a pipe: command mid-shard instead of leaving it to the garbage collector


# -- the main-process side ----------------------------------------------------------------------------


class StreamLoader(DataLoader):
    """A DataLoader over a ``Batcher``: sets the epoch on each pass, adds up skip counts, yields batch dicts.

    ``on_event`` receives the events other than skip counts (none for plain sample streams).
    """

    def __init__(
        self,
        batcher: Batcher,
        stats: SkipStats,
        epoch: Callable[[], int],
        on_event: Optional[Callable[[Any], None]] = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(batcher, batch_size=None, **kwargs)
        self.stats = stats
        self.epoch = epoch
        self.on_event = on_event

    def __len__(self) -> int:
        # Known only for a fixed epoch length; Lightning reads a TypeError as "length unknown".
        batches = getattr(self.dataset.source, "batches_per_rank", None)
        if batches is None:
            raise TypeError("an exactly-once stream has no length known in advance")
        return batches(self.dataset.batch_size, self.num_workers)

    def packets(self) -> Iterator[Packet]:
        """Raw packets of one pass (skip counts already added to ``self.stats``)."""
        # Workers take their copy of the dataset when the iterator starts: set the epoch before that.
        self.dataset.set_epoch(self.epoch())
        for packet in super().__iter__():
            for event in packet.events:
                if isinstance(event, StatsEvent):
                    self.stats.merge(event.stats)
                elif self.on_event is not None:
                    self.on_event(event)
            yield packet

    def __iter__(self):
        for packet in self.packets():
            if packet.samples:
                yield packet.batch()
