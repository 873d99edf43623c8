"""The shipped configs (YAML files in this folder, package data), found by name: ``tiny`` -> ``tiny.yaml``."""

from __future__ import annotations

from pathlib import Path
from typing import Union

CONFIG_DIR = Path(__file__).resolve().parent


def shipped_config(value: Union[str, Path]) -> Path:
    """A path that exists (or looks like a path: a folder or a suffix) is itself; a bare name is a shipped config
    when one has that name."""
    path = Path(value)
    if path.exists() or path.suffix or len(path.parts) > 1:
        return path
    packaged = CONFIG_DIR / f"{value}.yaml"
    return packaged if packaged.is_file() else path


def names() -> list:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
