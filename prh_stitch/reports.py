"""Writing evaluation reports: JSON, CSV, markdown tables and matplotlib figures, each written atomically.

Every file goes to a temporary sibling first and is renamed into place, so an interrupted or failed run never
leaves a half-written report that looks finished. Figures are ``matplotlib.figure.Figure`` objects built without
pyplot, so drawing one never switches the process's backend (a notebook keeps its own); ``save_figure`` writes
one as PNG and PDF (and to a report's TensorBoard folder when given its board).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence

import torch

import prh_stitch
from prh_stitch.atomic import atomic_write_bytes


def write_text(path: str | os.PathLike, text: str) -> Path:
    path = Path(path)
    atomic_write_bytes(path, text.encode("utf-8"))
    return path


def to_jsonable(value: Any) -> Any:
    """Tensors, tuples and non-finite floats made JSON-safe (NaN/Inf become None: JSON has no NaN)."""
    if isinstance(value, torch.Tensor):
        return to_jsonable(value.tolist())
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "item") and callable(value.item) and not isinstance(value, (str, bytes)):
        return to_jsonable(value.item())
    return value


def write_json(path: str | os.PathLike, payload: Any) -> Path:
    return write_text(path, json.dumps(to_jsonable(payload), indent=2) + "\n")


def write_csv(path: str | os.PathLike, rows: Sequence[Dict[str, Any]], fields: Sequence[str]) -> Path:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(fields), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: to_jsonable(row.get(k)) for k in fields})
    return write_text(path, buffer.getvalue())


def fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def interval(low: Optional[float], high: Optional[float], digits: int = 3) -> str:
    if low is None or high is None:
        return "–"
    return f"[{low:.{digits}f}, {high:.{digits}f}]"


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def provenance(command: str, config: Dict[str, Any], device: str, seed: int,
               encoders: Dict[str, Dict[str, Any]], **extra: Any) -> Dict[str, Any]:
    """What every report records so that it can be reproduced and compared."""
    return {
        "command": command,
        "package": "prh_stitch",
        "version": prh_stitch.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": device,
        "device_name": torch.cuda.get_device_name(0) if device.startswith("cuda") else platform.processor() or "cpu",
        "seed": seed,
        "argv": list(sys.argv),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": config,
        "encoders": encoders,
        **extra,
    }


# ---- figures ------------------------------------------------------------------------------------------

def new_figure(figsize: Sequence[float]):
    """A figure and its one axes, outside pyplot: no global figure manager, no backend switch."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=tuple(figsize))
    return fig, fig.subplots()


def save_figure(fig, path: str | os.PathLike, board=None, tag: Optional[str] = None) -> Path:
    """``path`` (PNG, for reading) and its ``.pdf`` sibling (vector, for a paper); with a
    :class:`~prh_stitch.report_board.ReportBoard`, the same image also goes to TensorBoard under ``tag``.

    ``fig`` is a ``matplotlib.figure.Figure``, or a :class:`~prh_stitch.figure_cache.Drawing` that is drawn only
    when the active figure cache (:func:`~prh_stitch.figure_cache.figure_cache`) has no verified copy of it.
    """
    from prh_stitch.figure_cache import Drawing, active

    path = Path(path)
    cache = active() if isinstance(fig, Drawing) else None
    key = fig.key() if cache is not None else None
    files = cache.get(key) if cache is not None else None
    if files is None:
        figure = fig.figure() if isinstance(fig, Drawing) else fig
        files = {}
        for suffix, options in ((".png", {"dpi": 120}), (".pdf", {})):
            buffer = io.BytesIO()
            figure.savefig(buffer, format=suffix[1:], bbox_inches="tight", **options)
            files[suffix] = buffer.getvalue()
        if cache is not None:
            cache.put(key, files)
    for suffix, data in files.items():
        atomic_write_bytes(path.with_suffix(suffix), data)
    if board is not None:
        board.png(tag or path.stem, files[".png"])
    return path


def layer_heatmap(scores, layers_a: Sequence[str], layers_b: Sequence[str], model_a: str,
                  model_b: str, metric: str, best: Sequence[int], chance: Optional[float]):
    """Layer × layer scores (a tensor or nested lists) of one model pair; the best cell (max) and the last-layer
    cell are marked."""
    import numpy as np

    m = np.asarray(scores, dtype=float)
    fig, ax = new_figure((max(4.5, 1.6 + 0.45 * len(layers_b)), max(3.5, 1.2 + 0.4 * len(layers_a))))
    image = ax.imshow(m, cmap="viridis", aspect="auto", origin="lower")
    bar = fig.colorbar(image, ax=ax)
    bar.set_label(metric)
    if chance is not None and image.norm.vmin <= chance <= image.norm.vmax:
        # Only when chance lies inside the colour range; otherwise the title states it.
        bar.ax.axhline(chance, color="red", linewidth=2)
    ax.set_xticks(range(len(layers_b)), layers_b, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(layers_a)), layers_a, fontsize=7)
    ax.set_xlabel(f"{model_b} layer")
    ax.set_ylabel(f"{model_a} layer")
    ax.plot(best[1], best[0], marker="*", color="white", markersize=12, markeredgecolor="black",
            label=f"max = {m[best[0], best[1]]:.3f}")
    ax.plot(len(layers_b) - 1, len(layers_a) - 1, marker="s", fillstyle="none", color="red", markersize=11,
            label=f"last layers = {m[-1, -1]:.3f}")
    ax.legend(loc="upper left", bbox_to_anchor=(0, -0.25), fontsize=7, ncol=2, frameon=False)
    ax.set_title(f"{metric}: {model_a} × {model_b}" + (f" (chance {chance:.3f})" if chance is not None else ""),
                 fontsize=9)
    return fig


def model_heatmap(models: Sequence[str], matrix: List[List[Optional[float]]], metric: str, what: str,
                  chance: Optional[float]):
    """Model × model headline scores of one metric; pairs that were not scored stay blank."""
    import numpy as np

    m = np.array([[np.nan if v is None else v for v in row] for row in matrix], dtype=float)
    size = 1.8 + 0.9 * len(models)
    fig, ax = new_figure((size + 1.0, size))
    image = ax.imshow(np.ma.masked_invalid(m), cmap="viridis")
    bar = fig.colorbar(image, ax=ax)
    bar.set_label(f"{metric} ({what})")
    ax.set_xticks(range(len(models)), models, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(models)), models, fontsize=8)
    ax.set_xlabel("model")
    ax.set_ylabel("model")
    for i in range(len(models)):
        for j in range(len(models)):
            if not np.isnan(m[i, j]):
                ax.text(j, i, f"{m[i, j]:.3f}", ha="center", va="center", fontsize=7, color="white",
                        path_effects=_outline())
    ax.set_title(f"{metric} between models ({what})" + (f"\nchance ≈ {chance:.3f}" if chance is not None else ""),
                 fontsize=9)
    return fig


def _outline():
    from matplotlib import patheffects

    return [patheffects.withStroke(linewidth=2, foreground="black")]


def competence_scatter(points: Sequence[Dict[str, Any]], xlabel: str, metric: str, chance: Optional[float],
                       title: str, subtitle: str):
    """Alignment (with half-sample intervals) against competence, one labelled point per model."""
    fig, ax = new_figure((6.4, 4.6))
    xs = [p["competence"] for p in points]
    ys = [p["score"] for p in points]
    low = [p["score"] - p["ci_low"] if p.get("ci_low") is not None else 0.0 for p in points]
    high = [p["ci_high"] - p["score"] if p.get("ci_high") is not None else 0.0 for p in points]
    ax.errorbar(xs, ys, yerr=[low, high], fmt="o", capsize=4, color="tab:blue", label="alignment (95% half-sample CI)")
    for p in points:
        ax.annotate(p["model"], (p["competence"], p["score"]), textcoords="offset points", xytext=(6, 6), fontsize=8)
    if chance is not None:
        ax.axhline(chance, color="red", linestyle="--", linewidth=1, label=f"chance ({chance:.3f})")
    if len(xs) >= 2:
        import numpy as np

        slope, intercept = np.polyfit(xs, ys, 1)
        grid = np.linspace(min(xs), max(xs), 20)
        ax.plot(grid, slope * grid + intercept, color="gray", linewidth=1, alpha=0.7, label="least-squares line")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"{metric} alignment")
    ax.set_title(f"{title}\n{subtitle}", fontsize=9)
    ax.legend(fontsize=7, loc="best")
    ax.grid(alpha=0.3)
    return fig
