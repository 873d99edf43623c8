"""The feature store: frozen-encoder outputs computed once, kept on disk, read memory-mapped by every run.

Encoders are frozen and the default inputs are not augmented, so an encoder's pooled features for a sample
are a pure function of (encoder weights, preprocessing, layers, pooling, sample). Each entry of the store is
keyed by a fingerprint of all of those plus the shards read and the storage dtype, and is a folder:

    identity.json                    what the features are a function of; written first, checked on every use
    parts/s000003-b000001.safetensors   while extracting: one unit of work (shard 3, its raw samples
                                     1*chunk .. 2*chunk-1): features, keys, captions, labels, skip counts
    parts/s000003-b000002-last.safetensors   "-last": the unit that ends its shard (it also counts the
                                     shard-level problems)
    layer-0.npy, layer-1.npy, ...    when complete: one (N, D) array per layer, rows in key order
    index.json                       keys, captions, labels, layer files, info; its presence marks completion

Resuming. Every unit file is written under a temporary name, flushed to disk and renamed, so a file with a
final name is whole; an extraction killed mid-way resumes from the units on disk (units already done are not
decoded again, shards already done are not even read). Only when every unit of every shard is present are
they merged into the layer arrays and ``index.json`` written, last and atomically; the parts are then removed.

Splitting the work. Units go to consumers (rank x DataLoader worker) by ``split.py``'s one rule: whole shards
round robin when there are at least as many shards as consumers, else units round robin (every consumer then
reads every shard but decodes only its units). With fewer units than consumers the unit size shrinks, from the
manifests' per-shard sample counts, until each consumer has one; it is fixed when the entry is created. Under
DDP each rank extracts its units, all ranks meet, and rank 0 commits. A batch never spans two units, so the
batches -- and hence the features, bit for bit for a given machine and thread count -- do not depend on how
many ranks or workers did the work.

Reading. ``layer-*.npy`` are opened with ``np.load(mmap_mode="c")``: training and evaluation read rows
straight from the page cache, nothing is loaded up front, and writes stay private to the process.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Set, Tuple

import numpy as np
import torch
import webdataset as wds
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset

from prh_stitch.atomic import atomic_write_bytes
from prh_stitch.data.batches import Prepare, _as_is, collate
from prh_stitch.data.shards import samples_per_shard
from prh_stitch.data.split import current_consumer, owner, split_mode, unit_size
from prh_stitch.data.stream import PROBLEM, SkipStats, count_problem, decoded, read_shard
from prh_stitch.encoders.base import FrozenEncoder, Layer

log = logging.getLogger("prh_stitch.data")

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# NumPy has no bfloat16: its rows are stored as their raw 16-bit patterns and viewed back on reading.
_NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": np.int16}
STORE_FORMAT = "prh_stitch-features-v2"
DEFAULT_CHUNK_SIZE = 1024  # samples per unit: a few MB of features, a few seconds to a minute of encoder time
INDEX = "index.json"
IDENTITY = "identity.json"
_PART = re.compile(r"^s(\d{6,})-b(\d{6,})(-last)?\.safetensors$")


def default_cache_dir() -> Path:
    """``$PRH_STITCH_CACHE``, else ``~/.cache/prh_stitch``."""
    return Path(os.environ.get("PRH_STITCH_CACHE") or Path.home() / ".cache" / "prh_stitch")


def data_fingerprint(urls: Sequence[str]) -> str:
    """Identity of a list of shards: local files by path, size and modification time; ``pipe:`` and remote by URL."""
    parts = []
    for url in urls:
        if url.startswith("pipe:") or re.match(r"^[A-Za-z][A-Za-z0-9+.-]+://", url):
            parts.append(url)
        else:
            st = os.stat(url)
            parts.append(f"{os.path.abspath(url)}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:20]


@dataclass
class FeatureSet:
    """Pooled features of one encoder on one dataset: rows ordered by sample key."""

    keys: List[str]
    captions: List[str]
    labels: List[int]
    features: Dict[str, Tensor]  # layer name -> (N, D)
    info: Dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.keys)

    def layer(self, name: str) -> Tensor:
        if name not in self.features:
            raise ValueError(f"the feature set has no layer {name!r}; it holds {sorted(self.features)}")
        return self.features[name]


def align_by_key(a: FeatureSet, b: FeatureSet) -> Tuple[Tensor, Tensor]:
    """Row indices into ``a`` and ``b`` of the samples present in both, in key order.

    The two sides can differ when one encoder's pass skipped a sample the other kept (e.g. shards that
    changed between extractions would already change the fingerprint, but a key can still be missing).
    """
    position_b = {key: i for i, key in enumerate(b.keys)}
    idx_a, idx_b = [], []
    for i, key in enumerate(a.keys):
        j = position_b.get(key)
        if j is not None:
            idx_a.append(i)
            idx_b.append(j)
    if not idx_a:
        raise ValueError("the two feature sets share no sample keys; were they extracted from the same shards?")
    return torch.tensor(idx_a), torch.tensor(idx_b)


class BadFeatures(ValueError):
    """The inputs cannot give a usable entry (no good sample, NaN features, duplicate keys): nothing is kept."""


class EntryMismatch(ValueError):
    """An entry of that name holds features of something else: it is left exactly as it is."""


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

    def barrier(self) -> None:
        self.exchange(None)

    def agree(self, error: Optional[BaseException]) -> List[Optional[Tuple[str, str]]]:
        """Share whether each rank failed; raise on every rank if any did (no rank is left waiting)."""
        mine = None if error is None else (type(error).__name__, str(error))
        everyone = self.exchange(mine)
        failed = [(rank, e) for rank, e in enumerate(everyone) if e is not None]
        if failed:
            if error is not None:
                raise error
            rank, (kind, message) = failed[0]
            cls = {"BadFeatures": BadFeatures, "EntryMismatch": EntryMismatch, "ValueError": ValueError}.get(kind, RuntimeError)
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


def part_name(shard: int, block: int, last: bool) -> str:
    return f"s{shard:06d}-b{block:06d}{'-last' if last else ''}.safetensors"


def _label(meta: Any) -> int:
    label = meta.get("label", -1) if isinstance(meta, dict) else -1
    return int(label) if isinstance(label, (int, float)) else -1


class UnitReader(IterableDataset):
    """Reads this consumer's units of the shards, skipping done ones; yields samples and ``UnitDone`` events.

    The split is ``split.py``'s rule: whole shards when there are at least as many as consumers, else units
    (numbered over all shards in order). Samples (decoded, tagged with their ``unit``) come in shard order; each unit
    this consumer owns ends with a ``UnitDone`` carrying its skip counts by reason, so counts reach the main process
    with the data even from DataLoader workers. Shard-level problems count in the unit that ends the shard.
    ``finished_shards``: {shard: its number of units} of shards done in an earlier run (not read again).
    """

    def __init__(self, urls: Sequence[str], chunk_size: int, done: Set[Tuple[int, int]],
                 finished_shards: Dict[int, int], rank: int = 0, world: int = 1, image_mode: Optional[str] = "RGB") -> None:
        super().__init__()
        self.urls, self.chunk_size, self.done, self.finished = list(urls), int(chunk_size), set(done), dict(finished_shards)
        self.rank, self.world, self.image_mode = rank, world, image_mode

    def __iter__(self) -> Iterator[Any]:
        index, count = current_consumer(True, True, self.rank, self.world)
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

    def _shard(self, shard: int, url: str, mine: Callable[[int], bool]):
        """The shard's samples and unit ends; returns its number of units."""
        block, position, stats = 0, 0, SkipStats()
        problems = []
        for item in read_shard(url):
            if PROBLEM in item:
                problems.append(item)
                continue
            if position // self.chunk_size != block:
                if mine(block):
                    yield UnitDone(shard, block, url, self.chunk_size, False, stats.good, dict(stats.skipped))
                block, stats = position // self.chunk_size, SkipStats()
            position += 1
            if mine(block):  # else not decoded: someone else's unit, or one finished in an earlier run
                for sample in decoded([item], stats, self.image_mode):
                    yield dict(sample, unit=(shard, block), label=_label(sample["meta"]))
        if mine(block):
            for problem in problems:
                count_problem(problem, stats)
            yield UnitDone(shard, block, url, position - block * self.chunk_size, True, stats.good, dict(stats.skipped))
        return block + 1


def unit_batches(items: Iterable[Any], batch_size: int, encoder: FrozenEncoder) -> Iterator[Tuple[str, Any]]:
    """The worker side of extraction: ``("batch", batch)`` of prepared samples, never spanning two units, and
    ``("done", UnitDone)`` once a unit's samples are all in batches."""
    prepare, batch = Prepare({"encoder": encoder}, keep_images=False), []
    for item in items:
        if isinstance(item, UnitDone) or len(batch) == batch_size:
            if batch:
                yield "batch", collate(batch, {"encoder": encoder})
            batch = []
        if isinstance(item, UnitDone):
            yield "done", item
        else:
            batch.append(prepare(item))
    if batch:
        yield "batch", collate(batch, {"encoder": encoder})


# -- the store -----------------------------------------------------------------------------------------


@dataclass
class ExtractionReport:
    """What one process did for one entry in one call."""

    status: str = "hit"  # hit | extracted | resumed
    chunks_computed: int = 0
    chunks_reused: int = 0  # units already on disk when this call started
    samples_encoded: int = 0
    seconds: float = 0.0


def _whole_safetensors(path: Path) -> bool:
    """Cheap check that a safetensors file is complete: header readable and file size as the header says."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(8)
            if len(head) != 8:
                return False
            header = json.loads(handle.read(int.from_bytes(head, "little")))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        return path.stat().st_size == 8 + int.from_bytes(head, "little") + end
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _to_numpy(tensor: Tensor) -> np.ndarray:
    return (tensor.view(torch.int16) if tensor.dtype == torch.bfloat16 else tensor).numpy()


class FeatureStore:
    """Extract-or-load pooled features, keyed by encoder and data fingerprints; resumable and DDP-aware."""

    def __init__(
        self, root: Optional[str | os.PathLike] = None, dtype: str = "float32", chunk_size: int = DEFAULT_CHUNK_SIZE
    ) -> None:
        if dtype not in DTYPES:
            raise ValueError(f"unknown feature dtype {dtype!r}; choose one of {sorted(DTYPES)}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.root = Path(root) if root is not None else default_cache_dir() / "features"
        self.dtype = dtype
        self.chunk_size = int(chunk_size)
        self.hits = 0
        self.extractions = 0

    # ---- naming -------------------------------------------------------------------------------
    def identity(self, encoder: FrozenEncoder, layers: Sequence[Layer], pooling: Optional[str], urls: Sequence[str]) -> Dict[str, Any]:
        """Everything the stored features are a function of, part by part (so a mismatch can say which)."""
        return {
            "format": STORE_FORMAT,
            "encoder": encoder.name,
            "fingerprint": encoder.fingerprint(layers, pooling),  # the encoder's own digest of the parts below
            "class": type(encoder).__name__,
            "weights": encoder.weights_digest(),
            "preprocessing": json.loads(json.dumps(encoder.preprocessing_description(), sort_keys=True, default=str)),
            "layers": [encoder.layer_names[encoder.resolve_layer(layer)] for layer in layers],
            "pooling": pooling,
            "data": data_fingerprint(urls),
            "shards": len(urls),
            "dtype": self.dtype,
        }

    @staticmethod
    def _entry_name(identity: Dict[str, Any]) -> str:
        encoder = identity["encoder"]
        digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:20]
        return f"{encoder.replace('/', '_').replace(':', '_')}-{digest}"

    # ---- the one entry point ------------------------------------------------------------------
    def get(
        self,
        encoder: FrozenEncoder,
        urls: Sequence[str],
        layers: Sequence[Layer] = (-1,),
        pooling: Optional[str] = None,
        batch_size: int = 64,
        num_workers: int = 0,
        progress: bool = True,
        ranks: Optional[Ranks] = None,
        name: Optional[str] = None,
        device: Optional[torch.device | str] = None,
    ) -> FeatureSet:
        """Features of ``encoder`` on the shards ``urls``: from the store if complete, else extracted (or
        resumed) now. Every rank of ``ranks`` must call this together; each extracts a disjoint part.

        ``name`` chooses the entry's folder name (default: encoder name + fingerprint); an existing entry of
        that name made from anything else (other weights, layers, data, dtype) is an error, never reused.
        ``device``: where the encoder runs if extraction is needed (it is moved back afterwards).
        """
        urls = list(urls)
        ranks = ranks or Ranks()
        started = time.perf_counter()
        identity = self.identity(encoder, layers, pooling, urls)
        entry = self.root / (name or self._entry_name(identity))
        complete = (entry / INDEX).is_file()
        if ranks.world > 1:  # one decision for all ranks, or their collectives would not match
            complete = ranks.exchange(complete)[0]
        if complete:
            self.hits += 1
            log.info("features of %s: store hit (%s)", encoder.name, entry)
            feature_set = self.read(entry, identity)
            feature_set.info["extraction"] = asdict(ExtractionReport(seconds=round(time.perf_counter() - started, 3)))
            return feature_set

        self.extractions += 1
        report, error = ExtractionReport(), None
        try:
            report = self.extract(encoder, urls, layers, pooling, batch_size, num_workers, progress,
                                  entry=entry, identity=identity, ranks=ranks, device=device)
        except Exception as exc:  # noqa: BLE001 - shared with the other ranks below, then re-raised
            error = exc
        try:
            ranks.agree(error)
            error = None
            if ranks.rank == 0:
                try:
                    self.commit(entry, seconds=time.perf_counter() - started)
                except Exception as exc:  # noqa: BLE001 - as above
                    error = exc
            ranks.agree(error)
        except BadFeatures:
            if ranks.rank == 0:
                shutil.rmtree(entry, ignore_errors=True)  # bad inputs: keep nothing that looks like progress
            raise
        except EntryMismatch:
            raise
        except Exception:
            if ranks.rank == 0 and not (entry / INDEX).exists() and not self.units_on_disk(entry):
                shutil.rmtree(entry, ignore_errors=True)  # failed before any unit was done: nothing to resume
            raise
        feature_set = self.read(entry, identity)
        report.seconds = round(time.perf_counter() - started, 3)
        feature_set.info["extraction"] = asdict(report)
        return feature_set

    # ---- extraction ---------------------------------------------------------------------------
    def _open_entry(self, entry: Path, identity: Dict[str, Any], chunk_size: Optional[int] = None) -> int:
        """Create the entry (or check an existing one is the same); return its chunk size."""
        path = entry / IDENTITY
        if path.is_file():
            stored = json.loads(path.read_text())
            self._check_identity(entry, stored["identity"], identity)
            return int(stored["chunk_size"])
        entry.mkdir(parents=True, exist_ok=True)
        chunk_size = chunk_size or self.chunk_size
        atomic_write_bytes(path, json.dumps({"identity": identity, "chunk_size": chunk_size}, indent=1).encode())
        return chunk_size

    @staticmethod
    def _check_identity(entry: Path, stored: Dict[str, Any], wanted: Dict[str, Any]) -> None:
        differ = sorted(k for k in set(stored) | set(wanted) if stored.get(k) != wanted.get(k))
        if len(differ) > 1 and "fingerprint" in differ:
            differ.remove("fingerprint")  # a digest of the other parts: name those instead
        if differ:
            what = "; ".join(f"{k}: stored {stored.get(k)!r}, requested {wanted.get(k)!r}" for k in differ)
            raise EntryMismatch(
                f"feature store entry {entry} was made from something else ({what}). Its features are not these; "
                "give another entry name (or output folder), or delete that folder to extract afresh"
            )

    @staticmethod
    def units_on_disk(entry: Path) -> Dict[Tuple[int, int], Tuple[Path, bool]]:
        """Finished units: ``{(shard, block): (path, ends_its_shard)}``; incomplete files are removed."""
        units = {}
        parts = entry / "parts"
        for path in sorted(parts.glob("*.safetensors")) if parts.is_dir() else []:
            match = _PART.match(path.name)
            if match is None:
                continue
            if not _whole_safetensors(path):
                # Our writes are atomic, so only outside damage gets here; recompute rather than trust it.
                log.warning("feature part %s is incomplete or damaged; it will be computed again", path)
                path.unlink(missing_ok=True)
                continue
            units[(int(match.group(1)), int(match.group(2)))] = (path, match.group(3) is not None)
        return units

    @staticmethod
    def finished_shards(units: Dict[Tuple[int, int], Tuple[Path, bool]]) -> Dict[int, int]:
        """``{shard: its number of units}`` of shards whose last unit and every unit before it are on disk."""
        return {shard: block + 1 for (shard, block), (_, last) in units.items()
                if last and all((shard, b) in units for b in range(block))}

    def extract(
        self,
        encoder: FrozenEncoder,
        urls: Sequence[str],
        layers: Sequence[Layer] = (-1,),
        pooling: Optional[str] = None,
        batch_size: int = 64,
        num_workers: int = 0,
        progress: bool = True,
        entry: Optional[Path] = None,
        identity: Optional[Dict[str, Any]] = None,
        ranks: Optional[Ranks] = None,
        device: Optional[torch.device | str] = None,
    ) -> ExtractionReport:
        """Encode this process's units that are not on disk yet and write each as a part of ``entry``."""
        original = encoder.device
        if device is not None:
            encoder.to(device)
        try:
            return self._extract(encoder, urls, layers, pooling, batch_size, num_workers, progress, entry, identity, ranks)
        finally:
            encoder.to(original)

    def _extract(self, encoder, urls, layers, pooling, batch_size, num_workers, progress, entry, identity, ranks):
        from tqdm.auto import tqdm

        ranks = ranks or Ranks()
        identity = identity or self.identity(encoder, layers, pooling, urls)
        entry = entry or self.root / self._entry_name(identity)
        # Units small enough that every rank x worker gets one (fixed when the entry is created; batches never
        # span units, so the features depend on the unit size, not on how many consumers share the work).
        consumers = ranks.world * max(1, num_workers)
        chunk_size = self._open_entry(entry, identity, unit_size(self.chunk_size, samples_per_shard(urls), consumers))
        (entry / "parts").mkdir(exist_ok=True)
        units = self.units_on_disk(entry)
        report = ExtractionReport(status="resumed" if units else "extracted", chunks_reused=len(units))
        reader = UnitReader(urls, chunk_size, set(units), self.finished_shards(units), ranks.rank, ranks.world)
        loader = DataLoader(wds.DataPipeline(reader, lambda items: unit_batches(items, batch_size, encoder)),
                            batch_size=None, num_workers=num_workers, collate_fn=_as_is)
        names = identity["layers"]
        pending: Dict[Tuple[int, int], Dict[str, list]] = {}
        with tqdm(desc=f"features {encoder.name}", unit="sample", disable=not progress or ranks.rank != 0) as bar:
            for kind, item in loader:
                if kind == "batch":
                    # One device-to-host copy per batch; the rows wait on the CPU until their unit is complete.
                    outputs = [out.cpu() for out in encoder.encode(item["inputs"]["encoder"], layers, pooling)]
                    for row, (key, caption, label, unit) in enumerate(zip(item["key"], item["caption"], item["label"], item["unit"])):
                        rows = pending.setdefault(tuple(unit), {"samples": [], "outputs": []})
                        rows["samples"].append({"key": key, "caption": caption, "label": label})
                        rows["outputs"].append([out[row] for out in outputs])
                    report.samples_encoded += len(item["key"])
                    bar.update(len(item["key"]))
                else:
                    rows = pending.pop((item.shard, item.block), {"samples": [], "outputs": []})
                    self._write_part(entry, item, rows["samples"], rows["outputs"], names, encoder.name)
                    report.chunks_computed += 1
        return report

    def _write_part(self, entry: Path, done: UnitDone, samples: List[dict], outputs: List[List[Tensor]],
                    names: List[str], encoder_name: str) -> None:
        if len(samples) != done.good:
            raise RuntimeError(f"unit {done.shard}/{done.block}: {len(samples)} encoded rows for {done.good} good samples")
        dtype = DTYPES[self.dtype]
        tensors = {}
        for i, name in enumerate(names):
            if samples:
                rows = torch.stack([out[i] for out in outputs]).to("cpu", dtype)
            else:
                rows = torch.zeros(0, 0, dtype=dtype)
            bad = ~torch.isfinite(rows.float()).all(dim=1)
            if bad.any():
                examples = [samples[j]["key"] for j in bad.nonzero().flatten()[:3].tolist()]
                raise BadFeatures(
                    f"encoder {encoder_name!r} produced NaN/Inf features at layer {name!r} for {int(bad.sum())} "
                    f"sample(s) of {done.url} (e.g. {examples}); check the weights and inputs, or store float32 features"
                )
            tensors[f"layer:{name}"] = rows.contiguous()
        meta = {
            "url": done.url, "raw": done.raw, "good": done.good, "skipped": done.skipped,
            "keys": [s["key"] for s in samples], "captions": [s["caption"] for s in samples],
            "labels": [s["label"] for s in samples],
        }
        tensors["meta"] = torch.frombuffer(bytearray(json.dumps(meta).encode()), dtype=torch.uint8)
        atomic_write_bytes(entry / "parts" / part_name(done.shard, done.block, done.last), save_safetensors(tensors))

    # ---- completion ---------------------------------------------------------------------------
    def commit(self, entry: Path, seconds: float = 0.0) -> None:
        """Merge the parts of a fully extracted entry into per-layer arrays in key order; write the index."""
        stored = json.loads((entry / IDENTITY).read_text())
        identity = stored["identity"]
        units = self.units_on_disk(entry)
        finished = self.finished_shards(units)
        missing = [s for s in range(identity["shards"]) if s not in finished]
        if missing:
            raise RuntimeError(
                f"feature store entry {entry} lacks parts of {len(missing)} shard(s) (e.g. shard {missing[0]}) after "
                "every rank finished; when ranks run on several machines the store must be on a filesystem they all see"
            )
        order = sorted(units)
        loaded = []
        stats = SkipStats()
        keys: List[str] = []
        for unit in order:
            tensors = load_safetensors(units[unit][0].read_bytes())
            meta = json.loads(bytes(tensors.pop("meta").numpy()))
            loaded.append((tensors, meta))
            counts = Counter(meta["skipped"])
            stats.merge(SkipStats(meta["good"], counts, {meta["url"]: {"good": meta["good"], "skipped": counts}}))
            keys += meta["keys"]
        if not keys:
            raise BadFeatures(
                f"no usable samples in {identity['shards']} shard(s); skipped: {dict(stats.skipped)}. "
                "Check the shards with: python -m prh_stitch.data check \"PATTERN\""
            )
        sorted_keys = sorted(keys)
        duplicates = [a for a, b in zip(sorted_keys, sorted_keys[1:]) if a == b]
        if duplicates:
            raise BadFeatures(
                f"duplicate sample keys in the shards (e.g. {duplicates[0]!r}, {len(duplicates)} in all); keys must be "
                "unique to join image and text features"
            )
        position = {key: i for i, key in enumerate(sorted_keys)}
        captions: List[str] = [""] * len(keys)
        labels: List[int] = [-1] * len(keys)
        for _, meta in loaded:
            for key, caption, label in zip(meta["keys"], meta["captions"], meta["labels"]):
                captions[position[key]] = caption
                labels[position[key]] = label
        layer_files, dims = [], {}
        for i, name in enumerate(identity["layers"]):
            dim = next(t[f"layer:{name}"].shape[1] for t, m in loaded if m["keys"])
            dims[name] = dim
            path = entry / f"layer-{i}.npy"
            tmp = entry / f".tmp-{path.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            try:
                array = np.lib.format.open_memmap(tmp, mode="w+", dtype=_NUMPY_DTYPES[identity["dtype"]], shape=(len(keys), dim))
                for tensors, meta in loaded:
                    if meta["keys"]:
                        rows = np.fromiter((position[k] for k in meta["keys"]), dtype=np.int64, count=len(meta["keys"]))
                        array[rows] = _to_numpy(tensors[f"layer:{name}"])
                array.flush()
                del array
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
            layer_files.append({"name": name, "file": path.name, "dim": dim})
        info = {
            "entry": str(entry),
            "encoder": identity["encoder"],
            "encoder_fingerprint": identity["fingerprint"],
            "weights": identity["weights"],
            "data_fingerprint": identity["data"],
            "layers": identity["layers"],
            "dims": dims,
            "pooling": identity["pooling"],
            "dtype": identity["dtype"],
            "num_samples": len(keys),
            "skipped": stats.as_dict(),
            "chunks": len(units),
            "chunk_size": stored["chunk_size"],
            "seconds": round(seconds, 3),
        }
        index = {"keys": sorted_keys, "captions": captions, "labels": labels, "layers": layer_files,
                 "identity": identity, "info": info}
        atomic_write_bytes(entry / INDEX, json.dumps(index).encode())  # last: its presence marks the entry complete
        shutil.rmtree(entry / "parts", ignore_errors=True)

    # ---- reading ------------------------------------------------------------------------------
    def read(self, entry: str | os.PathLike, identity: Optional[Dict[str, Any]] = None) -> FeatureSet:
        """A complete entry, its layers memory-mapped; with ``identity``, check the entry is made from it."""
        entry = Path(entry)
        if not (entry / INDEX).is_file():
            raise ValueError(f"{entry} is not a complete feature store entry (no {INDEX}); extract it first")
        index = json.loads((entry / INDEX).read_text())
        if identity is not None:
            self._check_identity(entry, index["identity"], identity)
        features = {}
        n = len(index["keys"])
        for layer in index["layers"]:
            array = np.load(entry / layer["file"], mmap_mode="c")  # copy-on-write: writable, never written back
            if array.shape != (n, layer["dim"]):
                raise ValueError(f"{entry / layer['file']} holds {array.shape}, expected {(n, layer['dim'])}; delete the entry")
            tensor = torch.from_numpy(array)
            features[layer["name"]] = tensor.view(torch.bfloat16) if index["identity"]["dtype"] == "bfloat16" else tensor
        info = dict(index["info"], entry=str(entry))
        return FeatureSet(keys=index["keys"], captions=index["captions"], labels=index["labels"],
                          features=features, info=info)

