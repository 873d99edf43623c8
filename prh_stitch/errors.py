"""The one kind of error meant for the user, and the exceptions every command turns into one line.

Library functions raise :class:`UserError` (a ``ValueError``) for bad input; the commands in
:mod:`prh_stitch.cli` print any error of ``USER_ERRORS`` as ``PROG: error: MESSAGE`` and exit with status 2, and
so do the platform's and torch's errors that :func:`user_message` recognises as the user's setup (a read-only
cache, an unsafe checkpoint, ...); anything else keeps its traceback.
"""

from __future__ import annotations

import errno
import os
import pickle
from pathlib import Path
from typing import Any, Optional


class UserError(ValueError):
    """Bad input (a setting, a file, data): the message names the problem and the fix."""


# Errors whose message is meant for the user; ValueError covers the registries' "unknown ..." errors and the
# store's BadFeatures, ImportError a missing optional dependency, FileNotFoundError a missing file.
USER_ERRORS = (ValueError, FileNotFoundError, ImportError)


def parser_error_line(message: str) -> str:
    """jsonargparse's nested, multi-line parse error as one line: the key path, then the innermost reason.

    Formatting only: which key failed is already in the error; this joins its lines so that a command can print
    the one ``PROG: error: ...`` line every command prints.
    """
    lines = [line.strip() for line in str(message).strip().splitlines() if line.strip()]
    if len(lines) <= 1:
        return lines[0] if lines else "invalid arguments"
    keys = [line[len("Parser key "):].rstrip(":").strip('"') for line in lines if line.startswith("Parser key ")]
    reasons = [line.lstrip("- ") for line in lines
               if not line.startswith(("Parser key ", "Subtypes:", "Errors:", "Given value type:", "Problem with",
                                       "- Expected a <class 'NoneType'>", "Does not validate"))]
    where = ".".join(keys)
    return (f"{where}: " if where else "") + "; ".join(dict.fromkeys(reasons))


# errno values that mean "this folder cannot be written", and the ones that mean "the disk is full".
_NOT_WRITABLE = {errno.EACCES, errno.EPERM, errno.EROFS}
_FULL = {errno.ENOSPC, errno.EDQUOT}


def user_message(exc: BaseException) -> Optional[str]:
    """One line (problem and fix) for an exception that is the user's setup, not a bug; None for anything else.

    These come from the platform or from torch, not from prh_stitch's own checks, so their own messages name
    neither the setting at fault nor the fix: a read-only or full cache folder, a file that is not a safe
    checkpoint, checkpoint weights that do not fit the model, a setting too large for float32 arithmetic.
    """
    if isinstance(exc, OSError) and exc.errno in _NOT_WRITABLE | _FULL and exc.filename is not None:
        folder = _existing_folder(exc.filename)
        reason = exc.strerror or errno.errorcode.get(exc.errno, "")
        if exc.errno in _FULL:
            where = "the cache folder " if _in_cache(folder) else ""
            return (f"cannot write to {where}{folder} ({reason}); free space there, or point PRH_STITCH_CACHE (the "
                    "feature cache) or the output option at a folder on another disk")
        if _in_cache(folder):
            return (f"cannot write to the cache folder {folder} ({reason}); set PRH_STITCH_CACHE (or the command's "
                    "cache_dir option) to a writable folder")
        return (f"cannot write to {folder} ({reason}); choose a writable folder (for the feature cache: set "
                "PRH_STITCH_CACHE to one)")
    if isinstance(exc, pickle.UnpicklingError):
        return (f"refusing to load a file that is not a checkpoint of plain tensors and data ({_first_line(exc)}); "
                "prh_stitch never unpickles arbitrary objects: pass a checkpoint that train.py wrote")
    if isinstance(exc, RuntimeError):
        text = _first_line(exc)
        if text.startswith("Error(s) in loading state_dict"):
            return (f"the checkpoint's weights do not fit this model ({state_dict_problem(exc)}); resume or "
                    "evaluate with the model options it was trained with")
        if "value cannot be converted to type" in text:
            return (f"a number overflowed its type ({text}): a setting is too large for float32 arithmetic, most "
                    "likely the learning rate (--model.lr); lower it")
    return None


def _in_cache(folder: str) -> bool:
    from prh_stitch.data.store_entry import default_cache_dir

    return Path(folder).is_relative_to(default_cache_dir().absolute())


def _existing_folder(filename: Any) -> str:
    path = Path(os.fsdecode(filename)).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return str(path if path.is_dir() else path.parent)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0].rstrip(":. ") if text else type(exc).__name__


def state_dict_problem(exc: BaseException) -> str:
    """The first concrete line of torch's multi-line ``load_state_dict`` error (a missing key, a size mismatch);
    the first line of any other error."""
    lines = [line.strip().rstrip(".") for line in str(exc).splitlines()[1:] if line.strip()]
    return lines[0][:300] if lines else _first_line(exc)
