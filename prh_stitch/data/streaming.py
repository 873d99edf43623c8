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
the torchvision convention, views into one buffer per batch. (Images that are not 8-bit, possible with
``image_mode=None``, stay PIL.)

Moving pixels out of the workers. A DataLoader worker hands tensors over by moving each into a fresh
shared-memory segment, which the receiving process maps again: two rounds of page faults per batch, about as
costly as decoding the images on a virtualised host (measured here: one worker delivered 0.35x of the decode
rate of a plain loop). So each worker keeps a small ring of shared-memory slots (``_Ring``) and copies a
batch's pixels and model inputs into a free slot; in the main process the batch's tensors are views of that
slot (``Packet.open``), and the slot goes back to its worker when the last of them is garbage: a worker never
writes to memory a consumer can still see, and the copy into the slot hits memory that is already mapped. A slot's shared memory crosses to the main process
once (handing over a file descriptor costs an authenticated socket round trip, measured at ~3 ms per batch);
later packets name the slot, and the main process finds it in the ``Batcher``'s ``received`` table. So packets
from workers are opened through ``receive(packets, batcher.received)``, in the order they arrive, before the
next pass over the data starts (``StreamLoader`` and the feature store do this). If every slot is still in use
(a consumer holding packets unopened, a large ``prefetch_factor``), a packet travels the ordinary way.
"""

from __future__ import annotations

import itertools
import logging
import uuid
import weakref
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from prh_stitch.data.stream import PairedShards, SkipStats, _read_shard, _ShardProblem
from prh_stitch.encoders.base import FrozenEncoder, keep_large_allocations_in_heap

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
    describes has been put into a packet. Packets made in a worker carry their tensors in a ``Shipment``
    until the main process calls ``open``.
    """

    samples: List[Dict[str, Any]]
    inputs: Dict[str, Any]
    events: List[Any] = field(default_factory=list)
    images: Optional[Tuple[Tensor, List[Tuple[int, int, int]]]] = None  # see pack_images_from_arrays
    shipment: Optional["Shipment"] = None

    def open(self, received: Optional["Received"] = None) -> "Packet":
        """Make a worker's packet usable here: its tensors become views of the worker's ring slot, leased until
        the last of them is gone (a no-op for packets made in this process or sent the ordinary way).

        ``received``: the table of slots seen so far from the workers of this packet's ``Batcher``
        (``batcher.received``); see ``receive``.
        """
        if self.shipment is not None:
            self.images, self.inputs = self.shipment.unpack(received)
            self.shipment = None
        return self

    def batch(self) -> Dict[str, Any]:
        self.open()
        out: Dict[str, Any] = {name: [s[name] for s in self.samples] for name in ("key", "caption", "meta", "url")}
        if self.images is not None:
            out["image"] = unpack_images(*self.images)
        elif self.samples and "image" in self.samples[0]:
            out["image"] = [s["image"] for s in self.samples]
        out["inputs"] = self.inputs
        return out


def receive(packets: Iterable[Packet], received: "Received") -> Iterator[Packet]:
    """Open each packet as it arrives (main process); ``received`` is the ``Batcher``'s table of slots."""
    for packet in packets:
        yield packet.open(received)


def _pixel_arrays(images: Sequence[Any]) -> Optional[List[np.ndarray]]:
    """``(H, W, C)`` uint8 arrays of PIL images; None unless all are 8-bit."""
    arrays = [np.asarray(image) for image in images]
    if any(a.dtype != np.uint8 for a in arrays):
        return None
    return [a if a.ndim == 3 else a[:, :, None] for a in arrays]


def pack_images_from_arrays(arrays: Sequence[np.ndarray]) -> Tuple[Tensor, List[Tuple[int, int, int]]]:
    """A batch of ``(H, W, C)`` uint8 arrays as one flat tensor and their shapes (in-process batches)."""
    flat = torch.empty(sum(a.size for a in arrays), dtype=torch.uint8)
    buffer, offset = flat.numpy(), 0
    for a in arrays:
        buffer[offset:offset + a.size] = a.reshape(-1)
        offset += a.size
    return flat, [a.shape for a in arrays]


def unpack_images(flat: Tensor, shapes: Sequence[Tuple[int, int, int]]) -> List[Tensor]:
    """``(C, H, W)`` views into ``flat`` (no copy)."""
    out, offset = [], 0
    for h, w, c in shapes:
        out.append(flat[offset:offset + h * w * c].view(h, w, c).permute(2, 0, 1))
        offset += h * w * c
    return out


# -- the ring of shared-memory slots (see the module docstring) ------------------------------------------


def _flatten(tree: Any) -> Tuple[List[Tensor], Any]:
    """Tensor leaves of nested dicts/lists/tuples, and a spec to put them back (other leaves stay in the spec)."""
    leaves: List[Tensor] = []

    def walk(node: Any) -> Any:
        if isinstance(node, Tensor):
            leaves.append(node)
            return ("tensor", len(leaves) - 1)
        if isinstance(node, dict):
            return ("dict", [(k, walk(v)) for k, v in node.items()])
        if isinstance(node, (list, tuple)):
            return (type(node).__name__, [walk(v) for v in node])
        return ("leaf", node)

    return leaves, walk(tree)


def _unflatten(spec: Any, leaves: Sequence[Tensor]) -> Any:
    kind, value = spec
    if kind == "tensor":
        return leaves[value]
    if kind == "dict":
        return {k: _unflatten(v, leaves) for k, v in value}
    if kind in ("list", "tuple"):
        items = [_unflatten(v, leaves) for v in value]
        return items if kind == "list" else tuple(items)
    return value


_ALIGN = 64  # bytes; every tensor in a slot starts on a cache line
_PIXELS = "\0pixels"  # key of a sample's kept pixels among its prepared parts (no encoder can have this name)


class Received:
    """Main-process side of the workers' rings: the shared memory of every slot seen, by worker.

    A worker's first packet through a slot (and the first after the slot grew) carries the slot's memory;
    later ones only name it. A worker that restarted (new epoch without persistent workers) has a new ring:
    its old slots are dropped here when its first packet arrives.
    """

    def __init__(self) -> None:
        self.workers: Dict[int, Dict[str, Any]] = {}

    def slot(self, shipment: "Shipment") -> Tuple[Tensor, Tensor]:
        entry = self.workers.get(shipment.worker)
        if entry is None or entry["ring"] != shipment.ring:
            entry = self.workers[shipment.worker] = {"ring": shipment.ring, "busy": None, "slots": {}}
        if shipment.busy is not None:
            entry["busy"] = shipment.busy
        if shipment.buffer is not None:
            entry["slots"][shipment.slot] = (shipment.generation, shipment.buffer)
        generation, buffer = entry["slots"].get(shipment.slot, (None, None))
        if generation != shipment.generation or entry["busy"] is None:
            raise RuntimeError(
                "a packet names a worker's shared-memory slot this process never received: open packets through "
                "streaming.receive(packets, batcher.received), in arrival order, before the next pass starts"
            )
        return buffer, entry["busy"]


@dataclass
class Shipment:
    """A packet's tensors in slot ``slot`` of a worker's ring: where each one is, and how to rebuild the tree."""

    ring: str  # the ring's identity (one per worker process)
    worker: int  # DataLoader worker id
    slot: int
    generation: int  # how many times the slot was (re)allocated
    buffer: Optional[Tensor]  # the slot's shared memory (uint8), on its first trip only
    busy: Optional[Tensor]  # the ring's flags (int32, shared), on the ring's first trip only; 1 = holds an unopened packet
    size: int  # bytes used in the slot
    image_shapes: Optional[List[Tuple[int, int, int]]]  # images first, back to back from offset 0
    tensors: List[Tuple[int, torch.dtype, Tuple[int, ...]]]  # (offset, dtype, shape) of each input tensor
    spec: Any  # the inputs tree (see _flatten)

    def unpack(self, received: Optional[Received]) -> Tuple[Any, Dict[str, Any]]:
        if received is None:
            if self.buffer is None or self.busy is None:
                raise RuntimeError("a packet from a DataLoader worker must be opened with the Batcher's table: "
                                   "use streaming.receive(packets, batcher.received)")
            buffer, busy = self.buffer, self.busy
        else:
            buffer, busy = received.slot(self)
        # No copy: the batch's tensors are views of the slot, and the slot is handed back to the worker only when
        # the last of them is gone. ``lease`` is a fresh NumPy view that every tensor below keeps alive (through
        # torch.from_numpy); its finaliser clears the busy flag.
        lease = buffer.numpy()[:self.size]
        weakref.finalize(lease, _release, busy.numpy(), self.slot)
        local = torch.from_numpy(lease)
        images = None
        if self.image_shapes is not None:
            total = sum(h * w * c for h, w, c in self.image_shapes)
            images = (local[:total], self.image_shapes)
        leaves = [local[offset:offset + _nbytes(dtype, shape)].view(dtype).view(shape)
                  for offset, dtype, shape in self.tensors]
        return images, _unflatten(self.spec, leaves)


def _release(busy: np.ndarray, slot: int) -> None:
    busy[slot] = 0  # the worker may write the slot again


def _nbytes(dtype: torch.dtype, shape: Sequence[int]) -> int:
    return int(np.prod(shape, dtype=np.int64)) * torch.empty((), dtype=dtype).element_size()


class _Ring:
    """Worker side: shared-memory slots reused packet after packet (at most ``max_slots``)."""

    def __init__(self, worker: int, max_slots: int = 8) -> None:
        self.id = uuid.uuid4().hex
        self.worker = worker
        self.busy = torch.zeros(max_slots, dtype=torch.int32).share_memory_()
        self.buffers: List[Tensor] = []
        self.generations: List[int] = []
        self.sent: set = set()  # (slot, generation) already handed over; "busy" once the flags were
        self.max_slots = max_slots
        self.turn = 0

    def new_pass(self) -> None:
        """A new pass over the data: packets of the last one that were never opened never will be (the DataLoader
        drops them when a pass is cut short), so their slots are free."""
        self.busy.zero_()

    def _slot(self, size: int) -> Optional[int]:
        """A free slot (grown to ``size`` bytes if needed), or None when all ``max_slots`` are in use."""
        count = len(self.buffers)
        for step in range(count):
            slot = (self.turn + step) % count
            if int(self.busy[slot]) == 0:
                break
        else:
            if count == self.max_slots:
                return None
            slot = count
            self.buffers.append(torch.empty(0, dtype=torch.uint8))
            self.generations.append(-1)
        self.turn = (slot + 1) % max(1, len(self.buffers))
        if self.buffers[slot].numel() < size:
            # A quarter more than asked, so slightly larger batches later do not reallocate; zero-filled once
            # here, then only ever rewritten.
            self.buffers[slot] = torch.zeros(size + size // 4 + _ALIGN, dtype=torch.uint8).share_memory_()
            self.generations[slot] += 1
        return slot

    def ship(self, arrays: Optional[List[np.ndarray]], inputs: Dict[str, Any]) -> Optional[Shipment]:
        leaves, spec = _flatten(inputs)
        size = sum(a.size for a in arrays) if arrays is not None else 0
        layout = []
        for leaf in leaves:
            size = -(-size // _ALIGN) * _ALIGN
            layout.append((size, leaf.dtype, tuple(leaf.shape)))
            size += leaf.numel() * leaf.element_size()
        slot = self._slot(size)
        if slot is None:
            return None
        buffer = self.buffers[slot]
        if arrays is not None:
            view, offset = buffer.numpy(), 0
            for a in arrays:
                view[offset:offset + a.size] = a.reshape(-1)
                offset += a.size
        for leaf, (offset, dtype, shape) in zip(leaves, layout):
            buffer[offset:offset + leaf.numel() * leaf.element_size()].view(dtype).view(shape).copy_(leaf)
        self.busy[slot] = 1
        first_trip = (slot, self.generations[slot]) not in self.sent
        first_flags = "busy" not in self.sent
        self.sent.update({(slot, self.generations[slot]), "busy"})
        return Shipment(self.id, self.worker, slot, self.generations[slot], buffer if first_trip else None,
                        self.busy if first_flags else None, size,
                        [a.shape for a in arrays] if arrays is not None else None, layout, spec)


class _StatsTap:
    """Differences of a live ``SkipStats`` since the previous ``take()``."""

    def __init__(self, stats: SkipStats) -> None:
        self.stats = stats
        # What was counted before this pass was reported by earlier passes (a reader reused over epochs).
        self.seen = stats.copy()

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
        self.received = Received()  # main-process side of the workers' rings (see receive)

    def __getstate__(self) -> Dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("received", None)  # main-process bookkeeping: workers (spawned ones too) need none of it
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.received = Received()

    def set_epoch(self, epoch: int) -> None:
        set_epoch = getattr(self.source, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch)

    def _prepare(self, sample: Dict[str, Any]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
        """Per-sample work, done as each sample arrives, while its decoded pixels are still in the CPU's cache
        (deferring it to batch time, 64 images later, was measured ~20 % slower): every encoder's transform,
        and the pixels as a uint8 array when images are kept. Returns (sample, its prepared parts)."""
        prepared: Dict[str, Any] = {name: encoder.transform(model_input(sample, encoder))
                                    for name, encoder in self.encoders.items()}
        if self.keep_images:
            pixels = _pixel_arrays([sample["image"]])
            if pixels is not None:
                prepared[_PIXELS] = pixels[0]
                del sample["image"]
        else:
            sample.pop("image", None)
        return sample, prepared

    def _packet(self, batch: List[Tuple[Dict[str, Any], Dict[str, Any]]], events: List[Any],
                ring: Optional[_Ring]) -> Packet:
        samples = [sample for sample, _ in batch]
        inputs: Dict[str, Any] = {}
        arrays = None
        if batch:
            for name, encoder in self.encoders.items():
                inputs[name] = encoder.collate([prepared[name] for _, prepared in batch])
            if self.keep_images and all(_PIXELS in prepared for _, prepared in batch):
                arrays = [prepared[_PIXELS] for _, prepared in batch]
            elif self.keep_images:  # some images are not 8-bit: all travel as they are (PIL)
                for sample, prepared in batch:
                    if _PIXELS in prepared:
                        sample["image"] = torch.tensor(prepared[_PIXELS]).permute(2, 0, 1)
        if ring is not None and (arrays is not None or inputs):
            shipment = ring.ship(arrays, inputs)
            if shipment is not None:
                return Packet(samples, {}, events, None, shipment)
        images = pack_images_from_arrays(arrays) if arrays is not None else None
        return Packet(samples, inputs, events, images)

    def __iter__(self) -> Iterator[Packet]:
        # Batch buffers are megabytes: keep freed ones for reuse instead of faulting fresh pages in per batch.
        keep_large_allocations_in_heap()
        tap = _StatsTap(self.stats) if self.stats is not None else None
        # In a DataLoader worker, tensors leave through the ring (kept for the worker's next pass when workers
        # persist); in the main process they need not move.
        ring = None
        info = get_worker_info()
        if info is not None:
            ring = self._ring = getattr(self, "_ring", None) or _Ring(info.id)
            ring.new_pass()

        def events_now(events: List[Any]) -> List[Any]:
            delta = tap.take() if tap is not None else None
            return events + [StatsEvent(delta)] if delta is not None else events

        samples: List[Dict[str, Any]] = []
        events: List[Any] = []
        for item in self.source:
            if not isinstance(item, dict):
                events.append(item)
                if self.flush_on_event:
                    yield self._packet(samples, events_now(events), ring)
                    samples, events = [], []
                continue
            if len(samples) == self.batch_size:
                yield self._packet(samples, events_now(events), ring)
                samples, events = [], []
            samples.append(self._prepare(item))
        final = events_now(events)
        if samples or final:
            yield self._packet(samples, final, ring)


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
        for packet in receive(super().__iter__(), self.dataset.received):
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
