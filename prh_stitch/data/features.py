"""The feature store: frozen-encoder outputs computed once, kept on disk, read memory-mapped by every run.

Encoders are frozen and the default inputs are not augmented, so an encoder's pooled features for a sample
are a pure function of (encoder weights, preprocessing, layers, pooling, sample): an entry is keyed by a
fingerprint of those, the shards and the storage dtype. Its on-disk format is ``store_entry.py``'s, the units of
work and the ranks sharing them ``extraction_units.py``'s, locks and dead writers' files ``store_safety.py``'s.

Splitting the work: units go to consumers (rank x DataLoader worker) by ``split.py``'s rules: with the manifests'
sample counts, in contiguous runs of equal work, the unit size (fixed when the entry is created) small enough to
balance them; without, round robin. Each rank extracts its units, all ranks meet, rank 0 commits. A batch never
spans two units, so the features -- bit for bit on a given machine and thread count -- do not depend on how many
ranks or workers did the work.

Reading: ``np.load(mmap_mode="c")`` reads rows straight from the page cache, nothing up front, writes private to
the process. The first open in a process checks every file against the index's hashes (one sequential read,
which also warms the page cache); a damaged entry is an error naming it and the repair command, never used.
``get`` holds the entry's lock from its first look to the end of the commit: a second extractor waits, then reads.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import webdataset as wds
from torch import Tensor
from torch.utils.data import DataLoader

from prh_stitch.data.batches import _as_is
# BadFeatures, CorruptEntry, DEFAULT_CHUNK_SIZE, Ranks, UnitDone, UnitReader and data_fingerprint are imported from
# here by other modules: this is the store's public home.
from prh_stitch.data.extraction_units import Ranks, UnitDone, UnitReader, unit_batches  # noqa: F401
from prh_stitch.data.shards import samples_per_shard
from prh_stitch.data.split import unit_size
from prh_stitch.data.store_entry import (  # noqa: F401
    DEFAULT_CHUNK_SIZE, DTYPES, INDEX, STORE_FORMAT, BadFeatures, CorruptEntry, EntryMismatch, IncompleteShards,
    check_identity, commit_entry, data_fingerprint, default_cache_dir, disk_full, entry_name, finished_shards,
    open_entry, read_index, units_on_disk, verify_entry, write_part,
)
from prh_stitch.data.store_safety import entry_lock, remove_dead_temp_files, unwritable_store
from prh_stitch.encoders.base import FrozenEncoder, Layer
from prh_stitch.last_used import ENTRY_MARKER, mark_used

log = logging.getLogger("prh_stitch.data")

# Entries whose files this process has checked against their hashes: {folder: (index inode, index mtime)}.
_VERIFIED: Dict[str, Tuple[int, int]] = {}

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


# -- the store -----------------------------------------------------------------------------------------


@dataclass
class ExtractionReport:
    """What one process did for one entry in one call."""

    status: str = "hit"  # hit | extracted | resumed
    chunks_computed: int = 0
    chunks_reused: int = 0  # units already on disk when this call started
    samples_encoded: int = 0  # samples whose features this call produced
    captions_reused: int = 0  # of those, text samples whose caption was encoded earlier in the same unit
    seconds: float = 0.0


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
        if batch_size < 1 or num_workers < 0:
            raise ValueError(f"batch_size must be >= 1 and num_workers >= 0, got {batch_size} and {num_workers}")
        urls = list(urls)
        ranks = ranks or Ranks()
        identity = self.identity(encoder, layers, pooling, urls)
        entry = self.root / (name or entry_name(identity))
        # Rank 0 holds the lock for the whole call; the other ranks of a DDP run follow it through the collectives.
        with entry_lock(entry, needed=ranks.rank == 0):
            try:
                return self._get_locked(encoder, urls, layers, pooling, batch_size, num_workers, progress, ranks,
                                        entry, identity, device)
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise disk_full(entry) from exc
                if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                    raise unwritable_store(self.root, exc) from exc
                raise

    def _get_locked(self, encoder, urls, layers, pooling, batch_size, num_workers, progress, ranks, entry,
                    identity, device) -> FeatureSet:
        started = time.perf_counter()
        if ranks.rank == 0 and entry.is_dir():  # before the first collective: no rank of ours is writing yet
            remove_dead_temp_files(entry)
        complete = (entry / INDEX).is_file()
        if ranks.world > 1:  # one decision for all ranks, or their collectives would not match
            complete = ranks.exchange(complete)[0]
        report, error = ExtractionReport(), None
        if complete:
            self.hits += 1
            log.info("features of %s: store hit (%s)", encoder.name, entry)
        else:
            self.extractions += 1
            original = encoder.device
            try:
                if device is not None:
                    encoder.to(device)
                report = self._extract(encoder, urls, layers, pooling, batch_size, num_workers, progress, entry,
                                       identity, ranks)
            except Exception as exc:  # noqa: BLE001 - shared with the other ranks below, then re-raised
                error = exc
            finally:
                encoder.to(original)
            self._commit(entry, ranks, error, started)
        feature_set = self.read(entry, identity)
        report.seconds = round(time.perf_counter() - started, 3)
        feature_set.info["extraction"] = asdict(report)
        return feature_set

    def _commit(self, entry: Path, ranks: Ranks, error: Optional[Exception], started: float) -> None:
        """Every rank learns whether any failed; rank 0 commits; what is kept on failure depends on the cause."""
        try:
            ranks.agree(error)
            error = None
            if ranks.rank == 0:
                try:
                    commit_entry(entry, time.perf_counter() - started)
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
            if ranks.rank == 0 and not (entry / INDEX).exists() and not units_on_disk(entry):
                shutil.rmtree(entry, ignore_errors=True)  # failed before any unit was done: nothing to resume
            raise

    # ---- extraction ---------------------------------------------------------------------------
    def _extract(self, encoder, urls, layers, pooling, batch_size, num_workers, progress, entry, identity, ranks):
        """Encode this process's units that are not on disk yet and write each as a part of ``entry``."""
        from tqdm.auto import tqdm

        # Units small enough that every rank x worker gets one (fixed when the entry is created; batches never
        # span units, so the features depend on the unit size, not on how many consumers share the work).
        counts = samples_per_shard(urls)
        consumers = ranks.world * max(1, num_workers)
        chunk_size = open_entry(entry, identity, unit_size(self.chunk_size, counts, consumers, batch_size))
        (entry / "parts").mkdir(exist_ok=True)
        units = units_on_disk(entry)
        report = ExtractionReport(status="resumed" if units else "extracted", chunks_reused=len(units))
        reader = UnitReader(urls, chunk_size, set(units), finished_shards(units), ranks.rank, ranks.world, counts)
        # Out of order: the main process takes whichever worker's batch is ready (rows wait per unit below), so a
        # worker with a unit more never holds the others up.
        loader = DataLoader(wds.DataPipeline(reader, lambda items: unit_batches(items, batch_size, encoder)),
                            batch_size=None, num_workers=num_workers, collate_fn=_as_is, in_order=False)
        cut: Dict[str, str] = {}  # shards not read to their end: url -> why
        pending: Dict[Tuple[int, int], Dict[str, list]] = {}
        # A total (hence an ETA) where the manifests give it and this process encodes everything from scratch.
        total = sum(counts) if counts and ranks.world == 1 and not units else None
        with tqdm(desc=f"features {encoder.name}", unit="sample", total=total,
                  disable=not progress or ranks.rank != 0) as bar:
            for kind, item in loader:
                if kind == "batch":
                    # One device-to-host copy per batch; the rows wait on the CPU until their unit is complete.
                    outputs = ([out.cpu() for out in encoder.encode(item["inputs"]["encoder"], layers, pooling)]
                               if not all(item["repeat"]) else [])
                    row = 0
                    for key, caption, label, unit, repeat in zip(item["key"], item["caption"], item["label"],
                                                                  item["unit"], item["repeat"]):
                        rows = pending.setdefault(tuple(unit), {"samples": [], "outputs": [], "by_caption": {}})
                        rows["samples"].append({"key": key, "caption": caption, "label": label})
                        if repeat:  # a caption met earlier in this unit (text encoders): the same rows
                            rows["outputs"].append(rows["by_caption"][caption])
                            report.captions_reused += 1
                        else:
                            rows["outputs"].append([out[row] for out in outputs])
                            rows["by_caption"].setdefault(caption, rows["outputs"][-1])
                            row += 1
                    report.samples_encoded += len(item["key"])
                    bar.update(len(item["key"]))
                else:
                    rows = pending.pop((item.shard, item.block), {"samples": [], "outputs": []})
                    problem = write_part(entry, item, rows["samples"], rows["outputs"], identity["layers"],
                                         encoder.name, self.dtype)
                    if problem is None:
                        report.chunks_computed += 1
                    else:
                        cut[item.url] = problem
        if cut:
            url, why = next(iter(cut.items()))
            raise IncompleteShards(
                f"{len(cut)} shard(s) were not read to their end, e.g. {url!r} ({why}); nothing was committed to "
                f"{entry}: repair or remove the shard(s) and run again (finished shards are not read again)"
            )
        return report

    # ---- reading ------------------------------------------------------------------------------
    def read(self, entry: str | os.PathLike, identity: Optional[Dict[str, Any]] = None) -> FeatureSet:
        """A complete entry, its layers memory-mapped; with ``identity``, check the entry is made from it."""
        entry = Path(entry)
        if not (entry / INDEX).is_file():
            raise ValueError(f"{entry} is not a complete feature store entry (no {INDEX}); extract it first")
        index = read_index(entry)
        if identity is not None:
            check_identity(entry, index["identity"], identity)
        stamp = (entry / INDEX).stat()
        if _VERIFIED.get(str(entry.resolve())) != (stamp.st_ino, stamp.st_mtime_ns):
            verify_entry(entry, index)  # once per process and entry: every byte against its recorded hash
            _VERIFIED[str(entry.resolve())] = (stamp.st_ino, stamp.st_mtime_ns)
        mark_used(entry / ENTRY_MARKER, create=True)  # what pruning unused entries goes by
        features = {}
        n = len(index["keys"])
        for layer in index["layers"]:
            try:
                array = np.load(entry / layer["file"], mmap_mode="c")  # copy-on-write: writable, never written back
            except (OSError, ValueError) as exc:
                raise CorruptEntry(entry, f"{layer['file']} cannot be read: {exc}") from None
            if array.shape != (n, layer["dim"]):
                raise CorruptEntry(entry, f"{layer['file']} holds {array.shape}, expected {(n, layer['dim'])}")
            tensor = torch.from_numpy(array)
            features[layer["name"]] = tensor.view(torch.bfloat16) if index["identity"]["dtype"] == "bfloat16" else tensor
        # The content digest: scores computed from these features are cached under it (score_cache.py).
        content = hashlib.sha256(json.dumps(index["sha256"], sort_keys=True).encode()).hexdigest()
        info = dict(index["info"], entry=str(entry), content_sha256=content)
        return FeatureSet(keys=index["keys"], captions=index["captions"], labels=index["labels"],
                          features=features, info=info)
