"""Batches out of the reading pipeline: per-sample preparation in the workers, webdataset's ``batched``, and the
workers' skip counts carried to the main process with the batches (``BatchLoader``, a ``webdataset.WebLoader``).

Batch format (dicts): ``key``, ``caption``, ``meta``, ``url`` (lists); ``inputs`` ({encoder name: its collated model
input}); ``image`` (only when no encoder is set: encoders get their own inputs): the decoded pixels as uint8 ``(C, H, W)``, one
``(B, C, H, W)`` tensor when the images share a size (iterating over it gives each image), else a list of tensors;
images that are not 8-bit (possible with ``image_mode=None``) stay PIL. ``image_size`` resizes every image to a
square of that side first.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import get_worker_info

from prh_stitch.data.stream import SkipStats

STATS = "stats"  # the batch entry holding the worker's skip counts since its previous batch


class Prepare:
    """Per-sample work, done in the worker while the decoded pixels are in the CPU's cache: every encoder's own
    transform, or (without encoders) the pixels as a uint8 array."""

    def __init__(self, encoders: Mapping[str, Any], image_size: Optional[int] = None):
        self.encoders, self.image_size = dict(encoders), image_size

    def __call__(self, sample: Dict[str, Any]) -> Dict[str, Any]:
        image = sample.pop("image")
        if self.image_size is not None and image.size != (self.image_size, self.image_size):
            image = image.resize((self.image_size, self.image_size), Image.BILINEAR)
        sample["inputs"] = {name: encoder.transform(image if encoder.modality == "image" else sample["caption"])
                            for name, encoder in self.encoders.items()}
        if not self.encoders:
            pixels = np.asarray(image)  # (H, W, C) in a batch; channels first by a view, never by a copy
            sample["image"] = pixels.reshape(*pixels.shape[:2], -1) if pixels.dtype == np.uint8 else image
        return sample


def collate(samples: List[Dict[str, Any]], encoders: Mapping[str, Any]) -> Dict[str, Any]:
    batch: Dict[str, Any] = {name: [s[name] for s in samples] for name in ("key", "caption", "meta", "url")}
    batch["inputs"] = {name: encoder.collate([s["inputs"][name] for s in samples]) for name, encoder in encoders.items()}
    if samples and "image" in samples[0]:
        images = [s["image"] for s in samples]
        arrays = all(isinstance(i, np.ndarray) for i in images)
        if arrays and len({i.shape for i in images}) == 1:  # one (B, H, W, C) copy, seen as (B, C, H, W)
            pixels = torch.empty((len(images), *images[0].shape), dtype=torch.uint8)
            if get_worker_info() is not None:
                # Straight into shared memory: the DataLoader hands a shared tensor over as it is, where it would
                # copy any other into a fresh segment (a second copy and a second round of page faults).
                pixels.share_memory_()
            np.stack(images, out=pixels.numpy())
            batch["image"] = pixels.permute(0, 3, 1, 2)
        else:
            batch["image"] = [torch.from_numpy(i.copy()).permute(2, 0, 1) if isinstance(i, np.ndarray) else i
                              for i in images]
    for name in samples[0] if samples else ():
        if name not in batch and name not in ("image", "inputs"):
            batch[name] = [s[name] for s in samples]  # anything else a stage added (the store's units)
    return batch


def batch_stages(batch_size: int, encoders: Mapping[str, Any], image_size: Optional[int], stats: SkipStats,
                 ) -> List[Callable]:
    """Stages that turn decoded samples into batches, each carrying the skip counts since the previous one; a
    final batch without samples carries the counts after the last sample."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    encoders = dict(encoders)

    def with_counts(batches: Iterable[Dict[str, Any]]) -> Iterator[Dict[str, Any]]:
        for batch in batches:
            batch[STATS] = stats.take()
            yield batch
        yield {"key": [], STATS: stats.take()}

    return [wds.map(Prepare(encoders, image_size)),
            wds.batched(batch_size, collation_fn=lambda samples: collate(samples, encoders), partial=True),
            with_counts]


def _as_is(batch):
    return batch


class BatchLoader(wds.WebLoader):
    """A DataLoader over a batched pipeline: sets the epoch before each pass, adds the workers' skip counts up in
    ``stats`` and yields the batches that hold samples. ``length``: batches per pass, when known."""

    def __init__(self, pipeline, stats: SkipStats, epoch: Callable[[], int], num_workers: int = 0,
                 length: Optional[int] = None) -> None:
        super().__init__(pipeline, batch_size=None, num_workers=num_workers, persistent_workers=num_workers > 0,
                         collate_fn=_as_is)  # batches are made; default_convert would walk every list again
        self.loader, self.dataset, self.stats, self.epoch, self.length = self.pipeline[0], pipeline, stats, epoch, length

    @property
    def persistent_workers(self) -> bool:
        return self.loader.persistent_workers

    def __len__(self) -> int:
        if self.length is None:  # Lightning reads a TypeError as "length unknown"
            raise TypeError("an exactly-once stream has no length known in advance")
        return self.length

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        self.dataset.set_epoch(self.epoch())  # workers read it when their pass starts
        for batch in self.loader:
            self.stats.merge(batch.pop(STATS))
            if batch["key"]:
                yield batch
