"""The README's notebook session, run as written on tiny models: plain-Python entry points that return data."""

import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def notebook_session():
    """The python block of the README's Evaluation section (the notebook session)."""
    text = (REPO / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    (session,) = [b for b in blocks if "prh_stitch.align(" in b]
    return session


def test_the_readme_notebook_session_runs_and_returns_data(tmp_path, monkeypatch):
    import matplotlib

    session = notebook_session()
    assert len([line for line in session.splitlines() if line.strip()]) <= 7
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PRH_STITCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(sys, "argv", ["jupyter-kernel", "--no-such-option", "-f", "kernel.json"])  # never read
    matplotlib.use("svg")  # a notebook's own backend: drawing the report figures must leave it alone
    names = {}
    exec(compile(session, "README.md", "exec"), names)
    assert matplotlib.get_backend() == "svg"

    aligned = names["aligned"]
    assert [(r["model_a"], r["model_b"], r["metric"]) for r in aligned.records] == [
        ("tiny_vit", "tiny_bert", "mutual_knn"), ("tiny_resnet", "tiny_bert", "mutual_knn")]
    table = aligned.table
    assert len(table) == 4 and all(set(row) == set(aligned.columns) for row in table)
    for record, best, last in zip(aligned.records, table[0::2], table[1::2]):
        assert (best["pair"], best["score"], best["layer_a_name"]) == ("best (max over layer pairs)", record["score"],
                                                                       record["layer_a_name"])
        assert (last["pair"], last["score"], last["ci_low"]) == ("last layers", record["last"]["score"],
                                                                 record["last"]["ci_low"])
        assert best["n"] == 128 and record["options"] == {"k": 5}
    assert not list(tmp_path.glob("*.json")), "align wrote files without being asked"

    report = names["stitched"].report
    assert report["config"]["method"]["name"] == "relative" and report["n"] == 128
    assert 0.0 <= report["retrieval"]["a2b/recall@1"] <= 1.0 and set(report["alignment"]) == {"mutual_knn", "cka",
                                                                                                "cknna"}
    summary = names["summary"]
    assert [d["name"] for d in summary["datasets"]] == ["scenes"] and summary["settings"]["k"] == 5
    assert (tmp_path / "runs" / "study" / "study.json").is_file()
    # The study's records are align's records: same features, same settings, same scores.
    study_records = __import__("json").loads((tmp_path / "runs" / "study" / "scenes" / "alignment.json").read_text())
    assert [r["score"] for r in study_records["records"]] == [r["score"] for r in aligned.records]


def test_bad_input_is_a_user_error_in_python_too():
    import prh_stitch
    from prh_stitch.errors import UserError

    with pytest.raises(UserError, match="unknown modality"):
        prh_stitch.align({"audio": ["x"]}, "x-*.tar")
    with pytest.raises(ValueError, match="unknown metric 'mutal_knn'"):
        prh_stitch.align({"vision": ["tiny_vit"], "text": ["tiny_bert"]}, "x-*.tar", metrics=["mutal_knn"])
    with pytest.raises(UserError, match="exactly one of --ckpt"):
        prh_stitch.evaluate_stitcher("x-*.tar")
