"""Report folders are replaced as a whole: an interrupted report leaves the previous one intact, nothing behind."""

import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from prh_stitch import reports
from prh_stitch.atomic import REPORT_MARKER, atomic_folder
from prh_stitch.cli.evaluate import main
from prh_stitch.errors import UserError
from prh_stitch.layer_stitch.sweep import SweepReport, write_sweep_report

from test_evaluate import FAST, write_scene_shards


def snapshot(folder: Path):
    """Every file under ``folder`` with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def siblings(folder: Path):
    """Whatever else lies next to ``folder`` under a name derived from it (temporary or set-aside copies)."""
    return sorted(p.name for p in folder.parent.iterdir() if p.name != folder.name and folder.name in p.name)


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_an_exception_midway_keeps_the_old_folder_and_leaves_nothing_behind(tmp_path):
    out = tmp_path / "report"
    with atomic_folder(out) as folder:
        (folder / "a.json").write_text("old")
    before = snapshot(out)
    with pytest.raises(RuntimeError, match="midway"):
        with atomic_folder(out) as folder:
            (folder / "a.json").write_text("new")
            (folder / "b.png").write_bytes(b"half")
            raise RuntimeError("midway")
    assert snapshot(out) == before and siblings(out) == []


def test_a_completed_write_replaces_the_old_folder_whole(tmp_path):
    out = tmp_path / "report"
    with atomic_folder(out) as folder:
        (folder / "a.json").write_text("old")
        (folder / "only_old.png").write_bytes(b"x")
    with atomic_folder(out) as folder:
        assert (out / "a.json").read_text() == "old"  # the old report is in place while the new one is written
        (folder / "a.json").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == [REPORT_MARKER, "a.json"] and (out / "a.json").read_text() == "new"
    assert siblings(out) == []


def test_a_folder_that_is_not_a_report_is_never_replaced(tmp_path):
    run = tmp_path / "runs"
    run.mkdir()
    (run / "last.ckpt").write_bytes(b"weights")
    with pytest.raises(UserError, match="not a prh_stitch report.*new or empty folder"):
        with atomic_folder(run):
            pass
    assert snapshot(run) == {"last.ckpt": b"weights"} and siblings(run) == []
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        with atomic_folder(tmp_path / "file"):
            pass
    empty = tmp_path / "empty"
    empty.mkdir()
    with atomic_folder(empty) as folder:
        (folder / "r.json").write_text("{}")
    assert (empty / "r.json").exists()


def test_leftovers_of_a_killed_writer_are_cleaned_and_a_set_aside_report_comes_back(tmp_path):
    out = tmp_path / "report"
    with atomic_folder(out) as folder:
        (folder / "a.json").write_text("old")
    before = snapshot(out)
    pid = dead_pid()
    # What kill -9 between "set the old report aside" and "rename the new one in" leaves: no report, two siblings.
    out.rename(tmp_path / f".report.old-{pid}-abc")
    (tmp_path / f".report.tmp-{pid}-def").mkdir()
    (tmp_path / f".report.tmp-{pid}-def" / "a.json").write_text("new, half written")
    with pytest.raises(KeyboardInterrupt):
        with atomic_folder(out):
            raise KeyboardInterrupt
    assert snapshot(out) == before and siblings(out) == []
    # A live writer's temporary folder (this process's parent) is left alone.
    live = tmp_path / f".report.tmp-{os.getppid()}-ghi"
    live.mkdir()
    with atomic_folder(out) as folder:
        (folder / "a.json").write_text("new")
    assert (out / "a.json").read_text() == "new" and siblings(out) == [live.name]


def test_report_files_and_folders_follow_the_umask(tmp_path):
    previous = os.umask(0o027)
    try:
        with atomic_folder(tmp_path / "report") as folder:
            reports.write_json(folder / "r.json", {"a": 1})
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "report").stat().st_mode) == 0o750
    assert stat.S_IMODE((tmp_path / "report" / "r.json").stat().st_mode) == 0o640


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_scene_shards(tmp_path_factory.mktemp("scenes"), 96)


def test_sigint_while_an_align_report_is_written_keeps_the_previous_report(data, tmp_path, monkeypatch):
    out = tmp_path / "align"
    base = ["align", "--vision", "tiny_vit", "--text", "tiny_bert", "--data", data, "--out", str(out), *FAST]
    assert main(base + ["--metrics", "mutual_knn,cka", "--k", "10"]) == 0
    before = snapshot(out)
    assert json.loads(before["alignment.json"])["settings"]["k"] == 10

    # A real SIGINT, delivered after the rerun (k = 5) has written its second figure.
    save_figure, written = reports.save_figure, []

    def save_then_interrupt(figure, path, *board_and_tag):
        written.append(save_figure(figure, path, *board_and_tag))
        if len(written) == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return written[-1]

    monkeypatch.setattr(reports, "save_figure", save_then_interrupt)
    # Python's own SIGINT handler, whatever this process inherited: a shell starts background jobs with SIGINT
    # ignored, and Python then leaves it ignored (the SIGINT would be lost and the test would fail).
    previous_handler = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            main(base + ["--metrics", "mutual_knn", "--k", "5"])
    finally:
        signal.signal(signal.SIGINT, previous_handler)
    assert len(written) == 2 and all(not p.exists() for p in written)  # the new figures went to the temporary folder
    assert snapshot(out) == before and siblings(out) == []

    monkeypatch.setattr(reports, "save_figure", save_figure)
    assert main(base + ["--metrics", "mutual_knn", "--k", "5"]) == 0
    after = json.loads((out / "alignment.json").read_text())
    assert after["settings"]["k"] == 5
    assert not list(out.glob("*cka*"))  # the old report's figures went with it
    assert sorted(p.name for p in out.glob("*.png")) == sorted(after["figures"]) and siblings(out) == []


def test_a_stitch_report_and_its_tensorboard_folder_inside_it_are_replaced_together(tmp_path):
    from prh_stitch.evaluation.stitch import StitchResult

    report = {"source": {"name": "a", "layer_name": "l"}, "target": {"name": "b", "layer_name": "l"}, "n": 4,
              "unique_captions": 4, "config": {"method": {"kind": "baseline"}}, "device": "cpu", "seed": 0,
              "retrieval": {f"{d}/{k}": 1.0 for d in ("a2b", "b2a")
                            for k in ("recall@1", "recall@5", "recall@10", "mean_rank", "median_rank")}
              | {"mean_cosine": 1.0}, "alignment": {}}
    out = tmp_path / "stitch"
    StitchResult(dict(report)).write(out, out / "tensorboard")
    assert list((out / "tensorboard").glob("events.out.tfevents.*")) and siblings(out) == []
    assert json.loads((out / "stitch.json").read_text())["tensorboard"] == str(out / "tensorboard")


def test_a_sweep_report_is_replaced_whole(tmp_path):
    sweep = SweepReport("a", "b", "soft", "agreement with B", ["l1"], ["m1", "m2"], 1.0, [[0.5, 0.6]],
                        [[0.5, 0.4]], [[0.5, 0.6]], epochs=1)
    out = tmp_path / "sweep"
    paths = write_sweep_report(sweep, out)
    assert all(p.exists() and p.parent == out for p in paths.values())
    first = snapshot(out)
    sweep.penalty = [[0.1, 0.2]]
    write_sweep_report(sweep, out)
    assert json.loads((out / "penalty.json").read_text())["penalty"] == [[0.1, 0.2]]
    assert snapshot(out)["penalty.png"] != first["penalty.png"] and siblings(out) == []
