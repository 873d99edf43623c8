"""Mutation testing of one or more prh_stitch modules with mutmut: prints the kill rate and the survivors.

    python tools/mutation.py prh_stitch/metrics/retrieval.py --tests tests/test_metrics_reference.py
    python tools/mutation.py prh_stitch/losses.py --tests tests/test_losses.py --max-children 2 --min-rate 0.9

Each run works in a private copy of the package and the tests (``.mutation/<name>/``, git-ignored), so the
working tree is never modified and several runs can go on side by side. mutmut runs only the selected tests that
cover each mutated function (it records coverage per test first), in processes forked from a warm fork server, so
torch is imported once per run rather than once per mutant.

Equivalent mutants (a change no test can observe, e.g. a mutation of a message string or of an argument
whose value does not change the result) are listed with a reason in ``tools/mutation_equivalents.toml``:

    [[equivalent]]
    mutant = "prh_stitch.metrics.retrieval.x_recall_at__mutmut_7"
    mutated = 'if k >= n:'        # the mutated line as mutmut shows it ('+' line of the diff, stripped)
    reason = "k == n gives the same recall either way: every item is within the top n"

An entry applies only while the named mutant still makes that change, so a renumbering after an edit cannot
silently hide a new survivor; stale entries are reported. The kill rate is killed / (mutants - equivalents);
mutants no selected test reaches and timeouts are counted as they are (no tests: survivors; timeout: killed).

On a busy machine a module's full run can take hours; ``--only`` runs and reports a subset chosen by glob on the
mutant names, e.g. a systematic 20 % sample (every mutant whose number ends in 0 or 5, in every function):

    python tools/mutation.py prh_stitch/metrics/kernels.py --tests tests/test_kernels_exact.py \
        --only '*__mutmut_*0' '*__mutmut_*5' --keep

mutmut stops a mutant's tests after (estimated test time + 1 s) x 15 x 2 CPU seconds and counts it as killed; the
estimate leaves out module-scoped fixtures (a whole training run), so for tests with heavy fixtures pass e.g.
``--timeout-multiplier 200``, or timeouts count as kills that no mutation caused.

With ``--keep`` a run resumes: mutants already killed are not run again (survivors and unchecked ones are, since a
test may have been added since). mutmut itself forgets every verdict when the test selection changes; when the new
``--tests`` include all of the previous run's, this script puts the earlier kills back for functions whose code is
unchanged (a test added to the selection cannot revive a killed mutant). With a smaller or different selection the
earlier kills are dropped and everything runs again. The kills of the last finished run are kept in
``.mutation/<name>/kills.json``, so a run that fails (e.g. a selected test fails in mutmut's stats pass: mutmut's
trampolines add a stack frame, so a test of a warning's ``stacklevel`` cannot run under it) loses nothing.
Limitation: an earlier kill counts as decided while mutmut's stored hash of its function matches; after editing a
function, its earlier kills are not rerun but reported as "not run" (the function's hash changed), never as kills.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List

REPO = Path(__file__).resolve().parents[1]
EQUIVALENTS = REPO / "tools" / "mutation_equivalents.toml"
KILLED = {"killed", "timeout", "caught by type check"}
KILLS_FILE = "kills.json"  # in the work copy: the last finished run's kills, for --keep


@dataclass
class ModuleResult:
    path: str
    status: Dict[str, str] = field(default_factory=dict)  # mutant -> mutmut's status word
    diffs: Dict[str, str] = field(default_factory=dict)  # surviving mutant -> its diff
    equivalent: Dict[str, str] = field(default_factory=dict)  # mutant -> reason

    @property
    def counted(self) -> List[str]:
        return [m for m in self.status if m not in self.equivalent]

    @property
    def killed(self) -> int:
        return sum(self.status[m] in KILLED for m in self.counted)

    @property
    def survivors(self) -> List[str]:
        return [m for m in self.counted if self.status[m] not in KILLED]

    @property
    def unchecked(self) -> int:
        """Mutants mutmut never ran (an interrupted run): they count as survivors until a run checks them."""
        return sum(self.status[m] == "not checked" for m in self.counted)

    @property
    def rate(self) -> float:
        return self.killed / len(self.counted) if self.counted else 1.0


def _slug(paths: List[str]) -> str:
    return "+".join(Path(p).with_suffix("").as_posix().replace("/", ".") for p in paths)[:120]


def _prepare(workdir: Path, modules: List[str], tests: List[str], keep: bool, timeout_multiplier: float) -> None:
    """A fresh copy of the package and tests, with mutmut's settings for this run in its pyproject.toml."""
    if workdir.exists() and not keep:
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    for name in ("prh_stitch", "tests"):
        if (workdir / name).exists():
            shutil.rmtree(workdir / name)
        shutil.copytree(REPO / name, workdir / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    settings = {
        "source_paths": ["prh_stitch"],
        "only_mutate": modules,
        "pytest_add_cli_args_test_selection": tests,
        "pytest_add_cli_args": ["-q", "-p", "no:cacheprovider", "-x"],
        # torch is not fork-safe after it has started threads: fork workers from a clean server process.
        "process_isolation": "forkserver",
        # mutmut kills a mutant's tests after (estimated test time + 1 s) x multiplier x 2 seconds of CPU time and
        # counts it as killed ("timeout"). A module-scoped fixture (a whole training run) is not part of the
        # estimate, so a test that needs it can be cut off without any mutation at work: raise the multiplier.
        "timeout_multiplier": timeout_multiplier,
    }
    lines = [(REPO / "pyproject.toml").read_text(), "", "[tool.mutmut]"]
    lines += [f"{key} = {_toml(value)}" for key, value in settings.items()]
    (workdir / "pyproject.toml").write_text("\n".join(lines) + "\n")


def _toml(value) -> str:
    if isinstance(value, (int, float)):
        return repr(float(value))
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def _mutated_line(diff: str) -> str:
    added = [line[1:].strip() for line in diff.splitlines() if line.startswith("+") and not line.startswith("+++")]
    return " / ".join(added)


def _load_equivalents() -> Dict[str, Dict[str, str]]:
    if not EQUIVALENTS.exists():
        return {}
    data = tomllib.loads(EQUIVALENTS.read_text())
    return {entry["mutant"]: entry for entry in data.get("equivalent", [])}


def _selected(mutant: str, only: List[str] | None) -> bool:
    return not only or any(fnmatch.fnmatch(mutant, pattern) for pattern in only)


@dataclass
class _Previous:
    """What an earlier run in the work copy decided: its test selection and, per module, its kills and the hashes
    of the functions they were decided on."""

    tests: List[str] = field(default_factory=list)
    kills: Dict[str, Dict[str, int]] = field(default_factory=dict)  # module -> mutant -> exit code (killed only)
    hashes: Dict[str, Dict[str, str]] = field(default_factory=dict)  # module -> mangled function -> hash


def _previous_run(workdir: Path, modules: List[str]) -> _Previous:
    """The kills of the last run that finished (saved in ``kills.json``; mutmut's own files lose them when a run
    fails after mutmut reset its verdicts), else what mutmut's files hold."""
    from mutmut.stats import status_by_exit_code

    previous = _Previous()
    saved = workdir / KILLS_FILE
    if saved.exists():
        data = json.loads(saved.read_text())
        previous.tests = data["tests"]
        previous.kills = {m: data["kills"].get(m, {}) for m in modules if m in data["kills"]}
        previous.hashes = {m: data["hashes"].get(m, {}) for m in modules if m in data["hashes"]}
        return previous
    settings = workdir / "pyproject.toml"
    if settings.exists():
        previous.tests = tomllib.loads(settings.read_text()).get("tool", {}).get("mutmut", {}).get(
            "pytest_add_cli_args_test_selection", [])
    for module in modules:
        meta = workdir / "mutants" / (module + ".meta")
        if meta.exists():
            data = json.loads(meta.read_text())
            previous.kills[module] = {m: c for m, c in data["exit_code_by_key"].items()
                                      if c is not None and status_by_exit_code[c] == "killed"}
            previous.hashes[module] = data.get("hash_by_function_name", {})
    return previous


def _save_kills(workdir: Path, modules: List[str], tests: List[str]) -> None:
    """Record this finished run's kills (with the function hashes they were decided on) for the next ``--keep``."""
    from mutmut.stats import status_by_exit_code

    saved = workdir / KILLS_FILE
    data = json.loads(saved.read_text()) if saved.exists() else {"kills": {}, "hashes": {}}
    data["tests"] = tests
    for module in modules:
        meta = json.loads((workdir / "mutants" / (module + ".meta")).read_text())
        data["kills"][module] = {m: c for m, c in meta["exit_code_by_key"].items()
                                 if c is not None and status_by_exit_code[c] == "killed"}
        data["hashes"][module] = meta.get("hash_by_function_name", {})
    saved.write_text(json.dumps(data, indent=1))


def _function_of(module: str, mutant: str) -> str:
    return mutant[len(Path(module).with_suffix("").as_posix().replace("/", ".") + "."):].rsplit("__mutmut_", 1)[0]


def _restore_kills(workdir: Path, modules: List[str], previous: _Previous) -> int:
    """Put back the earlier kills that mutmut reset because the test selection grew: only for mutants left unchecked
    by this run whose function's code (mutmut's per-function hash) is unchanged. Returns how many."""
    restored = 0
    for module in modules:
        meta = workdir / "mutants" / (module + ".meta")
        if not meta.exists() or module not in previous.kills:
            continue
        data = json.loads(meta.read_text())
        old_hashes, new_hashes = previous.hashes.get(module, {}), data.get("hash_by_function_name", {})
        for mutant, code in previous.kills[module].items():
            function = _function_of(module, mutant)
            if (data["exit_code_by_key"].get(mutant, 0) is None and function in new_hashes
                    and old_hashes.get(function) == new_hashes[function]):
                data["exit_code_by_key"][mutant] = code
                restored += 1
        meta.write_text(json.dumps(data, indent=4))
    return restored


def _pending_after(workdir: Path, modules: List[str], only: List[str], previous: _Previous) -> List[str] | None:
    """The selected mutants to run when earlier kills stand: those neither killed in mutmut's files nor among the
    earlier kills of an unchanged function (hashes as mutmut recorded them when it generated the mutants)."""
    pending = _pending(workdir, modules, only)
    if pending is None:
        return None
    current = {m: json.loads((workdir / "mutants" / (m + ".meta")).read_text()).get("hash_by_function_name", {})
               for m in modules}
    killed = {mutant for module in modules for mutant in previous.kills.get(module, {})
              if previous.hashes.get(module, {}).get(_function_of(module, mutant))
              == current[module].get(_function_of(module, mutant))}
    equivalent = set(_load_equivalents())  # already judged: rerunning a survivor no test can kill only costs time
    return [mutant for mutant in pending if mutant not in killed and mutant not in equivalent]


def _pending(workdir: Path, modules: List[str], only: List[str]) -> List[str] | None:
    """Names of the selected mutants to run: those not killed yet (unchecked, or survivors that a new test may now
    kill); None before mutmut has generated any."""
    from mutmut.stats import status_by_exit_code

    names, pending = [], []
    for module in modules:
        meta = workdir / "mutants" / (module + ".meta")
        if not meta.exists():
            return None
        for mutant, code in json.loads(meta.read_text())["exit_code_by_key"].items():
            if _selected(mutant, only):
                names.append(mutant)
                if code is None or status_by_exit_code[code] not in KILLED:
                    pending.append(mutant)
    return pending if names else None


def _collect(workdir: Path, modules: List[str], only: List[str] | None = None) -> List[ModuleResult]:
    """Read mutmut's per-file results (run inside the work copy, where mutmut keeps them)."""
    previous = os.getcwd()
    os.chdir(workdir)
    try:
        from mutmut.mutation.data import SourceFileMutationData
        from mutmut.mutation.diff_apply import get_diff_for_mutant
        from mutmut.stats import status_by_exit_code

        equivalents = _load_equivalents()
        results = []
        for module in modules:
            data = SourceFileMutationData(path=Path(module))
            data.load()
            result = ModuleResult(module)
            for mutant, code in data.exit_code_by_key.items():
                if not _selected(mutant, only):
                    continue
                result.status[mutant] = status_by_exit_code[code]
                if result.status[mutant] in KILLED:
                    continue
                diff = get_diff_for_mutant(mutant, path=Path(module))
                result.diffs[mutant] = diff
                entry = equivalents.get(mutant)
                if entry and entry.get("mutated", "").strip() == _mutated_line(diff):
                    result.equivalent[mutant] = entry.get("reason", "")
                elif entry:
                    print(f"stale equivalent entry (the mutant changed): {mutant}", file=sys.stderr)
            results.append(result)
        return results
    finally:
        os.chdir(previous)


def _report(results: List[ModuleResult], show_equivalent: bool) -> None:
    print("\n| module | mutants | killed | survived | of which not run | equivalent | kill rate |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r.path} | {len(r.status)} | {r.killed} | {len(r.survivors)} | {r.unchecked} | "
              f"{len(r.equivalent)} | {100 * r.rate:.1f} % |")
    for r in results:
        for mutant in r.survivors:
            print(f"\n--- survived ({r.status[mutant]}): {mutant}")
            print("\n".join(line for line in r.diffs[mutant].splitlines()
                            if re.match(r"^[-+](?![-+])", line)))
        if show_equivalent:
            for mutant, reason in r.equivalent.items():
                print(f"\n--- equivalent: {mutant}: {reason}\n    {_mutated_line(r.diffs[mutant])}")


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("modules", nargs="+", help="source files to mutate, e.g. prh_stitch/metrics/knn.py")
    parser.add_argument("--tests", nargs="+", required=True, help="test files (or node ids) that should kill them")
    parser.add_argument("--max-children", type=int, default=1, help="mutants tested at once (default 1)")
    parser.add_argument("--keep", action="store_true",
                        help="reuse the previous run's results for unchanged functions (default: a fresh run)")
    parser.add_argument("--min-rate", type=float, default=None, help="exit 1 if any module's kill rate is below")
    parser.add_argument("--only", nargs="+", default=None, metavar="GLOB",
                        help="run and report only the mutants whose names match one of these globs")
    parser.add_argument("--timeout-multiplier", type=float, default=15.0,
                        help="mutmut's CPU-time limit factor (default 15; raise it for tests with heavy fixtures)")
    parser.add_argument("--show-equivalent", action="store_true", help="also list the excluded equivalent mutants")
    args = parser.parse_args(argv)

    for path in args.modules + [t.split("::")[0] for t in args.tests]:
        if not (REPO / path).exists():
            parser.error(f"no such file: {path} (paths are relative to the repository root)")
    workdir = REPO / ".mutation" / _slug(args.modules)
    previous = _previous_run(workdir, args.modules) if args.keep else _Previous()
    # mutmut forgets all verdicts when the selection changes; kills stand only if no earlier test was dropped.
    keep_kills = args.keep and bool(previous.kills) and set(previous.tests) <= set(args.tests)
    _prepare(workdir, args.modules, args.tests, args.keep, args.timeout_multiplier)
    mutmut = [sys.executable, "-m", "mutmut", "run", "--max-children", str(args.max_children)]
    if args.only or keep_kills:
        if keep_kills:
            pending = _pending_after(workdir, args.modules, args.only or ["*"], previous)
        else:
            pending = _pending(workdir, args.modules, args.only) if args.keep else None
        mutmut += (args.only or []) if pending is None else pending
        if pending == []:
            mutmut = []  # every selected mutant already has a result
    # One thread per test process: the CPU-time limit counts every thread, and a shared machine gains nothing from
    # torch spinning up one thread per core in each forked worker.
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH="")
    env.setdefault("OMP_NUM_THREADS", "1")
    log = workdir / "mutmut.log"
    print(f"mutmut running in {workdir} (progress: tail -f {log})", flush=True)
    with open(log, "w") as handle:
        code = 0 if not mutmut else subprocess.run(mutmut, cwd=workdir, env=env, stdout=handle,
                                                   stderr=subprocess.STDOUT).returncode
    if code != 0:
        print(log.read_text(errors="replace")[-3000:], file=sys.stderr)
        print(f"mutation.py: error: mutmut exited {code} (log: {log})", file=sys.stderr)
        return 2
    if keep_kills:
        restored = _restore_kills(workdir, args.modules, previous)
        if restored:
            print(f"kept {restored} kills of the previous run (its tests are all in this selection)", flush=True)
    _save_kills(workdir, args.modules, args.tests)
    results = _collect(workdir, args.modules, args.only)
    _report(results, args.show_equivalent)
    if args.min_rate is not None and any(r.rate < args.min_rate for r in results):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
