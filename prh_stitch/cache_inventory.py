"""What the cache holds and when it was last used; pruning what has not been used for a while, or down to a size.

The cache (``$PRH_STITCH_CACHE``, default ``~/.cache/prh_stitch``) only grows: every encoder, layer set and data set
adds a feature store entry, every scored pair a score record, every figure drawn a figure entry. Three of its folders
hold items that are recomputed when missing, so they can be pruned by last use (:mod:`prh_stitch.last_used`):

* ``features/``: feature store entries (a folder each; last use: its ``last-used`` file, else its index; an
  unfinished extraction: its newest file). An entry another process holds (extracting, or reading under the lock)
  is left alone, never waited for.
* ``scores/``: score records (``KEY.json``).
* ``figures/``: drawn figures (``KEY.json`` with ``KEY.png`` and ``KEY.pdf``).

The other folders (built-in scenes and data sets, offline model weights) are listed with their sizes and never
pruned here: they are inputs, some of them downloads.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from datetime import datetime, timezone
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

from prh_stitch.data.store_entry import IDENTITY, INDEX, default_cache_dir
from prh_stitch.data.store_safety import entry_lock
from prh_stitch.errors import UserError
from prh_stitch.figure_cache import SUFFIXES
from prh_stitch.last_used import ENTRY_MARKER

PRUNABLE = ("features", "scores", "figures")
DAY = 86400.0


def _bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="seconds")


def _root(root: Optional[str | os.PathLike]) -> Path:
    folder = Path(root) if root is not None else default_cache_dir()
    if not folder.is_dir():
        raise UserError(f"no cache folder at {folder}; give it with --root (default $PRH_STITCH_CACHE or "
                        "~/.cache/prh_stitch)")
    return folder


def _entries(features: Path) -> List[Path]:
    if not features.is_dir():
        return []
    return sorted(p for p in features.iterdir() if p.is_dir() and not p.name.startswith("."))


def entry_last_used(entry: Path) -> float:
    """Seconds since the epoch of an entry's last use (see the module docstring)."""
    for name in (ENTRY_MARKER, INDEX):
        if (entry / name).is_file():
            return (entry / name).stat().st_mtime
    times = [p.stat().st_mtime for p in entry.rglob("*") if p.is_file()]
    return max(times, default=entry.stat().st_mtime)


def _describe(entry: Path) -> Dict[str, Any]:
    """One entry's line of the inventory: what it is features of, how many, how big, when last used."""
    record: Dict[str, Any] = {"entry": entry.name, "complete": (entry / INDEX).is_file(), "bytes": _bytes(entry),
                              "last_used": _iso(entry_last_used(entry))}
    try:
        if record["complete"]:
            index = json.loads((entry / INDEX).read_text())
            identity, samples = index["identity"], len(index["keys"])
        else:
            identity, samples = json.loads((entry / IDENTITY).read_text())["identity"], None
        record.update(encoder=identity["encoder"], layers=identity["layers"], pooling=identity["pooling"],
                      dtype=identity["dtype"], shards=identity["shards"], samples=samples)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        record["unreadable"] = f"{type(exc).__name__}: {exc}"  # `python -m prh_stitch.data verify` says more
    return record


def _keyed(folder: Path, index_suffix: str = ".json") -> Iterator[Tuple[str, Path]]:
    """(key, index file) of a keyed cache folder (``KEY.json`` per item)."""
    if folder.is_dir():
        for path in sorted(folder.glob(f"*{index_suffix}")):
            if not path.name.startswith("."):
                yield path.name[: -len(index_suffix)], path


def _folders(root: Path) -> List[Path]:
    """The cache's folders, as the inventory lists and counts them (hidden ones are lock and temporary files)."""
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def cache_inventory(root: Optional[str] = None) -> Dict[str, Any]:
    """What the cache holds: bytes per folder, and every feature store entry with its encoder, layers and last use.

    Args:
        root: the cache folder (default $PRH_STITCH_CACHE, else ~/.cache/prh_stitch)

    Returns:
        root, total bytes, folders (bytes, items, prunable), feature store entries.
    """
    folder = _root(root)
    folders = {}
    for child in _folders(folder):
        items = (len(_entries(child)) if child.name == "features" else
                 sum(1 for _ in _keyed(child)) if child.name in ("scores", "figures") else None)
        folders[child.name] = {"bytes": _bytes(child), "items": items, "prunable": child.name in PRUNABLE}
    return {"root": str(folder), "bytes": sum(f["bytes"] for f in folders.values()), "folders": folders,
            "features": [_describe(entry) for entry in _entries(folder / "features")]}


@dataclass(frozen=True)
class _Item:
    """One prunable item: a feature store entry (a folder), or a score or figure (its index first, then its files)."""

    folder: str  # features, scores or figures
    name: str
    last_used: float
    paths: Tuple[Path, ...]


def _items(root: Path, only: List[str]) -> List[_Item]:
    items = []
    if "features" in only:
        items += [_Item("features", entry.name, entry_last_used(entry), (entry,))
                  for entry in _entries(root / "features")]
    for name in ("scores", "figures"):
        if name in only:
            for key, index in _keyed(root / name):
                # The index first: without it the item is absent, so a reader never meets half an item.
                files = (index,) + (tuple(index.with_suffix(s) for s in SUFFIXES) if name == "figures" else ())
                items.append(_Item(name, key, index.stat().st_mtime, files))
    return items


def _remove(item: _Item, dry_run: bool) -> Optional[int]:
    """Delete one item (not when ``dry_run``); its bytes, or None when another process holds it (a feature entry's
    lock). Sizes are measured here, item by item, so pruning by age never walks what it keeps."""
    if item.folder != "features":
        size = sum(path.stat().st_size for path in item.paths if path.is_file())
        if not dry_run:
            for path in item.paths:
                path.unlink(missing_ok=True)  # gone meanwhile (another prune): nothing to do
        return size
    # Not waited for: a holder is using the entry right now; deleting under the lock, a reader that comes later
    # finds no entry and extracts it again (a process that has it memory-mapped keeps its pages).
    with entry_lock(item.paths[0], wait=False) as held:
        if not held:
            return None
        size = _bytes(item.paths[0])
        if not dry_run:
            shutil.rmtree(item.paths[0])
        return size


def prune_cache(unused_days: Optional[float] = None, root: Optional[str] = None, only: Optional[List[str]] = None,
                dry_run: bool = False, max_gb: Optional[float] = None) -> Dict[str, Any]:
    """Delete cached items not used for a while, or the least recently used until the cache fits a size.

    Deleted items are computed again when next needed. Give ``unused_days``, ``max_gb`` or both: the age rule goes
    first, then the least recently used of what is left go, oldest first, until the whole cache folder (inputs
    included, as ``cache`` counts it) holds at most ``max_gb``. Inputs and items in use are never deleted, so the
    size may stay over; the report then says ``fits: false``.

    Args:
        unused_days: delete what was last used more than this many days ago (0: everything not held right now)
        root: the cache folder (default $PRH_STITCH_CACHE, else ~/.cache/prh_stitch)
        only: which folders to prune, of features, scores and figures (default: all three)
        dry_run: report what would be deleted, delete nothing
        max_gb: keep the cache folder at most this many gigabytes (10^9 bytes), least recently used first

    Returns:
        root, the rules, what was (or would be) deleted per folder, the bytes freed, entries left alone as in use;
        with ``max_gb``, the cache's bytes after and whether they fit.
    """
    if unused_days is None and max_gb is None:
        raise UserError("say what to prune: --unused-days N (not used for N days), --max-gb G (least recently used "
                        "until the cache holds G gigabytes), or both")
    if unused_days is not None and not unused_days >= 0:
        raise UserError(f"--unused-days must be a number of days >= 0, got {unused_days}")
    if max_gb is not None and not max_gb >= 0:
        raise UserError(f"--max-gb must be a number of gigabytes >= 0, got {max_gb}")
    only = list(PRUNABLE) if only is None else list(only)
    unknown = sorted(set(only) - set(PRUNABLE))
    if unknown:
        raise UserError(f"cannot prune {unknown}: choose from {', '.join(PRUNABLE)} (the other folders are inputs)")
    folder = _root(root)
    cutoff = None if unused_days is None else time.time() - unused_days * DAY
    budget = None if max_gb is None else round(max_gb * 1e9)  # whole bytes: 0.063035 GB is 63,035 bytes, not fewer
    removed: Dict[str, List[str]] = {name: [] for name in only}
    report: Dict[str, Any] = {"root": str(folder), "unused_days": unused_days,
                              "cutoff": None if cutoff is None else _iso(cutoff), "max_bytes": budget,
                              "dry_run": dry_run, "removed": removed, "freed_bytes": 0, "in_use": []}
    total = None if budget is None else sum(_bytes(child) for child in _folders(folder))
    # Oldest first, so the size rule deletes the least recently used; ties in a fixed order.
    for item in sorted(_items(folder, only), key=lambda i: (i.last_used, i.folder, i.name)):
        too_old = cutoff is not None and item.last_used < cutoff
        too_big = budget is not None and total - report["freed_bytes"] > budget
        if not (too_old or too_big):
            continue
        size = _remove(item, dry_run)
        if size is None:
            report["in_use"].append(item.name)
            continue
        removed[item.folder].append(item.name)
        report["freed_bytes"] += size
    report["bytes_after"] = None if total is None else total - report["freed_bytes"]
    report["fits"] = None if budget is None else report["bytes_after"] <= budget
    return report
