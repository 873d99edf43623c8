"""One small registry type shared by encoders, stitchers, losses, poolers and metrics.

A registry maps a name to a factory. Looking up a name that is not there raises an error that lists
what is registered, so a typo in a config is answered with the valid choices instead of a KeyError.
"""

from __future__ import annotations

import difflib
from typing import Callable, Dict, Generic, Iterator, List, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Named factories of one kind (``kind`` appears in error messages, e.g. "stitcher")."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: Dict[str, T] = {}

    def register(self, name: str | None = None) -> Callable[[T], T]:
        """Decorator: ``@REGISTRY.register("linear")``; the name defaults to the object's ``__name__``."""

        def decorator(obj: T) -> T:
            key = name or getattr(obj, "__name__")
            if key in self._items:
                raise ValueError(f"{self.kind} {key!r} is registered twice; names must be unique")
            self._items[key] = obj
            return obj

        return decorator

    def get(self, name: str) -> T:
        # ValueError rather than KeyError: KeyError quotes its message, which garbles the hint.
        if name not in self._items:
            raise ValueError(self.unknown_message(name))
        return self._items[name]

    def unknown_message(self, name: str) -> str:
        close = difflib.get_close_matches(str(name), self._items, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        return f"unknown {self.kind} {name!r}.{hint} Choose one of: {', '.join(sorted(self._items))}."

    def names(self) -> List[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)
