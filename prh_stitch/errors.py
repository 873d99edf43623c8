"""The one kind of error meant for the user, and the exceptions every command turns into one line.

Library functions raise :class:`UserError` (a ``ValueError``) for bad input; the commands in
:mod:`prh_stitch.cli` print any error of ``USER_ERRORS`` as ``PROG: error: MESSAGE`` and exit with status 2,
while anything else keeps its traceback.
"""

from __future__ import annotations


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
