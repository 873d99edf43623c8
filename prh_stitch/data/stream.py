"""Streaming paired image-caption samples out of tar shards, skipping and counting bad data.

Why our own reader on Python's ``tarfile`` rather than ``webdataset.WebDataset``: the guarantees we need
are per sample and per shard at once. webdataset's handlers act per pipeline stage, so an exception in
the tar iterator ends the shard without telling the truncated sample from the good ones before it, a
silently cut archive (cut on a header boundary) is indistinguishable from a complete one, and decoding
errors surface as exceptions without a reason to count. Reading with ``tarfile`` in stream mode (``r|*``,
which also reads gzip'd tars and pipes) lets us

* deliver every complete sample that precedes a truncation, and drop only the sample whose member was cut;
* tell a complete archive (it ends with the zero-block end marker) from one that just stops;
* decode image, caption and meta ourselves and count each failure by reason.

Uncompressed ustar/pax/GNU tars (what img2dataset and webdataset write) are read by a small header parser of
our own (``_members_ustar``) instead, with the same members and the same problems by reason (tested against
``tarfile`` on archives cut at every byte and corrupted at many): ``tarfile`` spent a fifth of the time of
reading and decoding a 224-px JPEG sample on parsing headers. Everything else goes to ``tarfile``.

Skip reasons (``SkipStats.skipped`` keys): per sample ``missing_image``, ``undecodable_image``,
``missing_caption``, ``undecodable_caption``, ``empty_caption``, ``undecodable_meta``,
``truncated_sample``; per shard ``unreadable_shard`` (cannot be opened, or is not a tar),
``truncated_shard`` (ends before its end marker), ``pipe_failed`` (a ``pipe:`` command exited non-zero).

Splitting across DataLoader workers and torch.distributed ranks -- the rule implemented:

* consumers = (world_size if split_by_node else 1) x (num_workers if split_by_worker else 1), and
  consumer index = rank x num_workers + worker_id. Every consumer sees the same shard order.
* ``split="shard"``: consumer c reads shards c, c + consumers, c + 2 x consumers, ... The union is the
  dataset exactly once, always; per-consumer counts are equal only when the shards hold equal numbers of
  samples and their number is a multiple of consumers.
* ``split="sample"``: every consumer reads every shard and keeps the samples whose running position
  (over raw samples, good or bad, in the common shard order) is c modulo consumers. Exactly once as
  well, counts differ by at most one, at the price of each consumer reading all bytes.
* ``split="auto"`` (default): "shard" when there are at least as many shards as consumers, else
  "sample", so no consumer sits idle and nothing is dropped or duplicated.

Shard-level problems are counted by one consumer only (the one that owns the shard by the shard rule), so
merged statistics count each problem once. With DataLoader workers, each worker process updates its own
copy of ``stats``; the parent's copy sees the counts only with ``num_workers=0`` (as ``scan`` does).
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import signal
import subprocess
import tarfile
import zlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from prh_stitch.data.shards import expand_urls, keys_digest
from prh_stitch.distributed import rank_world

logger = logging.getLogger("prh_stitch.data")

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
SAMPLE_REASONS = (
    "truncated_sample", "missing_image", "missing_caption", "undecodable_caption",
    "empty_caption", "undecodable_meta", "undecodable_image",
)
SHARD_REASONS = ("unreadable_shard", "truncated_shard", "pipe_failed")
SPLIT_MODES = ("auto", "shard", "sample")
# The webdataset grouping rule: the key is everything before the first dot of the last path component.
_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")
_PIPE_DRAIN_CHUNK = 1 << 16


@dataclass
class SkipStats:
    """Good samples and skipped ones by reason, overall and per shard URL; ``merge`` adds another's counts."""

    good: int = 0
    skipped: Counter = field(default_factory=Counter)
    shards: Dict[str, Dict[str, Any]] = field(default_factory=dict)

    def _shard(self, url: str) -> Dict[str, Any]:
        return self.shards.setdefault(url, {"good": 0, "skipped": Counter()})

    def shard_opened(self, url: str) -> None:
        self._shard(url)

    def add_good(self, url: str) -> None:
        self.good += 1
        self._shard(url)["good"] += 1

    def add_skip(self, url: str, reason: str) -> None:
        self.skipped[reason] += 1
        self._shard(url)["skipped"][reason] += 1

    @property
    def shards_read(self) -> int:
        return len(self.shards)

    @property
    def total_skipped(self) -> int:
        return sum(self.skipped.values())

    def copy(self) -> "SkipStats":
        return SkipStats().merge(self)

    def merge(self, other: "SkipStats") -> "SkipStats":
        self.good += other.good
        self.skipped.update(other.skipped)
        for url, counts in other.shards.items():
            mine = self._shard(url)
            mine["good"] += counts["good"]
            mine["skipped"].update(counts["skipped"])
        return self

    def as_dict(self) -> Dict[str, Any]:
        return {
            "good": self.good,
            "skipped": dict(sorted(self.skipped.items())),
            "shards_read": self.shards_read,
            "shards": [
                {"url": url, "good": c["good"], "skipped": dict(sorted(c["skipped"].items()))}
                for url, c in sorted(self.shards.items())
            ],
        }


@dataclass
class _RawSample:
    """The undecoded members of one key, as read from a shard."""

    key: str
    url: str
    files: Dict[str, bytes]
    truncated: bool = False  # one of its members was cut off by the end of the data


@dataclass
class _ShardProblem:
    url: str
    reason: str
    detail: str


class _EndMarkerTarInfo(tarfile.TarInfo):
    """Records on the TarFile whether the archive ended with its zero-block end marker.

    ``TarFile.next()`` returns None both for a proper end marker and for data that just stops on a
    header boundary; only the header parser knows which, so we note it where it is decided.
    """

    @classmethod
    def fromtarfile(cls, tar):
        try:
            return super().fromtarfile(tar)
        except tarfile.EOFHeaderError:
            tar.prh_saw_end_marker = True
            raise


def _split_name(name: str) -> Tuple[Optional[str], Optional[str]]:
    match = _KEY_EXT.match(name)
    if not match:
        return None, None
    return match.group(1), match.group(2).lower()


# tarfile, gzip (via tarfile's _Stream) and the OS report cut or corrupt archives with these.
_TAR_ERRORS = (tarfile.TarError, EOFError, OSError, zlib.error)


_Member = Tuple[str, Optional[bytes]]  # (member name, its bytes; None when the data stops inside it)


def _members_tarfile(url: str, stream) -> Iterator[Union[_Member, _ShardProblem]]:
    """Regular members of any tar ``tarfile`` reads in stream mode (gzip/bzip2/xz too); problems last."""
    try:
        tar = tarfile.open(fileobj=stream, mode="r|*", tarinfo=_EndMarkerTarInfo)
    except _TAR_ERRORS as exc:
        yield _ShardProblem(url, "unreadable_shard", f"not a readable tar: {exc}")
        return
    while True:
        try:
            info = tar.next()
        except _TAR_ERRORS as exc:
            yield _ShardProblem(url, "truncated_shard", f"archive cut or corrupt: {exc}")
            return
        if info is None:
            if not getattr(tar, "prh_saw_end_marker", False):
                yield _ShardProblem(url, "truncated_shard", "archive stops without its end marker")
            return
        tar.members = []  # stream mode remembers every header otherwise; memory would grow with the shard
        if not info.isreg():
            continue
        try:
            data = tar.extractfile(info).read()
        except _TAR_ERRORS as exc:
            yield info.name, None
            yield _ShardProblem(url, "truncated_shard", f"member {info.name} cut off: {exc}")
            return
        yield info.name, data


_BLOCK = 512
_ZERO_BLOCK = bytes(_BLOCK)
_REGULAR = (b"0", b"\0", b"7")


def _octal(field: bytes) -> int:
    """A numeric header field: NUL/space-padded octal, or GNU base-256 (first byte 0x80 or 0xff)."""
    if field[0] in (0o200, 0o377):
        value = int.from_bytes(field[1:], "big")
        return value - 256 ** (len(field) - 1) if field[0] == 0o377 else value
    text = field.split(b"\0", 1)[0].strip()
    return int(text or b"0", 8)  # ValueError on garbage


def _checksum_ok(header: bytes) -> bool:
    try:
        stored = _octal(header[148:156])
    except ValueError:
        return False
    unsigned = 256 + sum(header) - sum(header[148:156])
    if stored == unsigned:
        return True
    signed = 256 + sum(b - 256 if b > 127 else b for i, b in enumerate(header) if not 148 <= i < 156)
    return stored == signed  # some old writers summed signed chars


def _pax_records(data: bytes) -> Dict[str, str]:
    """``"LEN key=value\n"`` records of a pax extended header (only ``path`` and ``size`` matter here)."""
    records, position = {}, 0
    while position < len(data):
        space = data.index(b" ", position)
        length = int(data[position:space])
        key, _, value = data[space + 1:position + length - 1].partition(b"=")
        records[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        position += length
    return records


def _members_ustar(url: str, stream, first: bytes) -> Iterator[Union[_Member, _ShardProblem]]:
    """Regular members of an uncompressed ustar/pax/GNU tar whose first header block is ``first``.

    The same members, and the same problems (by reason), as ``_members_tarfile`` -- a test checks both on
    archives cut at every offset -- at a twentieth of the cost: ``tarfile`` parses every field of every
    header in Python, about 25 us a member, which was a fifth of reading and decoding a 224-px JPEG sample.
    """
    header, offset, overrides = first, 0, {}
    while True:
        if len(header) < _BLOCK:
            what = "archive stops without its end marker" if not header else f"header at byte {offset} cut off"
            yield _ShardProblem(url, "unreadable_shard" if offset == 0 else "truncated_shard", what)
            return
        if header == _ZERO_BLOCK:
            return  # the end marker
        try:
            if not _checksum_ok(header):
                raise ValueError("bad header checksum")
            size = _octal(header[124:136])
            if size < 0:
                raise ValueError("negative member size")
        except ValueError as exc:
            if offset == 0:
                yield _ShardProblem(url, "unreadable_shard", f"not a readable tar: {exc}")
            else:
                yield _ShardProblem(url, "truncated_shard", f"archive cut or corrupt: {exc} at byte {offset}")
            return
        kind = header[156:157]
        name = header[:100].split(b"\0", 1)[0]
        prefix = header[345:500].split(b"\0", 1)[0] if header[257:262] == b"ustar" and header[263:265] == b"00" else b""
        name = (prefix + b"/" + name if prefix else name).decode("utf-8", "surrogateescape")
        name = overrides.pop("path", name)
        size = int(overrides.pop("size", size)) if kind not in (b"x", b"g", b"L", b"K") else size
        data = stream.read(size) if size else b""
        offset += _BLOCK + size
        if len(data) < size:
            if kind in _REGULAR:
                yield name, None
                yield _ShardProblem(url, "truncated_shard", f"member {name} cut off")
            else:
                yield _ShardProblem(url, "truncated_shard", f"archive cut or corrupt: header data at byte {offset} cut off")
            return
        padding = -size % _BLOCK
        if padding:
            stream.read(padding)  # a short read here shows up as a short header next
            offset += padding
        if kind == b"x":
            try:
                overrides = _pax_records(data)
            except ValueError as exc:
                yield _ShardProblem(url, "truncated_shard", f"archive cut or corrupt: bad pax header ({exc})")
                return
        elif kind == b"L":
            overrides = {"path": data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")}
        elif kind in _REGULAR:
            yield name, data
        if kind not in (b"x", b"L"):
            overrides = {} if kind != b"g" else overrides
        header = stream.read(_BLOCK)


class _Prepended(io.RawIOBase):
    """``stream`` with bytes already read from it put back in front (for tarfile's format detection)."""

    def __init__(self, head: bytes, stream) -> None:
        super().__init__()
        self.head, self.stream = head, stream

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        if not self.head:
            return self.stream.read(size)
        if size is None or size < 0:
            out, self.head = self.head + self.stream.read(), b""
            return out
        out, self.head = self.head[:size], self.head[size:]
        if len(out) < size:
            out += self.stream.read(size - len(out))
        return out


def _members(url: str, stream) -> Iterator[Union[_Member, _ShardProblem]]:
    """Uncompressed ustar/pax/GNU tars (what img2dataset and webdataset write) by the fast reader; anything
    else (gzip'd, bzip2'd, old v7 tars, not a tar at all) by ``tarfile``."""
    try:
        head = stream.read(_BLOCK)
    except _TAR_ERRORS as exc:
        yield _ShardProblem(url, "unreadable_shard", f"not a readable tar: {exc}")
        return
    if len(head) == _BLOCK and head[257:262] == b"ustar":
        yield from _members_ustar(url, stream, head)
    else:
        yield from _members_tarfile(url, _Prepended(head, stream))


def _read_tar(url: str, stream, members: Callable = _members) -> Iterator[Union[_RawSample, _ShardProblem]]:
    """Samples of one opened tar stream in order; a final _ShardProblem if it is unreadable or cut."""
    key: Optional[str] = None
    files: Dict[str, bytes] = {}
    cut = False
    problem: Optional[_ShardProblem] = None
    for item in members(url, stream):
        if isinstance(item, _ShardProblem):
            problem = item
            break
        name, data = item
        member_key, ext = _split_name(name)
        if member_key is None or member_key.startswith("__"):
            continue  # no extension, or webdataset's __meta__ members (cut or not: the problem follows)
        if member_key != key:
            if key is not None:
                yield _RawSample(key, url, files)
            key, files = member_key, {}
        if data is None:
            cut = True
            continue
        files.setdefault(ext, data)  # a repeated extension keeps the first, like a dict of unique members
    if key is not None:
        yield _RawSample(key, url, files, truncated=cut)
    if problem is not None:
        yield problem


def _read_shard(url: str) -> Iterator[Union[_RawSample, _ShardProblem]]:
    """Open a local path or a ``pipe:COMMAND`` URL and read it; the pipe's exit status is checked."""
    process = None
    try:
        if url.startswith("pipe:"):
            # Own process group, so stopping early can end the whole pipeline, not only the shell.
            process = subprocess.Popen(url[len("pipe:"):], shell=True, stdout=subprocess.PIPE, start_new_session=True)
            stream = process.stdout
        else:
            stream = open(url, "rb")
    except OSError as exc:
        yield _ShardProblem(url, "unreadable_shard", str(exc))
        return
    finished = False
    tar_problem: Optional[_ShardProblem] = None
    try:
        for item in _read_tar(url, stream):
            if isinstance(item, _ShardProblem):
                tar_problem = item
            else:
                yield item
        finished = True
    finally:
        if process is None:
            stream.close()
        elif finished:
            # Read to the end so the command is not killed by SIGPIPE on trailing padding.
            while stream.read(_PIPE_DRAIN_CHUNK):
                pass
            stream.close()
            process.wait()
        else:  # the consumer stopped early: stop the command too
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass  # already gone
            stream.close()
            process.wait()
    if process is not None and process.returncode != 0:
        detail = f"command exited with status {process.returncode}"
        if tar_problem is not None:
            detail += f"; {tar_problem.detail}"
        tar_problem = _ShardProblem(url, "pipe_failed", detail)
    if tar_problem is not None:
        yield tar_problem


def _decode(
    raw: _RawSample, image_mode: Optional[str]
) -> Tuple[Optional[Dict[str, Any]], Optional[str], str]:
    """``(sample, None, "")`` for a good sample, ``(None, reason, detail)`` for a bad one."""
    if raw.truncated:
        return None, "truncated_sample", "a member was cut off by the end of the shard"
    image_ext = next((ext for ext in IMAGE_EXTENSIONS if ext in raw.files), None)
    if image_ext is None:
        return None, "missing_image", f"no image member ({'/'.join(IMAGE_EXTENSIONS)}); found {sorted(raw.files)}"
    if "txt" not in raw.files:
        return None, "missing_caption", f"no .txt member; found {sorted(raw.files)}"
    try:
        caption = raw.files["txt"].decode("utf-8").strip()
    except UnicodeDecodeError as exc:
        return None, "undecodable_caption", str(exc)
    if not caption:
        return None, "empty_caption", "caption is empty or whitespace"
    meta: Dict[str, Any] = {}
    if "json" in raw.files:
        try:
            meta = json.loads(raw.files["json"].decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            return None, "undecodable_meta", str(exc)
        if not isinstance(meta, dict):
            return None, "undecodable_meta", f"meta is a JSON {type(meta).__name__}, not an object"
    try:
        # Not a ``with`` block: closing would discard the decoded pixels and force a copy. load() lets go of
        # the in-memory file once a single-frame image is decoded.
        image = Image.open(io.BytesIO(raw.files[image_ext]))
        image.load()  # decode all pixels now: a truncated or garbage file fails here, not in a transform
        if image_mode and image.mode != image_mode:
            image = image.convert(image_mode)
    except Exception as exc:  # noqa: BLE001 - PIL's decoders raise many types (OSError, SyntaxError, ValueError, struct.error...) on garbage
        return None, "undecodable_image", f"{type(exc).__name__}: {exc}"
    return {"key": raw.key, "image": image, "caption": caption, "meta": meta, "url": raw.url}, None, ""


class PairedShards(IterableDataset):
    """Paired image-caption samples streamed from shards: dicts ``{key, image, caption, meta, url}``.

    ``urls`` is anything ``expand_urls`` accepts (checked here, so a bad pattern fails at construction).
    ``shuffle_buffer > 0`` shuffles the shard order per epoch and samples through a buffer of that many
    undecoded samples; the order is a function of ``seed``, ``set_epoch(epoch)`` and the consumer, so a
    run is reproducible. ``rank`` / ``world_size`` override torch.distributed (tests, custom launchers).
    ``image_mode`` converts decoded images (``"RGB"`` by default; None keeps the stored mode). Bad samples
    and shards are skipped, counted in ``stats`` (``self.stats``) and logged once each at WARNING.
    See the module docstring for the splitting rule (``split``).
    """

    def __init__(
        self,
        urls: str | Sequence[str],
        image_transform: Optional[Callable[[Image.Image], Any]] = None,
        caption_transform: Optional[Callable[[str], Any]] = None,
        shuffle_buffer: int = 0,
        seed: int = 0,
        split_by_node: bool = False,
        split_by_worker: bool = True,
        stats: Optional[SkipStats] = None,
        rank: Optional[int] = None,
        world_size: Optional[int] = None,
        split: str = "auto",
        image_mode: Optional[str] = "RGB",
    ) -> None:
        super().__init__()
        if split not in SPLIT_MODES:
            raise ValueError(f"split must be one of {SPLIT_MODES}, got {split!r}")
        if shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer must be >= 0, got {shuffle_buffer}")
        if (rank is None) != (world_size is None):
            raise ValueError("pass rank and world_size together (or neither, to use torch.distributed)")
        if world_size is not None and not 0 <= rank < world_size:  # type: ignore[operator]
            raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
        self.urls: List[str] = expand_urls(urls)
        self.image_transform = image_transform
        self.caption_transform = caption_transform
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.split_by_node = split_by_node
        self.split_by_worker = split_by_worker
        self.stats = stats if stats is not None else SkipStats()
        self.rank = rank
        self.world_size = world_size
        self.split = split
        self.image_mode = image_mode
        # In shared memory, so DataLoader workers that outlive an epoch (persistent_workers=True) read the
        # epoch the main process sets, instead of the one in the copy of the dataset they started with.
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        """Change the shuffle of the next pass (call it before the pass's DataLoader iterator is created)."""
        self._epoch.fill_(int(epoch))

    def consumer(self) -> Tuple[int, int]:
        """``(index, count)`` of this reader among all ranks x workers that split the data."""
        if self.split_by_node:
            rank, world = (self.rank, self.world_size) if self.rank is not None else rank_world()
        else:
            rank, world = 0, 1
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if (info is not None and self.split_by_worker) else (0, 1)
        return rank * workers + worker, world * workers

    def split_mode(self, consumers: int) -> str:
        if self.split != "auto":
            return self.split
        return "shard" if len(self.urls) >= consumers else "sample"

    def shard_order(self) -> List[str]:
        """The shard order of this epoch; identical on every consumer, which the split rule relies on."""
        if self.shuffle_buffer <= 0:
            return list(self.urls)
        permutation = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.urls))
        return [self.urls[i] for i in permutation]

    def _raw_samples(self) -> Iterator[_RawSample]:
        """This consumer's share of undecoded samples; shard problems are counted here."""
        index, count = self.consumer()
        order = self.shard_order()
        mode = self.split_mode(count)
        position = 0  # running sample position over all shards, for the "sample" rule
        for shard_position, url in enumerate(order):
            owns_shard = shard_position % count == index
            if mode == "shard" and not owns_shard:
                continue
            self.stats.shard_opened(url)
            for item in _read_shard(url):
                if isinstance(item, _ShardProblem):
                    if owns_shard:
                        self.stats.add_skip(url, item.reason)
                        logger.warning("shard %s: %s (%s)", url, item.reason, item.detail)
                    continue
                mine = mode == "shard" or position % count == index
                position += 1
                if mine:
                    yield item

    def _shuffled(self, raw: Iterator[_RawSample]) -> Iterator[_RawSample]:
        if self.shuffle_buffer <= 0:
            yield from raw
            return
        index, count = self.consumer()
        rng = np.random.default_rng([self.seed, self.epoch, index, count])
        buffer: List[_RawSample] = []
        for item in raw:
            if len(buffer) < self.shuffle_buffer:
                buffer.append(item)
                continue
            slot = int(rng.integers(len(buffer)))
            buffer[slot], item = item, buffer[slot]
            yield item
        for slot in rng.permutation(len(buffer)):
            yield buffer[slot]

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        good_before, skipped_before = self.stats.good, self.stats.total_skipped
        for raw in self._shuffled(self._raw_samples()):
            sample, reason, detail = _decode(raw, self.image_mode)
            if sample is None:
                self.stats.add_skip(raw.url, reason)  # type: ignore[arg-type]
                logger.warning("skipping sample %r in %s: %s (%s)", raw.key, raw.url, reason, detail)
                continue
            self.stats.add_good(raw.url)
            if self.image_transform is not None:
                sample["image"] = self.image_transform(sample["image"])
            if self.caption_transform is not None:
                sample["caption"] = self.caption_transform(sample["caption"])
            yield sample
        index, count = self.consumer()
        logger.info(
            "consumer %d/%d finished a pass: %d good, %d skipped",
            index, count, self.stats.good - good_before, self.stats.total_skipped - skipped_before,
        )


def scan(urls: str | Sequence[str]) -> Dict[str, Any]:
    """Read and decode every sample once; report counts, skips by reason, shards and the key hash.

    ``keys_sha256`` hashes the sorted good keys the same way the writer's manifest does, so a scan of
    intact shards reproduces the manifest's value. ``duplicate_keys`` counts keys seen more than once.
    """
    dataset = PairedShards(urls, split_by_worker=False, split_by_node=False, image_mode=None)
    keys: List[str] = []
    for sample in dataset:
        keys.append(sample["key"])
        sample["image"].close()
    report = dataset.stats.as_dict()
    report["num_shards"] = len(dataset.urls)
    report["duplicate_keys"] = len(keys) - len(set(keys))
    report["keys_sha256"] = keys_digest(keys)
    return report
