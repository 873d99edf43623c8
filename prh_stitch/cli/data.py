"""``python -m prh_stitch.data write|check|extract|verify|cache|prune`` (``prh-data``): argument parsing and nothing else.

    python -m prh_stitch.data write --source scenes --out data/scenes --n 10000 --val-fraction 0.1
    python -m prh_stitch.data write --source folder --captions pairs.csv --out data/mine
    python -m prh_stitch.data write --source fashion_mnist --split test --out data/fmnist --val-fraction 0
    python -m prh_stitch.data check "data/scenes/train-{000000..000009}.tar"
    python -m prh_stitch.data extract --encoder efficientnet_lite0 --layers -1 3 \
        --data "data/scenes/train-{000000..000009}.tar" --out ~/.cache/prh_stitch/features --workers 2
    python -m prh_stitch.data verify --repair
    python -m prh_stitch.data cache
    python -m prh_stitch.data prune --unused-days 30 --dry-run
    python -m prh_stitch.data prune --max-gb 20

Each subcommand prints one JSON object: the written series (:func:`~prh_stitch.data.commands.write_shards`),
the scan report (:func:`~prh_stitch.data.commands.check_shards`), the feature-store entry
(:func:`~prh_stitch.data.commands.extract_features`), the store check
(:func:`~prh_stitch.data.commands.verify_store`), the cache's inventory or what pruning deleted
(:mod:`prh_stitch.cache_inventory`); ``SUBCOMMAND --help`` lists the options, ``--config FILE``
reads them from YAML and ``--print_config`` prints one. Exit status: 0 success (``check``: some good samples,
skips allowed; ``verify``: no damaged entry left), 1 a finding (``check``: no good sample or repeated keys;
``verify``: damaged entries, not repaired), 2 bad input, printed as one line ``python -m prh_stitch.data: error:
...``, never a traceback.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import List, Optional, Sequence

from prh_stitch.cli.common import argv_of, option_kinds, run_command, standard_spelling, with_shipped_configs

PROG = "python -m prh_stitch.data"


def _subparser(description: str):
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(description=description, exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile, help="options from a YAML file (--print_config writes one)")
    return parser


def build_parser():
    """The parser of every subcommand; write's and extract's options are the library functions' signatures."""
    from jsonargparse import ArgumentParser

    from prh_stitch.cache_inventory import cache_inventory, prune_cache
    from prh_stitch.data.commands import extract_features, verify_store, write_shards
    from prh_stitch.data.sources import SOURCES

    parser = ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0], exit_on_error=False)
    commands = parser.add_subcommands(dest="command")
    write = _subparser(f"Write paired image-caption shards from a source ({', '.join(SOURCES.names())}).")
    write.add_function_arguments(write_shards, None)
    commands.add_subcommand("write", write, help="write paired image-caption shards from a source")
    check = _subparser("Read every sample of some shards and report counts and skips.")
    check.add_argument("pattern", type=str, help="shard pattern: brace range, glob, folder, list, pipe: URL")
    commands.add_subcommand("check", check, help="read every sample of some shards and report counts and skips")
    extract = _subparser("Extract an encoder's features of some shards into the feature store.")
    extract.add_function_arguments(extract_features, None)
    commands.add_subcommand("extract", extract,
                            help="extract an encoder's features of some shards into the feature store")
    verify = _subparser("Check every entry of the feature store against its recorded hashes.")
    verify.add_function_arguments(verify_store, None)
    commands.add_subcommand("verify", verify, help="check every feature store entry against its recorded hashes")
    cache = _subparser("List what the cache holds: bytes per folder, feature store entries and their last use.")
    cache.add_function_arguments(cache_inventory, None)
    commands.add_subcommand("cache", cache, help="list what the cache holds and when each entry was last used")
    prune = _subparser("Delete feature store entries, scores and figures not used for some days, or the least "
                       "recently used until the cache fits a size (computed again when next needed).")
    prune.add_function_arguments(prune_cache, None)
    commands.add_subcommand("prune", prune,
                            help="delete cached features, scores and figures not used for N days, or down to a size")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``python -m prh_stitch.data`` / ``prh-data``; returns the exit status."""
    from prh_stitch.cache_inventory import cache_inventory, prune_cache
    from prh_stitch.data.commands import extract_features, verify_store, write_shards

    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(levelname)s: %(message)s")
    kinds = option_kinds(write_shards, extract_features, verify_store, cache_inventory, prune_cache)
    args = [_listed(arg) for arg in argv_of(argv)]
    return run_command(PROG, lambda: _run(with_shipped_configs(standard_spelling(args, kinds))))


def _listed(arg: str) -> str:
    """``--layers=-1`` (argparse's nargs spelling) as ``--layers=[-1]``, the list jsonargparse expects."""
    name, eq, value = arg.partition("=")
    return f"{name}=[{value}]" if eq and name == "--layers" and not value.startswith("[") else arg


def _run(args: List[str]) -> int:
    from prh_stitch.cache_inventory import cache_inventory, prune_cache
    from prh_stitch.data.commands import check_failure_line, check_shards, extract_features, verify_store, write_shards

    namespace = build_parser().parse_args(args)
    command = namespace.command
    options = namespace[command].as_dict()
    options.pop("config", None)
    try:
        if command == "check":
            report = check_shards(options["pattern"])
            print(json.dumps(report, sort_keys=True))
            failure = check_failure_line(options["pattern"], report)
            if failure:
                print(f"error: {failure}", file=sys.stderr)  # a finding, not bad input: exit status 1
                return 1
            return 0
        if command == "verify":
            report = verify_store(**options)
            print(json.dumps(report))
            left = [d for d in report["damaged"] if d["entry"] not in report["repaired"]]
            if left:
                print(f"error: {len(left)} damaged feature store entr{'y' if len(left) == 1 else 'ies'} in "
                      f"{report['root']} (e.g. {left[0]['entry']}: {left[0]['problem']}); delete them with: "
                      f"{PROG} verify --repair --out {report['root']}", file=sys.stderr)
                return 1
            return 0
        run = {"write": write_shards, "extract": extract_features, "cache": cache_inventory, "prune": prune_cache}
        print(json.dumps(run[command](**options)))
        return 0
    except OSError as exc:  # a file the system refused (permissions, a full disk): the user's to fix, one line
        if isinstance(exc, FileNotFoundError):
            raise
        raise ValueError(str(exc).replace("\n", " ")) from exc
