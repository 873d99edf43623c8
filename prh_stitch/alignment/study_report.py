"""The study's markdown report: protocol and power first, then per dataset the scores, stability and k × N table."""

from __future__ import annotations

from typing import Any, Dict, List, Optional

from prh_stitch import reports
from prh_stitch.alignment.layer_sets import RULE
from prh_stitch.alignment.report import contextual_cell
from prh_stitch.alignment.settings import clamp_note
from prh_stitch.alignment.study_matrix import zoo_markdown


def stability_cell(stability: Optional[Dict[str, Any]], key: str = "all") -> str:
    part = (stability or {}).get(key)
    if not part or part.get("stability") is None:
        return "–"
    text = f"{part['stability']:.0%}"
    winners = part.get("winners") or []
    if winners and [winners[0]["layer_a_name"], winners[0]["layer_b_name"]] != part.get("best"):
        text += f" (most often {winners[0]['layer_a_name']} × {winners[0]['layer_b_name']}, {winners[0]['count']})"
    return text


def grid_table(grid: List[Dict[str, Any]]) -> str:
    rows = []
    for g in grid:
        for c in g["rows"]:
            rows.append([g["model_a"], g["model_b"], f"{g['layer_a_name']} × {g['layer_b_name']}", c["k"],
                         f"{c['n']}{' (all)' if c['full'] else ''}", reports.fmt(c["score"], 3),
                         reports.fmt(c["chance"], 3), reports.fmt(c["null_mean"], 3), reports.fmt(c["calibrated"], 3),
                         reports.fmt(c["z"], 1)])
    return reports.markdown_table(["model A", "model B", "layers (best pair)", "k", "N", "mutual kNN",
                                   "chance k/(N−1)", "null mean", "calibrated", "z"], rows)


def study_markdown(summary: Dict[str, Any], datasets: List[Dict]) -> str:
    s = summary["settings"]
    protocol = summary.get("protocol") or {"name": s.get("protocol", "prh_stitch"), "description": ""}
    text = (f"# Convergence study\n\n**Protocol: {protocol['name']}** ({protocol['description']}).\n\n"
            f"prh_stitch {summary['version']}, device {summary['device']}, k = {s['k']}, "
            f"{s['permutations']} permutations, {s['bootstrap']} half-samples per interval, {s['half_samples']} "
            f"half-samples for the correlations, seed {s['seed']}, {clamp_note(s.get('outlier_quantile'), protocol['name'])}; "
            f"{summary['seconds']:.1f} s in all.\n")
    if summary.get("power"):
        text += "\n## What this study can detect (stated before computing)\n\n"
        text += "".join(f"- {p['sentence']}.\n" for p in summary["power"])
    for d in datasets:
        text += f"\n## {d['name']} (N = {d['n']})\n\n"
        rows = [[r["model_a"], r["model_b"], r["metric"],
                 f"{r['score']:.3f} ({r['layer_a_name']}, {r['layer_b_name']})",
                 reports.interval(r["ci_low"], r["ci_high"]), reports.fmt(r.get("max_null_mean"), 3),
                 stability_cell(r.get("best_pair_stability")), contextual_cell(r.get("contextual")),
                 stability_cell(r.get("best_pair_stability"), "contextual"),
                 f"{r['last']['score']:.3f}", reports.interval(r["last"]["ci_low"], r["last"]["ci_high"]),
                 reports.fmt(r["last"]["chance"], 3), reports.fmt(r["last"]["calibrated"], 3)] for r in d["records"]]
        text += reports.markdown_table(["model A", "model B", "metric", "best (max over layer pairs)", "95% CI",
                                        "null of max", "best pair wins in halves", "contextual best",
                                        "contextual wins in halves", "last layers", "95% CI", "chance",
                                        "calibrated"], rows)
        text += (f"\n*contextual best*: the best pair with {RULE}. *wins in halves*: how often that pair is again "
                 "the best when the selection is redone in random halves of the items.\n")
        text += zoo_markdown(d, summary.get("vision_models") or [], summary.get("text_models") or [])
        for a in d["competence"]:
            text += f"\n**{a['metric']} vs {a['competence']}** ({a['side']} models): {a['sentence']}."
            if a.get("sentence_contextual"):
                text += f" Contextual layers only: {a['sentence_contextual']}."
            if a["figure"]:
                text += f" ![{a['metric']}]({d['name']}/{a['figure']})"
            text += "\n"
        if d.get("knn_grid"):
            text += ("\n**Mutual kNN at several k and N** (best pair; N below the item count is a fixed random "
                     "subset; calibrated = (score − null mean) / (1 − null mean), comparable across N):\n\n"
                     + grid_table(d["knn_grid"]))
    if summary.get("conclusion"):
        text += f"\n## What the data support\n\n{summary['conclusion']}\n"
    for note in summary["notes"]:
        text += f"\nNote: {note}\n"
    return text
