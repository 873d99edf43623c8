"""The study's model-zoo views: the vision × text alignment matrix, the three layer choices side by side, and the
paper's figure layout (alignment to each language model against vision competence, one line per text model).

Three layer choices are compared because the headline number depends on them (issue #15 item 5):

- ``best``: the max over all layer pairs (the paper's headline);
- ``last``: the last layer of each model, no selection at all;
- ``contextual``: the max over contextual layers only (input embeddings and a static word-vector model's one layer
  left out, see :mod:`~prh_stitch.alignment.layer_sets`); a model with no contextual layer drops out.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

from prh_stitch import reports
from prh_stitch.figure_cache import Drawing

LAYER_CHOICES = (("best", "best layer pair (max over all pairs, the paper's)"),
                 ("last", "last layers"),
                 ("contextual", "best pair over contextual layers only"))

CORRELATION_KEYS = {"best": "correlation_best", "last": "correlation_last", "contextual": "correlation_contextual"}


def choice_score(record: Dict[str, Any], choice: str) -> Tuple[Optional[float], Optional[float]]:
    """(score, calibrated score) of one vision–text record under a layer choice; calibration only where the
    record has its null (best: the null of the max; last: the permutation null of that pair)."""
    if choice == "best":
        return record["score"], record.get("max_calibrated")
    if choice == "last":
        return record["last"]["score"], record["last"].get("calibrated")
    ctx = record.get("contextual")
    return (ctx["score"], None) if ctx else (None, None)


def _vt(records: Sequence[Dict[str, Any]], metric: str) -> Dict[Tuple[str, str], Dict[str, Any]]:
    return {(r["model_a"], r["model_b"]): r for r in records if r["kind"] == "vision-text" and r["metric"] == metric}


def matrix_markdown(records: Sequence[Dict[str, Any]], vision: Sequence[str], text: Sequence[str],
                    metric: str) -> str:
    """Vision × text tables of ``metric``, one per layer choice: score, and the calibrated score in brackets."""
    by_pair = _vt(records, metric)
    out = ""
    for choice, title in LAYER_CHOICES:
        rows = []
        for v in vision:
            row = [v]
            for t in text:
                score, cal = choice_score(by_pair[(v, t)], choice) if (v, t) in by_pair else (None, None)
                row.append("–" if score is None else f"{score:.3f}" + (f" ({cal:.3f})" if cal is not None else ""))
            rows.append(row)
        note = " (calibrated)" if choice != "contextual" else ""
        out += f"\n*{metric}, {title}*{note}:\n\n" + reports.markdown_table(["vision \\ text", *text], rows)
    return out


def _corr_cell(report: Dict[str, Any]) -> str:
    if not report or report.get("spearman") is None:
        return f"– (n = {report.get('n_models', 0) if report else 0})"
    lo, hi = report.get("spearman_ci") or (None, None)
    text = f"ρ = {report['spearman']:.2f}"
    if lo is not None:
        text += f" [{lo:.2f}, {hi:.2f}]"
    if report.get("pearson") is not None:
        text += f", r = {report['pearson']:.2f}"
    if report.get("p_models") is not None:
        text += f", p = {report['p_models']:.2g}"
    return text + f" (n = {report['n_models']})"


def layer_choice_table(analyses: Sequence[Dict[str, Any]]) -> str:
    """One row per competence analysis: the Spearman correlation under each layer choice, side by side."""
    rows = [[a.get("key", a["side"]), a["metric"], a["competence"],
             *(_corr_cell(a.get(CORRELATION_KEYS[c])) for c, _ in LAYER_CHOICES)] for a in analyses]
    return reports.markdown_table(["competence", "metric", "measure", *(t for _, t in LAYER_CHOICES)], rows)


def competence_table(analyses: Sequence[Dict[str, Any]]) -> str:
    """Each model's competence under every block (measured and published side by side), with the probe's interval."""
    keys = []
    for a in analyses:
        if a.get("key", a["side"]) not in [k for k, _ in keys]:
            keys.append((a.get("key", a["side"]), a))
    models = []
    for _, a in keys:
        models += [p["model"] for p in a["points"] if p["model"] not in models]
        models += [m for m in (a.get("probes") or {}) if m not in models]
    rows = []
    for m in models:
        row = [m]
        for _, a in keys:
            point = next((p for p in a["points"] if p["model"] == m), None)
            probe = (a.get("probes") or {}).get(m)
            if probe:
                lo, hi = probe["ci"]
                row.append(f"{100 * probe['top1']:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]")
            else:
                row.append(f"{point['competence']:.4g}" if point else "–")
        rows.append(row)
    text = reports.markdown_table(["model", *(f"{k}: {a['competence']}" for k, a in keys)], rows)
    for k, a in keys:
        probes = a.get("probes") or {}
        if probes:
            first = next(iter(probes.values()))
            text += (f"\n*{k}*: {first['protocol']}; {first['n_fit']} + {first['n_val']} training images (fit + "
                     f"validation), {first['n_test']} test images, layer {first['layer']}, chance "
                     f"{100 * first['chance']:.0f} %.\n")
        sources = sorted(set((a.get("sources") or {}).values()))
        if sources:
            text += f"\n*{k}* sources: " + "; ".join(sources) + ".\n"
    return text


def paper_figure(analysis: Dict[str, Any], records: Sequence[Dict[str, Any]], text: Sequence[str], out: Path,
                 dataset: str) -> Optional[str]:
    """The paper's layout for one vision competence: x = vision competence, y = alignment to each text model (one
    line per text model), one panel per layer choice; PNG and PDF beside the dataset's report. Returns the PNG's
    name, or None when fewer than two vision models have a competence."""
    points = sorted(analysis["points"], key=lambda p: p["competence"])
    if len(points) < 2:
        return None
    by_pair = _vt(records, analysis["metric"])
    panels = []
    for choice, title in LAYER_CHOICES:
        lines = []
        for t in text:
            scored = [(p["competence"], choice_score(by_pair[p["model"], t], choice)[0]) for p in points
                      if (p["model"], t) in by_pair]
            scored = [(x, y) for x, y in scored if y is not None]
            if scored:
                lines.append([t, [x for x, _ in scored], [y for _, y in scored]])
        corr = analysis.get(CORRELATION_KEYS[choice]) or {}
        panels.append({"title": f"{title}\nvision-side {_corr_cell(corr)}", "lines": lines})
    drawing = Drawing(_draw_paper_figure, (panels, [[p["model"], p["competence"]] for p in points],
                                           analysis["competence"], analysis["metric"], dataset, list(text)))
    name = f"paper_{analysis['metric']}_{analysis.get('key', analysis['side'])}.png"
    return reports.save_figure(drawing, out / name).name


def _draw_paper_figure(panels: Sequence[Dict[str, Any]], models: Sequence[Sequence[Any]], xlabel: str, metric: str,
                       dataset: str, text: Sequence[str]):
    from matplotlib.figure import Figure

    # One colour per text model in every panel: a panel may lack a model (GloVe has no contextual layer), and the
    # one legend must still name every line.
    colours = {t: f"C{i % 10}" for i, t in enumerate(text)}
    fig = Figure(figsize=(5.2 * len(panels), 4.4))
    axes = fig.subplots(1, len(panels), sharey=True)
    for ax, panel in zip(axes, panels):
        for label, xs, ys in panel["lines"]:
            ax.plot(xs, ys, marker="o", linewidth=1.2, color=colours[label], label=label)
        for model, competence in models:
            ax.annotate(model, (competence, ax.get_ylim()[0]), fontsize=6, rotation=90, alpha=0.6,
                        textcoords="offset points", xytext=(2, 4))
        ax.set_title(panel["title"], fontsize=8)
        ax.grid(alpha=0.3)
    fig.supxlabel(xlabel, fontsize=9)  # once: the panels share the competence axis, and long labels would collide
    axes[0].set_ylabel(f"{metric} alignment to the text model")
    from matplotlib.lines import Line2D

    axes[-1].legend([Line2D([], [], color=colours[t], marker="o") for t in text], list(text), fontsize=7, loc="best",
                    title="text model", title_fontsize=7)
    fig.suptitle(f"{dataset}: alignment to each language model against vision competence", fontsize=10)
    return fig


def zoo_markdown(dataset: Dict[str, Any], vision: Sequence[str], text: Sequence[str]) -> str:
    """The dataset section's zoo views: competence side by side, the matrices, the layer choices, the figures."""
    analyses = dataset.get("competence") or []
    md = ""
    if analyses:
        md += "\n**Competence, measured and published side by side:**\n\n" + competence_table(analyses)
    for metric in dict.fromkeys(r["metric"] for r in dataset["records"]):
        md += f"\n**Vision × text alignment matrix, {metric}**\n" + matrix_markdown(dataset["records"], vision, text,
                                                                                  metric)
    if analyses:
        md += ("\n**Does the trend survive the layer choice?** Spearman ρ of alignment (averaged over partners) with "
               "competence [95% interval: the range of ρ over the model rankings the half-samples leave open], "
               "Pearson r, exact over-models p:\n\n" + layer_choice_table(analyses))
    for name in dataset.get("paper_figures") or []:
        md += f"\n![paper layout]({dataset['name']}/{name})\n"
    return md


def conclusion(datasets: Sequence[Dict[str, Any]]) -> str:
    """One plain paragraph: which (dataset, competence, metric, layer choice) tests show a trend, out of how many.

    A test counts only as :func:`~prh_stitch.alignment.competence.trend_sentence` claims one (interval excluding 0
    *and* exact over-models p ≤ 0.05); tests impossible for lack of models are counted apart. With many tests a
    few may pass by chance, so the count of tests is stated with the ones that pass.
    """
    from prh_stitch.alignment.competence import trend_sentence

    passed, failed, impossible = [], 0, 0
    for d in datasets:
        for a in d.get("competence") or []:
            for choice, _ in LAYER_CHOICES:
                report = a.get(CORRELATION_KEYS[choice]) or {}
                if report.get("spearman") is None:
                    impossible += 1
                    continue
                sentence = trend_sentence(report, a["higher_is_better"], a["competence"])
                if sentence.startswith("no clear trend"):
                    failed += 1
                else:
                    passed.append(f"{d['name']}, {a['side']} {a['competence']}, {a['metric']}, {choice}: "
                                  f"{sentence.split(':')[0]} (ρ = {report['spearman']:.2f}, p = {report['p_models']:.2g})")
    tested = len(passed) + failed
    head = (f"Of {tested} testable correlations of alignment with competence ({impossible} more had too few models "
            "with a competence value to test)")
    if not passed:
        return (f"{head}, none shows a trend that both its item-resampling interval and the exact over-models "
                "permutation test support: on this data, alignment does not measurably rise with competence.")
    return (f"{head}, {len(passed)} show a trend supported by both the interval and the over-models test: "
            + "; ".join(passed) + f". The other {failed} show no clear trend, so the data support a trend only "
            "where listed here (and, with this many tests, a single pass at p ≤ 0.05 can be chance).")
