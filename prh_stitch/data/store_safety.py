"""Keeping the feature store sound across processes: one lock per entry, dead writers' temporary files, the full
check of every entry (``verify_store``) and its repair.

The lock is an advisory ``fcntl.flock`` on ``ROOT/.ENTRY.lock``, outside the entry so that deleting the entry (a
repair, a failed extraction) cannot pull it from under a waiting process; the holder removes it when done. A
second process asking for an entry another is extracting waits, then reads the finished entry; the holder alone
cleans temporary files, and a file whose writer (the id in its name) is no longer alive is removed on the next
open.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any, Dict, Iterator, Optional

from prh_stitch.atomic import _alive  # the report folders' liveness test: the same question
from prh_stitch.data.store_entry import INDEX, CorruptEntry, read_index, verify_entry
from prh_stitch.errors import UserError

log = logging.getLogger("prh_stitch.data")

_TEMP = re.compile(r"^\..+?(?:\.(\d+)\.[0-9a-z_]+)?\.tmp$")  # temp_name's and atomic_write_bytes' names
_UNWRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)


def unwritable_store(folder: Path, exc: OSError) -> UserError:
    return UserError(f"the feature store folder {folder} is not writable ({exc.strerror}); set PRH_STITCH_CACHE "
                     "to a writable folder (or pass another store folder)")


@contextlib.contextmanager
def entry_lock(entry: Path, needed: bool = True, wait: bool = True) -> Iterator[bool]:
    """Hold the entry's lock (waiting for another holder). Where it cannot be created (a read-only store) a
    complete entry is read without it; anything else is the one-line ``UserError`` of an unwritable store.
    Without ``wait``, an entry another process holds is not waited for: the block runs unlocked, told so by False."""
    if not needed:
        yield True
        return
    path = entry.parent / f".{entry.name}.lock"
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        fd = _locked(path, wait)
    except OSError as exc:
        if exc.errno not in _UNWRITABLE:
            raise
        if (entry / INDEX).is_file():
            yield True  # nothing will be written: a read-only store of finished entries is fine
            return
        raise unwritable_store(entry.parent, exc) from None
    if fd is None:
        yield False
        return
    try:
        yield True
    finally:
        path.unlink(missing_ok=True)  # while still held: a waiter then finds its file gone and locks afresh
        os.close(fd)


def _locked(path: Path, wait: bool = True) -> Optional[int]:
    """An open descriptor of ``path`` holding its exclusive lock (the file still at that path, not an unlinked one);
    None when another process holds it and ``wait`` is False."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                os.close(fd)
                return None
            log.info("waiting for another process working on %s", path.name[1:-5])
            fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


def remove_dead_temp_files(entry: Path) -> int:
    """Remove temporary files in the entry left by writers that died (or whose name has no process id)."""
    removed = 0
    for folder in (entry, entry / "parts"):
        for path in folder.iterdir() if folder.is_dir() else []:
            match = _TEMP.match(path.name)
            if match and not (match.group(1) and _alive(int(match.group(1)))):
                path.unlink(missing_ok=True)
                removed += 1
    if removed:
        log.info("removed %d temporary file(s) of dead writers in %s", removed, entry)
    return removed


def verify_store(root: str | os.PathLike, repair: bool = False) -> Dict[str, Any]:
    """Check every complete entry of the store fully (rows and every layer file against their hashes).

    With ``repair`` a damaged entry is deleted (under its lock), so the next use extracts it again. Returns
    ``{"root", "checked", "ok", "damaged": [{"entry", "problem"}], "repaired": [names]}``.
    """
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"no feature store at {root}; give the store folder with --out (default "
                        "$PRH_STITCH_CACHE/features)")
    report: Dict[str, Any] = {"root": str(root), "checked": 0, "ok": 0, "damaged": [], "repaired": []}
    for entry in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if not (entry / INDEX).exists():
            continue  # not committed: an extraction in progress or to be resumed, nothing is read from it
        report["checked"] += 1
        problem = _problem(entry)
        if problem is None:
            report["ok"] += 1
            continue
        report["damaged"].append({"entry": entry.name, "problem": problem})
        if repair:
            with entry_lock(entry):
                shutil.rmtree(entry)
            report["repaired"].append(entry.name)
    return report


def _problem(entry: Path) -> Optional[str]:
    try:
        verify_entry(entry, read_index(entry))
    except CorruptEntry as exc:
        return exc.problem
    return None
