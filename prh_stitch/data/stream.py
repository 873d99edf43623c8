"""Reading paired image-caption shards: a ``webdataset`` pipeline with a few stages of our own.

The pipeline (``PairedShards``): shard list (``webdataset.SimpleShardList``, or ``webdataset.ResampledShards``
for resampled epochs) -> per-epoch shard shuffle (``webdataset.shuffle``) -> our split stage (``split.py``'s one
rule) -> our shard reader -> sample shuffle buffer (``webdataset.shuffle``) -> our decoder; transforms are
webdataset stages appended to it (``.compose(wds.map_dict(image=...))``). Shards open through ``webdataset.gopen``
(local paths, ``file:``, ``http(s)://`` via curl, every scheme gopen knows), except ``pipe:`` commands, which we
start ourselves (see ``_Source``).

Ours, because webdataset cannot do it:

* the reader, on ``tarfile`` in stream mode: it delivers every complete sample before a truncation and marks the
  sample whose member was cut, and it tells a complete archive (zero-block end marker) from one that just stops
  (webdataset ends such a shard silently, or with an exception that loses which samples were good);
* decoding with each failure counted by reason (``SkipStats``), where webdataset's handlers only skip or raise;
* a ``pipe:`` command that exits non-zero is reported, and one stopped early is killed with its whole process group
  (webdataset's ``Pipe`` waits for the command to finish, up to two hours);
* the exactly-once "sample" split when there are fewer shards than consumers.

Skip reasons (``SkipStats.skipped`` keys): per sample ``missing_image``, ``undecodable_image``, ``missing_caption``,
``undecodable_caption``, ``empty_caption``, ``undecodable_meta``, ``truncated_sample``; per shard
``unreadable_shard`` (cannot be opened, or is not a tar), ``truncated_shard`` (ends before its end marker),
``pipe_failed`` (a ``pipe:`` or download command exited non-zero). With DataLoader workers each worker counts in
its own copy of the stats; ``batches.BatchLoader`` carries the workers' counts to the main process with the batches.
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import os
import random
import signal
import subprocess
import tarfile
import zlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence

import numpy as np
import torch
import webdataset as wds
from webdataset.gopen import Pipe, gopen
from PIL import Image
from torch.utils.data import get_worker_info
from webdataset.tariterators import base_plus_ext

from prh_stitch.data.shards import expand_urls, keys_digest
from prh_stitch.data.split import current_consumer, owner, split_mode

logger = logging.getLogger("prh_stitch.data")

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
PROBLEM = "__problem__"  # key of a shard-level problem record in the stream of raw samples
TRUNCATED = "__truncated__"  # set on a raw sample one of whose members was cut off
_TAR_ERRORS = (tarfile.TarError, EOFError, OSError, zlib.error)  # what cut or corrupt archives raise


@dataclass
class SkipStats:
    """Good samples and skipped ones by reason, overall and per shard URL; ``merge`` adds another's counts."""

    good: int = 0
    skipped: Counter = field(default_factory=Counter)
    shards: Dict[str, Dict[str, Any]] = field(default_factory=dict)

    def opened(self, url: str) -> Dict[str, Any]:
        """The counts of shard ``url`` (created at zero: a shard read counts even when it gives nothing)."""
        return self.shards.setdefault(url, {"good": 0, "skipped": Counter()})

    def add_good(self, url: str) -> None:
        self.good += 1
        self.opened(url)["good"] += 1

    def add_skip(self, url: str, reason: str) -> None:
        self.skipped[reason] += 1
        self.opened(url)["skipped"][reason] += 1

    @property
    def shards_read(self) -> int:
        return len(self.shards)

    def merge(self, other: "SkipStats") -> "SkipStats":
        self.good += other.good
        self.skipped.update(other.skipped)
        for url, counts in other.shards.items():
            mine = self.opened(url)
            mine["good"] += counts["good"]
            mine["skipped"].update(counts["skipped"])
        return self

    def take(self) -> "SkipStats":
        """The counts so far, which are then reset (how a worker hands its counts on with each batch)."""
        taken = SkipStats(self.good, self.skipped, self.shards)
        self.good, self.skipped, self.shards = 0, Counter(), {}
        return taken

    def as_dict(self) -> Dict[str, Any]:
        return {
            "good": self.good,
            "skipped": dict(sorted(self.skipped.items())),
            "shards_read": self.shards_read,
            "shards": [{"url": url, "good": c["good"], "skipped": dict(sorted(c["skipped"].items()))}
                       for url, c in sorted(self.shards.items())],
        }


# -- opening and reading one shard ---------------------------------------------------------------------


class _EndMarkerTarInfo(tarfile.TarInfo):
    """Notes on the TarFile whether the archive ended with its end marker: ``TarFile.next()`` returns None both
    for a proper end marker and for data that stops on a header boundary; only the header parser knows which."""

    @classmethod
    def fromtarfile(cls, tar):
        try:
            return super().fromtarfile(tar)
        except tarfile.EOFHeaderError:
            tar.prh_saw_end_marker = True
            raise


def _problem(url: str, reason: str, detail: str) -> Dict[str, Any]:
    return {PROBLEM: reason, "detail": detail, "__url__": url}


def _members(url: str, stream) -> Iterator[Any]:
    """``(name, bytes)`` of each regular member (bytes None when the data stops inside it); a problem last."""
    try:
        tar = tarfile.open(fileobj=stream, mode="r|*", tarinfo=_EndMarkerTarInfo)
    except _TAR_ERRORS as exc:
        yield _problem(url, "unreadable_shard", f"not a readable tar: {exc}")
        return
    while True:
        try:
            info = tar.next()
        except _TAR_ERRORS as exc:
            yield _problem(url, "truncated_shard", f"archive cut or corrupt: {exc}")
            return
        if info is None:
            if not getattr(tar, "prh_saw_end_marker", False):
                yield _problem(url, "truncated_shard", "archive stops without its end marker")
            return
        tar.members = []  # stream mode remembers every header otherwise: memory would grow with the shard
        if info.isreg():
            try:
                yield info.name, tar.extractfile(info).read()
            except _TAR_ERRORS as exc:
                yield info.name, None
                yield _problem(url, "truncated_shard", f"member {info.name} cut off: {exc}")
                return


def tar_samples(url: str, stream) -> Iterator[Dict[str, Any]]:
    """webdataset-style raw samples (``__key__``, ``__url__``, one bytes value per extension) of an open tar.

    Members group by webdataset's rule (``base_plus_ext``); ``__meta__`` members are skipped; a repeated extension
    keeps its first member. A sample with a cut member gets ``__truncated__``, and so does the last one before a
    cut when it lacks a member the sample before it had (the cut took that member, e.g. inside its header); a shard
    problem comes last.
    """
    sample: Optional[Dict[str, Any]] = None
    before: Optional[set] = None  # the member extensions of the sample before this one
    for item in _members(url, stream):
        if isinstance(item, dict):
            if sample is not None:
                if item[PROBLEM] == "truncated_shard" and (before is None or not before <= sample.keys()):
                    sample[TRUNCATED] = True  # lacks a member its predecessor had: the cut took it (e.g. its header)
                yield sample
            yield item
            return
        key, ext = base_plus_ext(item[0])
        if key is None or key.startswith("__"):
            continue
        if sample is None or sample["__key__"] != key:
            if sample is not None:
                before = {k for k in sample if not k.startswith("__")}
                yield sample
            sample = {"__key__": key, "__url__": url}
        if item[1] is None:
            sample[TRUNCATED] = True
        else:
            sample.setdefault(ext.lower(), item[1])
    if sample is not None:
        yield sample


class _Source:
    """An opened shard: ``pipe:`` commands started by us in their own process group; the rest by gopen."""

    def __init__(self, url: str) -> None:
        self.process, self.own_group = None, url.startswith("pipe:")
        if self.own_group:
            self.process = subprocess.Popen(url[5:], shell=True, stdout=subprocess.PIPE, start_new_session=True)
            self.stream = self.process.stdout
        else:
            opened = self.pipe = gopen(url)  # kept: the Pipe closes its stream when it is collected
            if isinstance(opened, Pipe):  # a download command (curl for http(s)://): we check its status
                self.process, self.stream = opened.proc, opened.stream
            else:
                self.stream = opened

    def close(self, finished: bool) -> int:
        """Close; a command is drained if read to the end, else killed. Returns its exit status (0 for files)."""
        if self.process is None:
            self.stream.close()
            return 0
        if finished:
            while self.stream.read(1 << 16):  # trailing padding: so the command is not killed by SIGPIPE
                pass
        else:
            try:  # the whole group of a pipe: command (a shell's children too); gopen's command alone
                os.killpg(self.process.pid, signal.SIGKILL) if self.own_group else self.process.kill()
            except ProcessLookupError:
                pass  # already gone
        self.stream.close()
        status = self.process.wait()  # reaped either way
        return status if finished else 0


def read_shard(url: str) -> Iterator[Dict[str, Any]]:
    """Raw samples of one shard, then a problem record if it is unreadable, cut, or its command failed."""
    try:
        source = _Source(url)
    except (OSError, ValueError) as exc:
        yield _problem(url, "unreadable_shard", str(exc))
        return
    problem, finished = None, False
    try:
        for item in tar_samples(url, source.stream):
            if PROBLEM in item:
                problem = item
            else:
                yield item
        finished = True
    finally:
        status = source.close(finished)
    if status != 0:
        detail = f"command exited with status {status}" + (f"; {problem['detail']}" if problem else "")
        problem = _problem(url, "pipe_failed", detail)
    if problem is not None:
        yield problem


# -- decoding --------------------------------------------------------------------------------------------


def to_8bit(image: Image.Image) -> Image.Image:
    """16-bit grayscale (``I;16*``, as PIL opens 16-bit PNGs) scaled to 8-bit ``L``; other modes as they are.

    PIL's own ``convert`` clips these to 0..255, which turns almost every pixel of a 16-bit image white.
    """
    if image.mode.startswith("I;16"):
        pixels = np.asarray(image, dtype=np.int64)
        return Image.fromarray(((np.clip(pixels, 0, 65535) + 128) // 257).astype(np.uint8), mode="L")
    return image


def decode_sample(raw: Dict[str, Any], image_mode: Optional[str]) -> Dict[str, Any]:
    """``{key, image, caption, meta, url}`` of a raw sample; ``{"skip": reason, "detail": ...}`` when it is bad."""
    def bad(reason: str, detail: str) -> Dict[str, Any]:
        return {"skip": reason, "detail": detail}

    if raw.get(TRUNCATED):
        return bad("truncated_sample", "a member was cut off by the end of the shard")
    members = sorted(k for k in raw if not k.startswith("__"))
    image_ext = next((ext for ext in IMAGE_EXTENSIONS if ext in raw), None)
    if image_ext is None:
        return bad("missing_image", f"no image member ({'/'.join(IMAGE_EXTENSIONS)}); found {members}")
    if "txt" not in raw:
        return bad("missing_caption", f"no .txt member; found {members}")
    try:
        caption = raw["txt"].decode("utf-8").strip()
    except UnicodeDecodeError as exc:
        return bad("undecodable_caption", str(exc))
    if not caption:
        return bad("empty_caption", "caption is empty or whitespace")
    meta: Any = {}
    if "json" in raw:
        try:
            meta = json.loads(raw["json"].decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            return bad("undecodable_meta", str(exc))
        if not isinstance(meta, dict):
            return bad("undecodable_meta", f"meta is a JSON {type(meta).__name__}, not an object")
    try:
        image = Image.open(io.BytesIO(raw[image_ext]))
        image.load()  # all pixels now: a truncated or garbage file fails here, not in a transform
        if image_mode and image.mode != image_mode:
            image = to_8bit(image).convert(image_mode)
    except Exception as exc:  # noqa: BLE001 - PIL's decoders raise many types (OSError, SyntaxError, ValueError...)
        return bad("undecodable_image", f"{type(exc).__name__}: {exc}")
    return {"key": raw["__key__"], "image": image, "caption": caption, "meta": meta, "url": raw["__url__"]}


def decoded(raw_samples: Iterable[Dict[str, Any]], stats: SkipStats, image_mode: Optional[str]) -> Iterator[Dict[str, Any]]:
    """The decoding stage: good samples on, bad ones counted by reason and logged once at WARNING."""
    for raw in raw_samples:
        sample = decode_sample(raw, image_mode)
        if "skip" in sample:
            stats.add_skip(raw["__url__"], sample["skip"])
            logger.warning("skipping sample %r in %s: %s (%s)", raw["__key__"], raw["__url__"], sample["skip"], sample["detail"])
            continue
        stats.add_good(sample["url"])
        yield sample


def count_problem(problem: Dict[str, Any], stats: SkipStats) -> None:
    stats.add_skip(problem["__url__"], problem[PROBLEM])
    logger.warning("shard %s: %s (%s)", problem["__url__"], problem[PROBLEM], problem["detail"])


# -- the pipeline ----------------------------------------------------------------------------------------


class _Stage(wds.PipelineStage):
    """A stage built when a pass starts (``build()`` returns a filter), so it sees the epoch and the worker."""

    def __init__(self, build: Callable[[], Callable[[Iterable], Iterator]]) -> None:
        self.build = build

    def run(self, src: Iterable) -> Iterator:
        return self.build()(src)


class _EpochResampled(wds.ResampledShards):
    """webdataset's shards drawn with replacement, seeded by (seed, our epoch, consumer) instead of its own count."""

    def __init__(self, urls: List[str], seed: int, epoch: Callable[[], int], consumer: Callable[[], int]) -> None:
        super().__init__(urls, seed=seed, worker_seed=consumer, deterministic=True)
        self.epoch_of = epoch

    def __iter__(self):
        self.epoch = self.epoch_of() - 1  # the parent adds one
        return super().__iter__()


class PairedShards(wds.DataPipeline):
    """Paired image-caption samples streamed from shards: dicts ``{key, image, caption, meta, url}``.

    ``urls``: anything ``expand_urls`` accepts (checked here). ``shuffle_buffer > 0`` shuffles the shard order per
    epoch and the samples through a buffer of that many; the order is a function of ``seed``, ``set_epoch`` and the
    consumer. ``split``: see ``split.py``; ``rank``/``world_size`` override torch.distributed. ``resampled``: shards
    drawn with replacement by each consumer, ``epoch_length`` samples per epoch over all ranks (each rank
    ``epoch_length // world``, spread over its workers as evenly as possible, so every rank gets as many batches).
    ``image_mode`` converts decoded images (None keeps the stored mode). Bad samples and shards are skipped and
    counted in ``stats``.
    """

    def __init__(
        self,
        urls: str | Sequence[str],
        shuffle_buffer: int = 0,
        seed: int = 0,
        split_by_node: bool = False,
        split_by_worker: bool = True,
        stats: Optional[SkipStats] = None,
        rank: Optional[int] = None,
        world_size: Optional[int] = None,
        split: str = "auto",
        image_mode: Optional[str] = "RGB",
        resampled: bool = False,
        epoch_length: Optional[int] = None,
    ) -> None:
        split_mode(split, 0, 1)  # checks the name now, not in the first pass
        current_consumer(True, False, rank, world_size)  # checks rank and world_size likewise
        if shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer must be >= 0, got {shuffle_buffer}")
        if resampled and (epoch_length is None or epoch_length < 1):
            raise ValueError(f"resampled streams need epoch_length >= 1 (samples per epoch), got {epoch_length}")
        self.urls: List[str] = expand_urls(urls)
        self.stats = stats if stats is not None else SkipStats()
        self.seed, self.split, self.image_mode = seed, split, image_mode
        self.split_by_node, self.split_by_worker, self.rank, self.world_size = split_by_node, split_by_worker, rank, world_size
        self.epoch_length = epoch_length
        # In shared memory, so DataLoader workers that outlive an epoch (persistent_workers=True) read the epoch the
        # main process sets, not the one in the copy of the dataset they started with.
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        shuffle = shuffle_buffer > 0
        if resampled:
            stages = [_EpochResampled(self.urls, seed, lambda: self.epoch, lambda: self.consumer()[0]),
                      self._read_resampled]
        else:
            stages = [wds.SimpleShardList(self.urls),
                      _Stage(lambda: wds.shuffle(len(self.urls), len(self.urls), rng=self._rng()) if shuffle else _same),
                      self._read_split]
        stages.append(_Stage(lambda: wds.shuffle(shuffle_buffer, shuffle_buffer, rng=self._rng(True)) if shuffle else _same))
        stages.append(lambda raw: decoded(raw, self.stats, image_mode))
        if resampled:
            stages.append(lambda samples: itertools.islice(samples, self.quota()))
        super().__init__(*stages)

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        """Change the shuffle of the next pass (before the pass's DataLoader iterator is created)."""
        self._epoch.fill_(int(epoch))

    def consumer(self):
        return current_consumer(self.split_by_node, self.split_by_worker, self.rank, self.world_size)

    def _rng(self, per_consumer: bool = False) -> random.Random:
        # The shard order must be the same on every consumer (the split relies on it); the sample buffer need not.
        return random.Random(str((self.seed, self.epoch, self.consumer() if per_consumer else None)))

    def quota(self) -> int:
        """Resampled: this consumer's samples per epoch (its rank's share, spread over the rank's workers)."""
        index, count = self.consumer()
        info = get_worker_info() if self.split_by_worker else None
        workers = info.num_workers if info is not None else 1
        return _share(self.epoch_length // (count // workers), workers, index % workers)

    def batches_per_rank(self, batch_size: int, num_workers: int) -> int:
        """Resampled: batches one rank yields per epoch when each worker batches its own quota."""
        _, world = current_consumer(self.split_by_node, False, self.rank, self.world_size)
        workers = max(1, num_workers)
        return sum(-(-_share(self.epoch_length // world, workers, w) // batch_size) for w in range(workers))

    def _read_split(self, shards: Iterable[Dict[str, str]]) -> Iterator[Dict[str, Any]]:
        """Reads this consumer's share by the one split rule; counts shard problems the shard's owner sees."""
        index, count = self.consumer()
        order = [shard["url"] for shard in shards]
        by_shard = split_mode(self.split, len(order), count) == "shard"
        position = 0  # raw samples so far in the common order, for the "sample" split
        for shard_position, url in enumerate(order):
            owns = owner(shard_position, count) == index
            if by_shard and not owns:
                continue
            self.stats.opened(url)
            for item in read_shard(url):
                if PROBLEM in item:
                    if owns:
                        count_problem(item, self.stats)
                    continue
                position += 1
                if by_shard or owner(position - 1, count) == index:
                    yield item

    def _read_resampled(self, shards: Iterable[Dict[str, str]]) -> Iterator[Dict[str, Any]]:
        barren = 0  # draws in a row that gave no sample at all
        for shard in shards:
            delivered = False
            self.stats.opened(shard["url"])
            for item in read_shard(shard["url"]):
                if PROBLEM in item:
                    count_problem(item, self.stats)
                    continue
                delivered = True
                yield item
            barren = 0 if delivered else barren + 1
            if barren >= 3 * len(self.urls) + 10:
                raise ValueError(f"{barren} shard draws in a row gave no sample from {len(self.urls)} shard(s) "
                                 f"({self.urls[0]} ...); check them with: python -m prh_stitch.data check \"PATTERN\"")


def _same(x):
    return x


def _share(total: int, parts: int, part: int) -> int:
    """Part ``part`` of ``total`` spread over ``parts`` as evenly as possible (the first ones get one more)."""
    return total // parts + (part < total % parts)


def scan(urls: str | Sequence[str]) -> Dict[str, Any]:
    """Read and decode every sample once; report counts, skips by reason, shards and the key hash.

    ``keys_sha256`` hashes the sorted good keys as the writer's manifest does, so a scan of intact shards
    reproduces the manifest's value; ``duplicate_keys`` counts keys seen more than once.
    """
    dataset = PairedShards(urls, split_by_worker=False, image_mode=None)
    keys = []
    for sample in dataset:
        keys.append(sample["key"])
        sample["image"].close()
    report = dataset.stats.as_dict()
    report.update(num_shards=len(dataset.urls), duplicate_keys=len(keys) - len(set(keys)), keys_sha256=keys_digest(keys))
    return report
