"""Package exports loaded on first use (PEP 562), so importing a package does not import every heavy dependency
of its submodules: Lightning and torchmetrics cost 10–20 s on a small CPU, and a command that scores cached
features or prints a report never needs them."""

from __future__ import annotations

import importlib
from typing import Any, Callable, Dict


def lazy_exports(package: str, exports: Dict[str, str]) -> Callable[[str], Any]:
    """A module-level ``__getattr__`` for ``package``: ``exports`` maps each public name to the submodule (relative
    to ``package``) that defines it."""

    def __getattr__(name: str) -> Any:
        if name in exports:
            return getattr(importlib.import_module(f"{package}.{exports[name]}"), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
