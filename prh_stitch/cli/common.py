"""What every command shares: the one user-error wrapper, shipped configs by name, and option spellings.

Commands are thin: they parse options (jsonargparse, which LightningCLI is built on) and call the library.
"""

from __future__ import annotations

import collections.abc
import inspect
import os
import sys
import typing
from typing import Callable, Dict, List, Optional, Sequence

from prh_stitch.configs import shipped_config
from prh_stitch.errors import USER_ERRORS, parser_error_line, user_message


def run_command(prog: str, body: Callable[[], int], parser_exits: bool = False) -> int:
    """Run a command's body; an error meant for the user is one line ``PROG: error: ...`` and exit status 2.

    Meant for the user: ``USER_ERRORS`` (prh_stitch's own checks) and what :func:`~prh_stitch.errors.user_message`
    recognises (a read-only cache, an unsafe checkpoint, weights that do not fit, a float32 overflow).

    ``PRH_STITCH_DEBUG=1`` keeps the traceback instead. A parser's own exit (``--help``, ``--print_config``, a
    rejected option) returns its status, or, with ``parser_exits`` (LightningCLI's way), exits.
    """
    from argparse import ArgumentError

    try:
        return body()
    except SystemExit as exc:
        if parser_exits:
            raise
        return int(exc.code or 0) if not isinstance(exc.code, str) else 2
    except ArgumentError as exc:
        return user_error(prog, parser_error_line(str(exc)))
    except USER_ERRORS as exc:
        if os.environ.get("PRH_STITCH_DEBUG"):
            raise
        while isinstance(exc.__cause__, USER_ERRORS):  # a constructor's error that jsonargparse wrapped: the original
            exc = exc.__cause__
        text = str(exc).strip()
        return user_error(prog, text.splitlines()[0] if text else type(exc).__name__)
    except Exception as exc:  # the platform's or torch's errors that are the user's setup, not a bug: one line too
        message = next((m for m in map(user_message, _chain(exc)) if m), None)
        if message is None or os.environ.get("PRH_STITCH_DEBUG"):
            raise
        return user_error(prog, message)


def _chain(exc: BaseException) -> List[BaseException]:
    """``exc`` and the exceptions it was raised from or while handling (a wrapper's original error)."""
    chain: List[BaseException] = []
    while exc is not None and exc not in chain:
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    return chain


def user_error(prog: str, message: str) -> int:
    print(f"{prog}: error: {message}", file=sys.stderr)
    return 2


def with_shipped_configs(argv: Sequence[str]) -> List[str]:
    """Every ``--config NAME`` / ``--config=NAME`` of ``argv`` with shipped names resolved to their files."""
    out: List[str] = []
    args = list(argv)
    for i, arg in enumerate(args):
        if arg.startswith("--config="):
            arg = "--config=" + str(shipped_config(arg.split("=", 1)[1]))
        elif i > 0 and args[i - 1] == "--config":
            arg = str(shipped_config(arg))
        out.append(arg)
    return out


def argv_of(argv: Optional[Sequence[str]]) -> List[str]:
    return list(sys.argv[1:] if argv is None else argv)


def option_kinds(*signatures: Callable) -> Dict[str, str]:
    """``{option: "bool" | "list" | "value"}`` of the parameters of functions and dataclasses."""
    kinds: Dict[str, str] = {}
    for obj in signatures:
        hints = typing.get_type_hints(obj)
        for name in inspect.signature(obj).parameters:
            hint = hints.get(name)
            members = typing.get_args(hint) if typing.get_origin(hint) is typing.Union else ()
            if len(members) == 2 and type(None) in members:  # Optional[X] is spelled as X
                hint = next(a for a in members if a is not type(None))
            origin = typing.get_origin(hint)
            if hint is bool:
                kinds[name] = "bool"
            elif origin in (list, tuple, collections.abc.Sequence) or hint in (list, tuple):
                kinds[name] = "list"
            else:
                kinds[name] = "value"
    return kinds


def standard_spelling(argv: Sequence[str], kinds: Dict[str, str]) -> List[str]:
    """Options as jsonargparse spells them, so the classic spellings keep working beside the new ones.

    ``--max-null`` is ``--max_null``; a bare boolean flag (``--progress``) is ``--progress true`` and ``--no-progress``
    is ``--progress false``; a list option followed by several values (``--layers-a a b``) is ``--layers_a [a, b]``.
    """
    out: List[str] = []
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if not arg.startswith("--") or arg == "--":
            out.append(arg)
            continue
        name, eq, value = arg[2:].partition("=")
        name = name.replace("-", "_")
        bare = not eq and (i == len(args) or args[i].startswith("--"))
        if bare and name.startswith("no_") and kinds.get(name[3:]) == "bool" and name not in kinds:
            out += [f"--{name[3:]}", "false"]
        elif bare and kinds.get(name) == "bool":
            out += [f"--{name}", "true"]
        elif not eq and kinds.get(name) == "list" and i < len(args) and not args[i].startswith(("--", "[")):
            values = []
            while i < len(args) and not args[i].startswith("--"):
                values.append(args[i])
                i += 1
            out += [f"--{name}", "[" + ", ".join(values) + "]"]
        else:
            out.append(f"--{name}{eq}{value}")
    return out
