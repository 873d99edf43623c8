"""Figures drawn once: a report's figure is a pure function of its inputs, so a rerun with the same inputs and the
same drawing code reuses the PNG and PDF bytes of the last run instead of drawing again.

Drawing is most of a rerun's time (a study's 75 figures took 108 s of a 155 s rerun that read every score from the
cache). A :class:`Drawing` names the function and its inputs; its key is a SHA-256 of those inputs, the source of
the module that defines the function, and the versions of prh_stitch and matplotlib. :class:`FigureCache` keeps
``KEY.png``, ``KEY.pdf`` and ``KEY.json`` (the two files' SHA-256) and serves an entry only when both files
match their recorded digests, so a truncated or edited file is drawn again, never copied into a report.

The cache is switched on for a block of code with :func:`figure_cache` (the study and align commands use
``<cache root>/figures``); :func:`prh_stitch.reports.save_figure` consults it for every :class:`Drawing`.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import hashlib
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

from prh_stitch.atomic import atomic_write_bytes
from prh_stitch.last_used import mark_used

log = logging.getLogger(__name__)

SUFFIXES = (".png", ".pdf")
_ACTIVE: contextvars.ContextVar[Optional["FigureCache"]] = contextvars.ContextVar("prh_stitch_figure_cache",
                                                                                   default=None)


@functools.lru_cache(maxsize=None)
def _module_source_digest(module_name: str) -> str:
    """The drawing code's identity: editing the module that draws a figure invalidates its cached files."""
    module = sys.modules.get(module_name)
    source = getattr(module, "__file__", None)
    return hashlib.sha256(Path(source).read_bytes()).hexdigest() if source else module_name


@dataclass(frozen=True, eq=False)
class Drawing:
    """``draw(*args, **kwargs)`` returns a ``matplotlib.figure.Figure``; the inputs must be JSON-like values
    (numbers, strings, lists, dicts; tensors and arrays are turned into lists for the key)."""

    draw: Callable[..., Any]
    args: Tuple[Any, ...] = ()
    kwargs: Dict[str, Any] = field(default_factory=dict)

    def figure(self):
        return self.draw(*self.args, **self.kwargs)

    def key(self) -> str:
        import matplotlib

        import prh_stitch
        from prh_stitch.reports import to_jsonable

        payload = {"draw": f"{self.draw.__module__}.{self.draw.__qualname__}",
                   "code": _module_source_digest(self.draw.__module__), "prh_stitch": prh_stitch.__version__,
                   "matplotlib": matplotlib.__version__,
                   "inputs": to_jsonable([list(self.args), self.kwargs])}
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=repr).encode()).hexdigest()


class FigureCache:
    """Rendered figures by key under ``root``, each entry checked against its recorded SHA-256 digests."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.hits = 0
        self.draws = 0

    def get(self, key: str) -> Optional[Dict[str, bytes]]:
        """The entry's bytes per suffix, or None when absent, incomplete or not matching its digests."""
        index = self.root / f"{key}.json"
        try:
            digests = json.loads(index.read_text())
            files = {suffix: (self.root / f"{key}{suffix}").read_bytes() for suffix in SUFFIXES}
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("figure cache entry %s cannot be read (%s); drawing the figure again", index, exc)
            return None
        if not isinstance(digests, dict) or any(
                hashlib.sha256(data).hexdigest() != digests.get(suffix) for suffix, data in files.items()):
            log.warning("figure cache entry %s does not match its digests; drawing the figure again", index)
            return None
        self.hits += 1
        mark_used(index)
        return files

    def put(self, key: str, files: Dict[str, bytes]) -> None:
        """Keep a freshly drawn figure's files (counted in ``draws``)."""
        self.draws += 1
        for suffix, data in files.items():
            atomic_write_bytes(self.root / f"{key}{suffix}", data)
        # The index goes last: an entry without it (an interrupted put) is simply absent.
        index = {suffix: hashlib.sha256(data).hexdigest() for suffix, data in files.items()}
        atomic_write_bytes(self.root / f"{key}.json", json.dumps(index, sort_keys=True).encode())


def active() -> Optional[FigureCache]:
    """The cache switched on by the innermost :func:`figure_cache` block of this context, if any."""
    return _ACTIVE.get()


@contextlib.contextmanager
def figure_cache(root: Optional[str | Path]) -> Iterator[Optional[FigureCache]]:
    """Within the block, :func:`~prh_stitch.reports.save_figure` reuses and fills the cache at ``root``
    (None: no cache, every figure is drawn)."""
    cache = FigureCache(root) if root is not None else None
    token = _ACTIVE.set(cache)
    try:
        yield cache
    finally:
        _ACTIVE.reset(token)
