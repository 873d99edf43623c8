"""The layer sweep: a stitching layer trained for every (A's layer i, B's layer j), and the penalty matrix.

``layer_sweep`` is a plain function (``evaluate.py layer-sweep`` maps its signature onto options). It returns a
:class:`SweepReport` and writes ``penalty.json`` (the report), ``penalty.csv`` (one row per cut, long form) and
``penalty.png`` (the heatmap) through :mod:`prh_stitch.reports`.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Literal, Optional, Sequence

from prh_stitch.encoders.base import Layer

log = logging.getLogger("prh_stitch.layer_stitch")

CSV_FIELDS = ("layer_a", "layer_b", "score", "b_score", "penalty", "agreement")
DEFAULT_LAYERS = ("blocks.2", "blocks.4", "blocks.6")


@dataclass
class SweepReport:
    """Scores of every cut; ``score[r][c]`` and ``penalty[r][c]`` are for ``layers_a[r]`` -> ``layers_b[c]``."""

    model_a: str
    model_b: str
    target: str
    metric: str
    layers_a: List[str] = field(default_factory=list)
    layers_b: List[str] = field(default_factory=list)
    b_score: float = 1.0
    score: List[List[float]] = field(default_factory=list)
    penalty: List[List[float]] = field(default_factory=list)
    agreement: List[List[float]] = field(default_factory=list)
    epochs: int = 0
    seconds: float = 0.0

    @property
    def records(self) -> List[Dict[str, Any]]:
        """One record per cut (long form): ``layer_a``, ``layer_b``, ``score``, ``b_score``, ``penalty``, ``agreement``."""
        return [{"layer_a": la, "layer_b": lb, "score": self.score[r][c], "b_score": self.b_score,
                 "penalty": self.penalty[r][c], "agreement": self.agreement[r][c]}
                for r, la in enumerate(self.layers_a) for c, lb in enumerate(self.layers_b)]

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


@contextlib.contextmanager
def _quiet_lightning() -> Iterator[None]:
    """One Trainer per cut: keep Lightning's per-Trainer banner out of the output, and restore the levels after."""
    loggers = [logging.getLogger(name) for name in ("pytorch_lightning", "lightning_fabric")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def train_cut(module, dm, epochs: int, accelerator: str) -> Dict[str, float]:
    """Train one stitching layer (a ``LayerStitchingModule``) for ``epochs`` on ``dm`` (a
    ``LayerStitchDataModule``) and score it on the whole validation split.

    Lightning is imported here and in :func:`layer_sweep`, not at module level: the command line reads this
    module's signatures (jsonargparse resolves its imports, even ``TYPE_CHECKING`` ones) on every start.
    """
    import pytorch_lightning as pl

    trainer = pl.Trainer(max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator=accelerator, devices=1, num_sanity_val_steps=0,
                         limit_val_batches=0)
    trainer.fit(module, datamodule=dm)
    return module.evaluate("val")


def layer_sweep(
    model_a: str = "efficientnet_lite0",
    model_b: str = "efficientnet_lite2",
    layers_a: Sequence[Layer] = DEFAULT_LAYERS,
    layers_b: Sequence[Layer] = DEFAULT_LAYERS,
    target: Literal["soft", "labels"] = "soft",
    source: Literal["scenes", "fashion_mnist"] = "scenes",
    n_train: int = 512,
    n_val: int = 256,
    image_size: int = 128,
    batch_size: int = 32,
    epochs: int = 3,
    lr: float = 1e-3,
    out: Optional[str] = "runs/layer_sweep",
    init: Literal["lstsq", "identity", "default"] = "lstsq",
    seed: int = 0,
    cache_dir: Optional[str] = None,
    accelerator: str = "cpu",
    progress: bool = True,
) -> SweepReport:
    """Stitching penalty of every cut: A's layer i into B's layer j, a stitching layer trained for each.

    Args:
        model_a: the network cut at each of ``layers_a`` (a built-in or ``timm:<name>``).
        model_b: the network resumed after each of ``layers_b``.
        layers_a: A's cut layers (names or indices of its ``layer_names``); the report's rows.
        layers_b: B's layers; the report's columns.
        target: ``soft`` (agreement with B's own predictions) or ``labels`` (accuracy through a probe on B).
        source: ``scenes`` (built in) or ``fashion_mnist``.
        n_train: training images.
        n_val: validation images; every score is measured on them.
        image_size: side in pixels fed to both networks.
        batch_size: stitch-layer training batch size.
        epochs: training epochs per cut.
        lr: AdamW learning rate of the stitching layer.
        out: folder for ``penalty.json``, ``penalty.csv``, ``penalty.png``/``.pdf`` and ``tensorboard/``; None writes
            nothing.
        init: stitching-layer init: ``lstsq``, ``identity`` (equal widths) or ``default``.
        seed: seed of the scenes, the training order and every cut's initialisation.
        cache_dir: cache of the frozen networks' outputs (default ``$PRH_STITCH_CACHE`` or ``~/.cache/prh_stitch``).
        accelerator: Lightning accelerator of each cut's training (``cpu``, ``gpu``, ``auto``).
        progress: a progress bar over the cuts (total ``len(layers_a) * len(layers_b)``, with an ETA) on stderr.

    Returns:
        The :class:`SweepReport`. A's activations at each cut are computed once and shared by every j.
    """
    if not layers_a or not layers_b:
        raise ValueError("give at least one layer of each model to sweep (layers_a and layers_b)")
    import pytorch_lightning as pl

    from prh_stitch.layer_stitch.data import LayerStitchDataModule
    from prh_stitch.layer_stitch.lightning import LayerStitchingModule

    dm = LayerStitchDataModule(source=source, n_train=n_train, n_val=n_val, image_size=image_size, seed=seed,
                               batch_size=batch_size, cache_dir=cache_dir)
    report = SweepReport(model_a, model_b, target, "accuracy" if target == "labels" else "agreement with B",
                         epochs=epochs)
    from tqdm.auto import tqdm

    start = time.perf_counter()
    bar = tqdm(total=len(layers_a) * len(layers_b), desc="layer sweep: cuts trained", unit="cut", disable=not progress)
    with _quiet_lightning(), bar:
        for la in layers_a:
            rows: Dict[str, List[float]] = {"score": [], "penalty": [], "agreement": []}
            for lb in layers_b:
                pl.seed_everything(seed, verbose=False)
                module = LayerStitchingModule(model_a, model_b, la, lb, target=target, init=init, lr=lr)
                result = train_cut(module, dm, epochs, accelerator)
                for key, row in rows.items():
                    row.append(result[key])
                report.b_score = result["b_score"]
                if len(report.layers_b) < len(layers_b):
                    report.layers_b.append(module.layer_b)
                log.info("%s %s -> %s %s: score %.4f, penalty %+.4f", model_a, module.layer_a, model_b,
                         module.layer_b, result["score"], result["penalty"])
                bar.update(1)
            report.layers_a.append(module.layer_a)
            for key, row in rows.items():
                getattr(report, key).append(row)
    report.seconds = time.perf_counter() - start
    if out is not None:
        write_sweep_report(report, out)
    return report


def write_sweep_report(report: SweepReport, out: str | Path) -> Dict[str, Path]:
    """``penalty.json``, ``penalty.csv`` (long form: one row per cut) and ``penalty.png``/``.pdf`` in ``out``, the
    penalty matrix and every cut's penalty also in ``out/tensorboard``; ``out`` is replaced as a whole at the end."""
    from prh_stitch.atomic import atomic_folder
    from prh_stitch.report_board import report_board, tag_part
    from prh_stitch.reports import save_figure, write_csv, write_json

    out = Path(out)
    with atomic_folder(out) as folder:
        with report_board(folder) as board:
            save_figure(penalty_figure(report), folder / "penalty.png", board, "layer_sweep/penalty")
            for row in report.records:
                board.scalar(f"penalty/{tag_part(row['layer_a'])}__{tag_part(row['layer_b'])}", row["penalty"])
        write_json(folder / "penalty.json", report.to_dict())
        write_csv(folder / "penalty.csv", report.records, CSV_FIELDS)
    return {"json": out / "penalty.json", "csv": out / "penalty.csv", "png": out / "penalty.png",
            "pdf": out / "penalty.pdf", "tensorboard": out / "tensorboard"}


def penalty_figure(report: SweepReport):
    """The penalty heatmap (rows: A's layers, columns: B's) as a ``matplotlib.figure.Figure`` (no pyplot state)."""
    import numpy as np
    from matplotlib.figure import Figure

    matrix = np.array(report.penalty, dtype=float)
    fig = Figure(figsize=(1.2 + 1.1 * matrix.shape[1], 1.0 + 0.8 * matrix.shape[0]))
    ax = fig.subplots()
    image = ax.imshow(matrix, cmap="magma_r", vmin=min(0.0, float(matrix.min())), vmax=max(1e-6, float(matrix.max())))
    ax.set_xticks(range(matrix.shape[1]), report.layers_b, rotation=45, ha="right")
    ax.set_yticks(range(matrix.shape[0]), report.layers_a)
    ax.set_xlabel(f"B = {report.model_b} (resumes after)")
    ax.set_ylabel(f"A = {report.model_a} (cut at)")
    for (i, j), value in np.ndenumerate(matrix):
        ax.text(j, i, f"{value:.2f}", ha="center", va="center", color="white" if value > matrix.max() / 2 else "black")
    ax.set_title(f"stitching penalty ({report.metric})")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    return fig
