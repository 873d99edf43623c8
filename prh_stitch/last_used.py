"""When a cached item was last used: the modification time of the file that stands for it, set on every hit.

A hit touches that file (``os.utime``); pruning (:mod:`prh_stitch.cache_inventory`) reads it. Where the cache is
read-only the touch is skipped without a word: the item then looks as old as its last write, and a read-only cache
cannot be pruned anyway. A feature store entry is stood for by a ``last-used`` file of its own, not by its index,
whose modification time says whether this process has already verified the entry.
"""

from __future__ import annotations

import os
from pathlib import Path

ENTRY_MARKER = "last-used"  # inside a feature store entry


def mark_used(path: str | os.PathLike, create: bool = False) -> None:
    """Set ``path``'s modification time to now (creating an empty file first when ``create``); never raises."""
    try:
        if create:
            Path(path).touch()
        else:
            os.utime(path)
    except OSError:
        pass  # a read-only or vanished cache: nothing to record
