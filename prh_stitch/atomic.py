"""Atomic writes: a file, or a whole report folder, is there complete, or the previous version stays.

:func:`atomic_write_bytes` writes a temporary sibling (same folder, so the rename cannot cross file systems),
flushes it to disk and renames it over the destination. :func:`atomic_folder` does the same for a folder of files
that belong together (a report whose JSON, tables and figures must agree): the writer fills a temporary sibling
folder, and only when it finishes is the old folder set aside, the new one renamed in and the old one deleted. A
failure at any point, ``KeyboardInterrupt`` included, removes the temporary file or folder and leaves the previous
version untouched; a writer killed outright (``kill -9``) leaves a temporary sibling that the next writer of the same
destination removes, and puts back an old folder that was set aside but not yet replaced.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

# A file inside every folder written by atomic_folder: the mark that the whole folder is a report, so that replacing
# it can never delete anything else (a user's --out pointing at a training run or a home folder is refused instead).
REPORT_MARKER = ".prh_stitch_report"


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The writer's process id in the name lets the feature store remove the temporary files of dead writers.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        # mkstemp creates 0600 files; a report or shard is as readable as any file the user writes.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_folder(out: str | os.PathLike) -> Iterator[Path]:
    """A temporary sibling folder of ``out`` to write into; on success it replaces ``out`` as a whole.

    ``out`` may be absent, empty, or a folder an earlier ``atomic_folder`` wrote (it holds :data:`REPORT_MARKER`);
    anything else is refused with a :class:`~prh_stitch.errors.UserError`, since the replacement deletes the old
    folder's contents.
    """
    from prh_stitch.errors import UserError

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    _recover(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"report folder {str(out)!r} is a file; give a folder path for the report")
    if out.is_dir() and not (out / REPORT_MARKER).exists() and any(out.iterdir()):
        raise UserError(f"report folder {str(out)!r} holds files that are not a prh_stitch report (no "
                        f"{REPORT_MARKER} in it); a report replaces its whole folder, so give a new or empty folder")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700 folders; a report is as readable as the user's files
        (tmp / REPORT_MARKER).write_text("written by prh_stitch; this whole folder is replaced by the next report\n")
        yield tmp
        _swap_in(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _swap_in(new: Path, out: Path) -> None:
    """Rename ``new`` to ``out``; an existing ``out`` is set aside first and deleted only once ``new`` is in."""
    if not out.exists():
        os.rename(new, out)
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-{os.getpid()}-", dir=out.parent))
    os.rename(out, aside)  # a directory renamed onto an empty directory replaces it
    try:
        os.rename(new, out)
    except BaseException:
        os.rename(aside, out)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def _recover(out: Path) -> None:
    """Clean up after writers of ``out`` that were killed: their temporary folders go, a set-aside report returns."""
    for sibling in sorted(out.parent.glob(glob.escape(f".{out.name}.") + "*-*-*")):
        kind, _, rest = sibling.name[len(out.name) + 2:].partition("-")
        pid = rest.partition("-")[0]
        if kind not in ("tmp", "old") or not pid.isdigit() or _alive(int(pid)):
            continue
        if kind == "old" and not out.exists():
            os.rename(sibling, out)  # killed between setting the old report aside and renaming the new one in
        else:
            shutil.rmtree(sibling, ignore_errors=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
