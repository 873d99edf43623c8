"""One feature store entry on disk: its identity, its parts while extracting, the merge into layer arrays.

An entry is keyed by a fingerprint of everything its features are a function of (encoder weights,
preprocessing, layers, pooling, the shards read, the storage dtype) and is a folder:

    identity.json                    what the features are a function of; written first, checked on every use
    parts/s000003-b000001.safetensors   while extracting: one unit of work (shard 3, its raw samples
                                     1*chunk .. 2*chunk-1): features, keys, captions, labels, skip counts
    parts/s000003-b000002-last.safetensors   "-last": the unit that ends its shard (it also counts the
                                     shard-level problems)
    layer-0.npy, layer-1.npy, ...    when complete: one (N, D) array per layer, rows in key order
    index.json                       keys, captions, labels, layer files, info, content hashes; its presence
                                     marks completion

Verification. ``index.json`` records a SHA-256 of every layer file and one of the rows (keys, captions, labels
in their order), so flipped bytes, a cut file or shuffled keys are found rather than trained on:
``read_index`` checks the rows on every read, ``verify_entry`` every file (the store does it on an entry's first
open in a process; ``python -m prh_stitch.data verify`` for the whole store). Damage is ``CorruptEntry``, one
line that names the entry and the fix.

Resuming. Every unit file is written under a temporary name, flushed to disk and renamed, so a file with a final
name is whole; an extraction killed mid-way resumes from the units on disk (units already done are not decoded
again, shards already done are not even read). A shard's last unit is written only when the shard was read to its
end marker (and its ``pipe:`` command exited 0), so a cut stream is never committed. Only when every unit of every
shard is present are they merged into the layer arrays and ``index.json`` written, last and atomically; the parts
are then removed.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import uuid
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor

from prh_stitch.atomic import atomic_write_bytes
from prh_stitch.data.stream import SkipStats
from prh_stitch.errors import UserError

if TYPE_CHECKING:
    from prh_stitch.data.extraction_units import UnitDone

log = logging.getLogger("prh_stitch.data")

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# NumPy has no bfloat16: its rows are stored as their raw 16-bit patterns and viewed back on reading.
_NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": np.int16}
STORE_FORMAT = "prh_stitch-features-v3"  # v3: content hashes in index.json
DEFAULT_CHUNK_SIZE = 1024  # samples per unit: a few MB of features, a few seconds to a minute of encoder time
INDEX = "index.json"
IDENTITY = "identity.json"
_PART = re.compile(r"^s(\d{6,})-b(\d{6,})(-last)?\.safetensors$")
# A shard with one of these problems was not read to its end: its last unit is never written (see write_part).
SHARD_PROBLEMS = ("pipe_failed", "truncated_shard", "unreadable_shard")


def default_cache_dir() -> Path:
    """``$PRH_STITCH_CACHE``, else ``~/.cache/prh_stitch``."""
    return Path(os.environ.get("PRH_STITCH_CACHE") or Path.home() / ".cache" / "prh_stitch")


def data_fingerprint(urls: Sequence[str]) -> str:
    """Identity of a list of shards: ``pipe:`` and remote by URL; local files by content where their manifest
    records it (name, size, modification time and the writer's SHA-256: moving the folder, e.g. the cache with the
    built-in scenes, changes nothing), else by absolute path, size and modification time."""
    from prh_stitch.data.shards import manifest_records

    recorded = manifest_records(urls)
    parts = []
    for url in urls:
        if url.startswith("pipe:") or re.match(r"^[A-Za-z][A-Za-z0-9+.-]+://", url):
            parts.append(url)
            continue
        st = os.stat(url)
        shard = recorded.get(url)
        if shard is not None and shard.get("bytes") == st.st_size:
            parts.append(f"{os.path.basename(url)}:{st.st_size}:{st.st_mtime_ns}:{shard.get('sha256')}")
        else:
            parts.append(f"{os.path.abspath(url)}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:20]


class BadFeatures(ValueError):
    """The inputs cannot give a usable entry (no good sample, NaN features, duplicate keys): nothing is kept.

    ``skipped`` ({reason: count}) is set when there was no good sample at all, so callers can explain why from
    the counts themselves; it is None for the other problems.
    """

    def __init__(self, message: str, skipped: Optional[Dict[str, int]] = None) -> None:
        super().__init__(message)
        self.skipped = skipped


class EntryMismatch(ValueError):
    """An entry of that name holds features of something else: it is left exactly as it is."""


class CorruptEntry(UserError):
    """A complete entry whose files do not match their recorded hashes (or cannot be read): never used."""

    def __init__(self, entry: Path, problem: str) -> None:
        super().__init__(
            f"feature store entry {entry} is damaged ({problem}); delete it so that it is extracted again: "
            f"python -m prh_stitch.data verify --repair --out {entry.parent}"
        )
        self.entry, self.problem = entry, problem


class IncompleteShards(UserError):
    """Shards that were not read to their end: the entry is not committed (their good units stay for a rerun)."""


def temp_name(path: Path) -> Path:
    """A temporary sibling of ``path`` whose name carries this process's id (so a dead writer's can be found)."""
    return path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"


def part_name(shard: int, block: int, last: bool) -> str:
    return f"s{shard:06d}-b{block:06d}{'-last' if last else ''}.safetensors"


def _whole_safetensors(path: Path) -> bool:
    """Cheap check that a part is complete: safetensors checks that its header covers the file exactly."""
    try:
        with safe_open(path, "pt"):
            return True
    except (OSError, SafetensorError):
        return False


def _to_numpy(tensor: Tensor) -> np.ndarray:
    return (tensor.view(torch.int16) if tensor.dtype == torch.bfloat16 else tensor).numpy()


# -- identity ------------------------------------------------------------------------------------------


def entry_name(identity: Dict[str, Any]) -> str:
    """The default folder name of an entry: encoder name + a digest of its whole identity."""
    encoder = identity["encoder"]
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:20]
    return f"{encoder.replace('/', '_').replace(':', '_')}-{digest}"


def open_entry(entry: Path, identity: Dict[str, Any], chunk_size: int) -> int:
    """Create the entry (or check an existing one is the same); return its chunk size."""
    path = entry / IDENTITY
    if path.is_file():
        stored = json.loads(path.read_text())
        check_identity(entry, stored["identity"], identity)
        return int(stored["chunk_size"])
    entry.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, json.dumps({"identity": identity, "chunk_size": chunk_size}, indent=1).encode())
    return chunk_size


def check_identity(entry: Path, stored: Dict[str, Any], wanted: Dict[str, Any]) -> None:
    """Raise ``EntryMismatch`` naming each part of the identity that differs."""
    differ = sorted(k for k in set(stored) | set(wanted) if stored.get(k) != wanted.get(k))
    if len(differ) > 1 and "fingerprint" in differ:
        differ.remove("fingerprint")  # a digest of the other parts: name those instead
    if differ:
        what = "; ".join(f"{k}: stored {stored.get(k)!r}, requested {wanted.get(k)!r}" for k in differ)
        raise EntryMismatch(
            f"feature store entry {entry} was made from something else ({what}). Its features are not these; "
            "give another entry name (or output folder), or delete that folder to extract afresh"
        )


# -- parts ---------------------------------------------------------------------------------------------


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


def finished_shards(units: Dict[Tuple[int, int], Tuple[Path, bool]]) -> Dict[int, int]:
    """``{shard: its number of units}`` of shards whose last unit and every unit before it are on disk."""
    return {shard: block + 1 for (shard, block), (_, last) in units.items()
            if last and all((shard, b) in units for b in range(block))}


def write_part(entry: Path, done: "UnitDone", samples: List[dict], outputs: List[List[Tensor]],
               names: List[str], encoder_name: str, dtype_name: str) -> Optional[str]:
    """Write one finished unit (its rows per layer, keys, captions, labels, counts) as a part, atomically.

    Returns the shard-level problem (``SHARD_PROBLEMS``) that keeps the unit ending a shard from being written,
    else None: without that unit the shard never counts as finished, so the entry cannot be committed.
    """
    problem = next((reason for reason in SHARD_PROBLEMS if done.skipped.get(reason)), None)
    if problem is not None:
        return problem
    if len(samples) != done.good:
        raise RuntimeError(f"unit {done.shard}/{done.block}: {len(samples)} encoded rows for {done.good} good samples")
    dtype = DTYPES[dtype_name]
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
    return None


# -- completion ----------------------------------------------------------------------------------------

Loaded = List[Tuple[Dict[str, Tensor], Dict[str, Any]]]  # per unit in order: (layer tensors, meta)


def commit_entry(entry: Path, seconds: float = 0.0) -> None:
    """Merge the parts of a fully extracted entry into per-layer arrays in key order; write the index.

    A failure (a full disk included) removes the layer arrays written so far; the parts stay, for a rerun.
    """
    stored = json.loads((entry / IDENTITY).read_text())
    identity = stored["identity"]
    units = units_on_disk(entry)
    finished = finished_shards(units)
    missing = [s for s in range(identity["shards"]) if s not in finished]
    if missing:
        raise RuntimeError(
            f"feature store entry {entry} lacks parts of {len(missing)} shard(s) (e.g. shard {missing[0]}) after "
            "every rank finished; when ranks run on several machines the store must be on a filesystem they all see"
        )
    loaded, stats, keys = _load_parts(units)
    sorted_keys = _key_order(keys, stats, identity["shards"])
    position = {key: i for i, key in enumerate(sorted_keys)}
    captions, labels = _captions_and_labels(loaded, position)
    layer_files, dims, hashes = [], {}, {"rows": rows_digest(sorted_keys, captions, labels)}
    try:
        for i, name in enumerate(identity["layers"]):
            dim = next(t[f"layer:{name}"].shape[1] for t, m in loaded if m["keys"])
            dims[name] = dim
            path = entry / f"layer-{i}.npy"
            hashes[path.name] = _write_layer_array(path, loaded, position, f"layer:{name}",
                                                   _NUMPY_DTYPES[identity["dtype"]], dim)
            layer_files.append({"name": name, "file": path.name, "dim": dim})
        info = _entry_info(stored, dims, len(keys), stats, len(units), seconds)
        index = {"keys": sorted_keys, "captions": captions, "labels": labels, "layers": layer_files,
                 "identity": identity, "info": info, "sha256": hashes}
        atomic_write_bytes(entry / INDEX, json.dumps(index).encode())  # last: its presence marks the entry complete
    except BaseException as exc:
        for layer in layer_files:
            (entry / layer["file"]).unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise disk_full(entry) from exc
        raise
    shutil.rmtree(entry / "parts", ignore_errors=True)


def disk_full(entry: Path) -> UserError:
    return UserError(f"no space left on the device while writing feature store entry {entry}; nothing was "
                     "committed (finished parts stay, for a rerun): free space, or set PRH_STITCH_CACHE to a folder "
                     "on a larger disk")


def rows_digest(keys: List[str], captions: List[str], labels: List[int]) -> str:
    """SHA-256 of the rows' identities in their order: a shuffled, edited or cut key list changes it."""
    return hashlib.sha256(json.dumps([keys, captions, labels]).encode()).hexdigest()


def _load_parts(units: Dict[Tuple[int, int], Tuple[Path, bool]]) -> Tuple[Loaded, SkipStats, List[str]]:
    """Every part in unit order, the merged skip counts and all keys (in unit order)."""
    loaded: Loaded = []
    stats = SkipStats()
    keys: List[str] = []
    for unit in sorted(units):
        tensors = load_safetensors(units[unit][0].read_bytes())
        meta = json.loads(bytes(tensors.pop("meta").numpy()))
        loaded.append((tensors, meta))
        counts = Counter(meta["skipped"])
        stats.merge(SkipStats(meta["good"], counts, {meta["url"]: {"good": meta["good"], "skipped": counts}}))
        keys += meta["keys"]
    return loaded, stats, keys


def _key_order(keys: List[str], stats: SkipStats, shards: int) -> List[str]:
    """The keys sorted; ``BadFeatures`` when there are none or some repeat."""
    if not keys:
        raise BadFeatures(
            f"no usable samples in {shards} shard(s); skipped: {dict(stats.skipped)}. "
            "Check the shards with: python -m prh_stitch.data check \"PATTERN\"",
            skipped=dict(stats.skipped),
        )
    sorted_keys = sorted(keys)
    duplicates = [a for a, b in zip(sorted_keys, sorted_keys[1:]) if a == b]
    if duplicates:
        raise BadFeatures(
            f"duplicate sample keys in the shards (e.g. {duplicates[0]!r}, {len(duplicates)} in all); keys must be "
            "unique to join image and text features"
        )
    return sorted_keys


def _captions_and_labels(loaded: Loaded, position: Dict[str, int]) -> Tuple[List[str], List[int]]:
    captions: List[str] = [""] * len(position)
    labels: List[int] = [-1] * len(position)
    for _, meta in loaded:
        for key, caption, label in zip(meta["keys"], meta["captions"], meta["labels"]):
            captions[position[key]] = caption
            labels[position[key]] = label
    return captions, labels


def _write_layer_array(path: Path, loaded: Loaded, position: Dict[str, int], tensor_name: str,
                       numpy_dtype: Any, dim: int) -> str:
    """One layer's (N, dim) ``.npy``, rows in key order, filled part by part and renamed into place; its SHA-256.

    The file's blocks are allocated before it is mapped, so a full disk is an ``ENOSPC`` here rather than a
    SIGBUS when a page of the mapping is first written.
    """
    tmp = temp_name(path)
    try:
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(numpy_dtype)), "fortran_order": False,
                  "shape": (len(position), dim)}
        with open(tmp, "wb") as handle:
            np.lib.format.write_array_header_1_0(handle, header)
            offset = handle.tell()
            size = offset + len(position) * dim * np.dtype(numpy_dtype).itemsize
            if hasattr(os, "posix_fallocate"):
                os.posix_fallocate(handle.fileno(), 0, size)
            else:  # macOS: a sparse file (a full disk may then still stop the process when a page is written)
                handle.truncate(size)
        array = np.memmap(tmp, dtype=numpy_dtype, mode="r+", offset=offset, shape=(len(position), dim))
        for tensors, meta in loaded:
            if meta["keys"]:
                rows = np.fromiter((position[k] for k in meta["keys"]), dtype=np.int64, count=len(meta["keys"]))
                array[rows] = _to_numpy(tensors[tensor_name])
        array.flush()
        del array
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
            digest = hashlib.file_digest(handle, "sha256").hexdigest()
        os.replace(tmp, path)
        return digest
    finally:
        tmp.unlink(missing_ok=True)


def _entry_info(stored: Dict[str, Any], dims: Dict[str, int], num_samples: int, stats: SkipStats,
                chunks: int, seconds: float) -> Dict[str, Any]:
    identity = stored["identity"]
    return {  # no absolute path: the store can move (the reader adds where it found the entry)
        "encoder": identity["encoder"],
        "encoder_fingerprint": identity["fingerprint"],
        "weights": identity["weights"],
        "data_fingerprint": identity["data"],
        "layers": identity["layers"],
        "dims": dims,
        "pooling": identity["pooling"],
        "dtype": identity["dtype"],
        "num_samples": num_samples,
        "skipped": stats.as_dict(),
        "chunks": chunks,
        "chunk_size": stored["chunk_size"],
        "seconds": round(seconds, 3),
    }


# -- reading and verifying -----------------------------------------------------------------------------


def read_index(entry: Path) -> Dict[str, Any]:
    """A complete entry's index, its rows checked against their hash; ``CorruptEntry`` when it cannot be trusted."""
    try:
        index = json.loads((entry / INDEX).read_text())
        old_version = isinstance(index, dict) and "keys" in index and "sha256" not in index
        hashes = {} if old_version else index["sha256"]
        layers = [(layer["name"], layer["file"], int(layer["dim"])) for layer in index["layers"]]
        rows = (index["keys"], index["captions"], index["labels"])
        index["identity"]["dtype"], index["info"]  # noqa: B018 - present, or the entry is damaged
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CorruptEntry(entry, f"{INDEX} cannot be read: {type(exc).__name__}: {exc}") from None
    if old_version:
        raise CorruptEntry(entry, f"{INDEX} has no content hashes: an entry of an older version")
    if len(set(map(len, rows))) != 1 or any(file not in hashes for _, file, _ in layers):
        raise CorruptEntry(entry, f"{INDEX} is inconsistent")
    if rows_digest(*rows) != hashes.get("rows"):
        raise CorruptEntry(entry, f"the keys, captions or labels in {INDEX} do not match their recorded hash")
    return index


def verify_entry(entry: Path, index: Dict[str, Any]) -> None:
    """Every layer file of a complete entry: its size as its shape says, its bytes as their recorded hash."""
    n = len(index["keys"])
    itemsize = np.dtype(_NUMPY_DTYPES[index["identity"]["dtype"]]).itemsize
    for layer in index["layers"]:
        path = entry / layer["file"]
        try:
            with open(path, "rb") as handle:
                version = np.lib.format.read_magic(handle)
                fmt = np.lib.format
                read_header = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
                shape, _, _ = read_header(handle)
                expected = handle.tell() + n * layer["dim"] * itemsize
                size = os.fstat(handle.fileno()).st_size
                handle.seek(0)
                digest = hashlib.file_digest(handle, "sha256").hexdigest()
        except (OSError, ValueError) as exc:
            raise CorruptEntry(entry, f"{layer['file']} cannot be read: {exc}") from None
        if tuple(shape) != (n, layer["dim"]) or size != expected:
            raise CorruptEntry(entry, f"{layer['file']} holds {size} bytes of shape {tuple(shape)}, expected "
                                      f"{expected} bytes of shape {(n, layer['dim'])} (cut or overwritten)")
        if digest != index["sha256"][layer["file"]]:
            raise CorruptEntry(entry, f"{layer['file']} does not match its recorded SHA-256")
