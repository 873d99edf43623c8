"""Where zoo models live on disk, and whether one is ready to load.

``<cache>/zoo/<name>/`` holds the converted model (``model.safetensors``, ``config.json``, tokenizer files) and
``zoo.json``, the manifest written last: a folder without it, or whose recorded sha256 is not the one the project
expects now, is not a usable model. ``<cache>/zoo/downloads/<name>/`` keeps the distribution files, so that a
conversion can be redone without the network.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Optional

from prh_stitch.zoo.entries import ZooEntry, get_entry

MANIFEST = "zoo.json"


def zoo_root(cache_dir: Optional[Path] = None) -> Path:
    from prh_stitch.data.features import default_cache_dir

    return Path(cache_dir) if cache_dir is not None else default_cache_dir() / "zoo"


def model_dir(name: str, cache_dir: Optional[Path] = None) -> Path:
    return zoo_root(cache_dir) / name


def downloads_dir(name: str, cache_dir: Optional[Path] = None) -> Path:
    return zoo_root(cache_dir) / "downloads" / name


def read_manifest(name: str, cache_dir: Optional[Path] = None) -> Optional[Dict[str, Any]]:
    path = model_dir(name, cache_dir) / MANIFEST
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def fetch_command(name: str) -> str:
    return f"python -m prh_stitch.zoo fetch {name}"


def require_fetched(name: str, cache_dir: Optional[Path] = None, entry: Optional[ZooEntry] = None) -> Path:
    """The folder of a fetched, current zoo model; otherwise one error line naming the fetch command."""
    entry = entry or get_entry(name)
    manifest = read_manifest(name, cache_dir)
    if manifest is None:
        raise ValueError(f"zoo model {name!r} is not fetched; run: {fetch_command(name)}")
    if entry.sha256 and manifest.get("sha256") != entry.sha256:
        raise ValueError(
            f"zoo model {name!r} in {model_dir(name, cache_dir)} is not the version this project expects "
            f"(sha256 {str(manifest.get('sha256'))[:12]}... != {entry.sha256[:12]}...); run: {fetch_command(name)} --force"
        )
    return model_dir(name, cache_dir)
