"""The align report: long-form tables, markdown, model × model and layer × layer figures (PNG and PDF), the same in
TensorBoard (``tensorboard/``), one JSON index."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence


from prh_stitch import reports
from prh_stitch.figure_cache import Drawing
from prh_stitch.alignment.layer_sets import RULE
from prh_stitch.alignment.settings import clamp_note

TABLE_FIELDS = ("model_a", "model_b", "metric", "pair", "score", "layer_a", "layer_b", "layer_a_name",
                "layer_b_name", "chance", "null_mean", "null_std", "calibrated", "ci_low", "ci_high", "max_null_mean",
                "n", "protocol", "contextual_score", "contextual_layer_a_name", "contextual_layer_b_name")


def long_table(records: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """One row per record and layer choice: the best pair (max over layer pairs) and the last layers.

    The best pair over contextual layers only (see :mod:`~prh_stitch.alignment.layer_sets`) rides along on the
    best row as ``contextual_*`` columns (a score read off the matrix, not calibrated on its own).
    """
    rows = []
    for r in records:
        ctx = r.get("contextual") or {}
        contextual = {"contextual_score": ctx.get("score"), "contextual_layer_a_name": ctx.get("layer_a_name"),
                      "contextual_layer_b_name": ctx.get("layer_b_name")}
        rows.append({**r, **contextual, "pair": "best (max over layer pairs)"})
        rows.append({**r, **r["last"], "pair": "last layers", "max_null_mean": None})
    return [{k: row.get(k) for k in TABLE_FIELDS} for row in rows]


LAYER_TABLE_FIELDS = ("model_a", "model_b", "metric", "layer_a", "layer_b", "layer_a_name", "layer_b_name", "score",
                      "role", "chance", "null_mean", "null_std", "calibrated", "ci_low", "ci_high", "n", "protocol")


def layer_table(records: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """One row per (model pair, metric, layer_a, layer_b): every cell of every layer × layer matrix.

    Chance, permutation null and bootstrap interval were computed for two cells of a matrix only, the best pair
    (``role`` best) and the last layers (``role`` last); the other cells carry their score and leave them empty
    rather than copy numbers that were not computed for them.
    """
    rows = []
    for r in records:
        # Best after last: when they are the same cell, the best pair's calibration is the one reported.
        calibrated = {(r["last"]["layer_a"], r["last"]["layer_b"]): ("last", r["last"]),
                      (r["layer_a"], r["layer_b"]): ("best", r)}
        both = (r["layer_a"], r["layer_b"]) == (r["last"]["layer_a"], r["last"]["layer_b"])
        for i, row in enumerate(r["matrix"]):
            for j, score in enumerate(row):
                role, cal = calibrated.get((i, j), ("", {}))
                rows.append({"model_a": r["model_a"], "model_b": r["model_b"], "metric": r["metric"], "layer_a": i,
                             "layer_b": j, "layer_a_name": r["layers_a"][i], "layer_b_name": r["layers_b"][j],
                             "score": score, "role": "best, last" if both and role else role, "n": r["n"],
                             "protocol": r.get("protocol"),
                             **{k: cal.get(k) for k in ("chance", "null_mean", "null_std", "calibrated", "ci_low",
                                                        "ci_high")}})
    return rows


def alignment_outputs(out: Path, models: Sequence[Any], records: Sequence[Dict], header: Dict[str, Any],
                      title: str) -> Dict[str, Any]:
    """Render alignment.json/.csv/.md and the figures into atomic files under ``out``.

    The JSON (the report's index) is written last, so its presence means the report is complete.
    """
    from prh_stitch.report_board import report_board, tag_part

    labels = [m.label for m in models]
    figures = []
    markdown = alignment_markdown(records, header, title)
    with report_board(out) as board:  # the same figures, the table and the headline scores in TensorBoard
        for metric, recs in _by_metric(records).items():
            figures.append(_model_figure(out, labels, metric, recs, board))
            for r in recs:
                pair = f"{tag_part(r['model_a'])}__{tag_part(r['model_b'])}"
                figure = Drawing(reports.layer_heatmap, (r["matrix"], r["layers_a"], r["layers_b"], r["model_a"],
                                                         r["model_b"], metric, (r["layer_a"], r["layer_b"]),
                                                         r.get("chance")))
                figures.append(reports.save_figure(figure, out / f"layers_{metric}_{_slug(r['model_a'])}__"
                               f"{_slug(r['model_b'])}.png", board, f"layers/{metric}/{pair}").name)
                board.scalar(f"{metric}/best/{pair}", r["score"])
                board.scalar(f"{metric}/last/{pair}", r["last"]["score"])
        board.text("alignment", markdown)
    reports.write_csv(out / "alignment.csv", long_table(records), TABLE_FIELDS)
    reports.write_csv(out / "alignment_layers.csv", layer_table(records), LAYER_TABLE_FIELDS)
    reports.write_text(out / "alignment.md", markdown)
    payload = {**header, "records": list(records), "figures": figures}
    reports.write_json(out / "alignment.json", payload)
    return payload


def _by_metric(records: Sequence[Dict]) -> Dict[str, List[Dict]]:
    by_metric: Dict[str, List[Dict]] = {}
    for r in records:
        by_metric.setdefault(r["metric"], []).append(r)
    return by_metric


def _model_figure(out: Path, labels: List[str], metric: str, recs: List[Dict], board=None) -> str:
    matrix: List[List[Optional[float]]] = [[None] * len(labels) for _ in labels]
    for r in recs:
        i, j = labels.index(r["model_a"]), labels.index(r["model_b"])
        matrix[i][j] = matrix[j][i] = r["score"]
    figure = Drawing(reports.model_heatmap, (labels, matrix, metric, "best layer pair", recs[0].get("chance")))
    return reports.save_figure(figure, out / f"models_{metric}.png", board, f"models/{metric}").name


def alignment_markdown(records: Sequence[Dict], header: Dict[str, Any], title: str) -> str:
    rows = []
    for r in records:
        last = r["last"]
        rows.append([r["model_a"], r["model_b"], r["metric"],
                     f"{r['score']:.3f} ({r['layer_a_name']}, {r['layer_b_name']})",
                     reports.fmt(r.get("max_null_mean"), 3), reports.fmt(r.get("max_calibrated"), 3),
                     contextual_cell(r.get("contextual")), f"{last['score']:.3f}", reports.fmt(last.get("chance"), 3),
                     reports.fmt(last.get("null_mean"), 3),
                     reports.fmt(last.get("calibrated"), 3), reports.interval(last.get("ci_low"), last.get("ci_high"))])
    settings = header.get("settings", {})
    protocol = header.get("protocol") or {"name": settings.get("protocol", "prh_stitch"), "description": ""}
    return (f"# {title}\n\n**Protocol: {protocol['name']}** ({protocol['description']}).\n\n"
            f"N = {records[0]['n'] if records else '–'} paired samples, k = {settings.get('k')}, "
            f"{settings.get('permutations')} permutations, {settings.get('bootstrap')} half-samples per interval, "
            f"seed {settings.get('seed')}, {clamp_note(settings.get('outlier_quantile'), protocol['name'])}, "
            f"device {header.get('device')}.\n\n"
            "**best** is the maximum over all layer pairs (the paper's headline number); because it is a maximum "
            "it sits above chance even for unrelated models, so compare it with *null of max* (the same maximum "
            "with the pairing shuffled). **last** is the last-layer pair, with its chance level, permutation null, "
            "calibrated score (s − null)/(1 − null) and 95% interval "
            f"({records[0]['last'].get('interval_method') if records else '–'}). **contextual best** is the "
            f"best pair with {RULE} (a mean-pooled input embedding is a bag of words, not a contextual "
            "representation).\n\n"
            + reports.markdown_table(["model A", "model B", "metric", "best (layers)", "null of max",
                                      "calibrated max", "contextual best (layers)", "last", "chance", "null",
                                      "calibrated", "95% CI"], rows))


def contextual_cell(best: Optional[Dict[str, Any]]) -> str:
    if not best:
        return "– (no contextual layer)"
    return f"{best['score']:.3f} ({best['layer_a_name']}, {best['layer_b_name']})"


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)
