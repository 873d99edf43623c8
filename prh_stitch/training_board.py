"""What a stitcher's training run shows in TensorBoard besides its scalars: the science, not only the loss.

:class:`TrainingBoard` (``train.py`` adds it; options under ``board.*``) writes, on rank 0 and only to a
TensorBoard logger:

- **HParams**: ``hp_metric`` = the selected checkpoint's test recall@1 once ``trainer.test`` has run (before that,
  the best validation score the checkpoint callback saw), so the HParams tab ranks runs by what they achieve.
- **Images**: ``val/similarity_matrix``, cosine similarity of stitched source and target features of the first
  validation rows (a diagonal is what a good stitcher draws), after every validation epoch.
- **Text**: ``val/retrieval_examples``, for a few fixed validation queries, the caption and the captions of the
  top retrieved targets over the whole validation split.
- **Projector**: at the end of training, stitched and target vectors of a small fixed validation subset in one space,
  with their captions and kind (``stitched`` / ``target``) as metadata and the images as thumbnails.
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence

import torch
from pytorch_lightning import Callback
from pytorch_lightning.loggers import TensorBoardLogger

from prh_stitch.report_board import log_figure


class TrainingBoard(Callback):
    def __init__(self, similarity_rows: int = 24, examples: int = 6, top: int = 3, projector_rows: int = 64,
                 thumbnail: int = 32) -> None:
        """
        Args:
            similarity_rows: validation rows in the similarity-matrix figure (0 turns it off).
            examples: validation queries shown as retrieval examples (0 turns them off).
            top: retrieved captions shown per example.
            projector_rows: validation rows given to the embedding projector (0 turns it off).
            thumbnail: side in pixels of the projector's image thumbnails.
        """
        self.similarity_rows, self.examples, self.top = int(similarity_rows), int(examples), int(top)
        self.projector_rows, self.thumbnail = int(projector_rows), int(thumbnail)

    # ---- hooks ----------------------------------------------------------------------------------------
    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        writer = _writer(trainer)
        val = _val_rows(trainer, pl_module)
        if writer is None or val is None or trainer.sanity_checking:
            return
        source, target, captions = val
        step = trainer.global_step
        with torch.no_grad():
            if self.similarity_rows > 0:
                n = min(self.similarity_rows, len(source))
                stitched = pl_module.stitcher(source[:n].to(pl_module.device)).float().cpu()
                log_figure(writer, "val/similarity_matrix",
                           similarity_figure(stitched, target[:n].float(), captions[:n]), step)
            if self.examples > 0:
                writer.add_text("val/retrieval_examples",
                                retrieval_examples(pl_module.stitcher, source, target, captions, self.examples,
                                                   self.top, pl_module.device), step)

    def on_train_end(self, trainer, pl_module) -> None:
        # Not on_fit_end: by then Lightning has closed the run's event file, and writing would open another one.
        callback = trainer.checkpoint_callback
        score = getattr(callback, "best_model_score", None)
        if score is not None and trainer.is_global_zero:
            _log_hp_metric(trainer, float(score))
        if self.projector_rows > 0:
            self._projector(trainer, pl_module)

    def on_test_end(self, trainer, pl_module) -> None:
        scores = getattr(pl_module, "test_scores", None)
        # Retrieval scores only: a prefix map's test scores are bits per byte, and its hp_metric stays validation's.
        if scores is not None and "a2b/recall@1" in scores and trainer.is_global_zero:
            _log_hp_metric(trainer, float(scores["a2b/recall@1"]))

    # ---- the embedding projector ----------------------------------------------------------------------
    def _projector(self, trainer, pl_module) -> None:
        writer = _writer(trainer)
        val = _val_rows(trainer, pl_module)
        if writer is None or val is None:
            return
        source, target, captions = val
        n = min(self.projector_rows, len(source))
        with torch.no_grad():
            stitched = pl_module.stitcher(source[:n].to(pl_module.device)).float().cpu()
        vectors = torch.cat([stitched, target[:n].float()])
        metadata = [[_one_line(c), kind] for kind in ("stitched", "target") for c in captions[:n]]
        thumbnails = val_thumbnails(trainer.datamodule, n, self.thumbnail)
        writer.add_embedding(vectors, metadata=metadata, metadata_header=["caption", "kind"],
                             label_img=None if thumbnails is None else torch.cat([thumbnails, thumbnails]),
                             global_step=trainer.global_step, tag="val/stitched_and_target")
        writer.flush()


# ---- pieces, usable on their own ---------------------------------------------------------------------
def similarity_figure(stitched: torch.Tensor, target: torch.Tensor, captions: Sequence[str]):
    """Cosine similarity of stitched rows (queries) and target rows; each row's best match is circled."""
    from prh_stitch.reports import new_figure

    sim = torch.nn.functional.normalize(stitched, dim=-1) @ torch.nn.functional.normalize(target, dim=-1).T
    n = len(sim)
    fig, ax = new_figure((2.5 + 0.28 * n, 1.5 + 0.28 * n))
    image = ax.imshow(sim.numpy(), cmap="viridis", vmin=-1, vmax=1)
    fig.colorbar(image, ax=ax).set_label("cosine similarity")
    best = sim.argmax(dim=1)
    ax.scatter(best.numpy(), range(n), s=40, facecolors="none", edgecolors="red", label="best match of the row")
    labels = [_one_line(c)[:40] for c in captions]
    ax.set_yticks(range(n), labels, fontsize=6)
    ax.set_xticks(range(n), range(n), fontsize=6)
    ax.set_xlabel("target row")
    ax.set_ylabel("stitched query (its caption)")
    hits = int((best == torch.arange(n)).sum())
    ax.set_title(f"validation rows 0..{n - 1}: {hits}/{n} queries match their own row best", fontsize=8)
    ax.legend(loc="upper left", bbox_to_anchor=(0, -0.08), fontsize=6, frameon=False)
    return fig


def retrieval_examples(stitcher, source: torch.Tensor, target: torch.Tensor, captions: Sequence[str], queries: int,
                       top: int, device: Any = "cpu") -> str:
    """Markdown: the first ``queries`` validation rows, each with its caption and the captions of its ``top``
    nearest targets (cosine) among all validation rows; a retrieved caption identical to the query's is correct."""
    from prh_stitch.reports import markdown_table

    q = torch.nn.functional.normalize(stitcher(source[:queries].to(device)).float().cpu(), dim=-1)
    t = torch.nn.functional.normalize(target.float(), dim=-1)
    ranked = (q @ t.T).topk(min(top, len(t)), dim=1).indices
    rows = []
    for i, hits in enumerate(ranked.tolist()):
        found = [("✓ " if captions[j] == captions[i] else "") + _one_line(captions[j]) for j in hits]
        rows.append([i, _one_line(captions[i]), *found])
    return ("Top retrieved validation captions for stitched queries (✓: the same caption as the query).\n\n"
            + markdown_table(["row", "query caption", *[f"#{k + 1}" for k in range(ranked.shape[1])]], rows))


def val_thumbnails(dm, n: int, side: int) -> Optional[torch.Tensor]:
    """``(n, 3, side, side)`` images in [0, 1] of the first ``n`` validation rows, read from the shards by key;
    None when a row's image cannot be found (the projector then shows points without thumbnails)."""
    from prh_stitch.data.features import align_by_key
    from prh_stitch.data.stream import PROBLEM, decode_sample, read_shard

    sets = getattr(dm, "feature_sets", {})
    if ("val", "source") not in sets:
        return None
    a, b = sets[("val", "source")], sets[("val", "target")]
    idx_a, _ = align_by_key(a, b)
    wanted = [a.keys[i] for i in idx_a[:n].tolist()]
    looked_for, found = set(wanted), {}
    # The store sorts rows by key and writers number keys in shard order, so the first rows' images are usually in
    # the first shards: the scan stops once every one is found.
    for url in dm.shard_urls("val"):
        for raw in read_shard(url):
            if PROBLEM in raw or raw.get("__key__") not in looked_for or raw["__key__"] in found:
                continue
            sample = decode_sample(raw, "RGB")
            if "image" in sample:
                found[sample["key"]] = _thumbnail(sample["image"], side)
        if len(found) == len(wanted):
            break
    if len(found) < len(wanted):
        return None
    return torch.stack([found[k] for k in wanted])


def _thumbnail(image, side: int) -> torch.Tensor:
    import numpy as np

    pixels = np.asarray(image.convert("RGB").resize((side, side)), dtype=np.float32) / 255.0
    return torch.from_numpy(pixels).permute(2, 0, 1)


def _writer(trainer):
    """The SummaryWriter of the run's TensorBoard logger on rank 0; None elsewhere or without one."""
    if not trainer.is_global_zero:
        return None
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            return logger.experiment
    return None


def _val_rows(trainer, pl_module):
    """(source, target, captions) of the whole validation split, or None for modules that are not stitchers."""
    from prh_stitch.module import StitchingModule

    dm = getattr(trainer, "datamodule", None)
    if not isinstance(pl_module, StitchingModule) or dm is None or "val" not in getattr(dm, "datasets", {}):
        return None
    source, target, _, _ = dm.datasets["val"].tensors
    return source, target, dm.captions["val"]


def _log_hp_metric(trainer, value: float) -> None:
    # TensorBoardLogger registered hp_metric with the run's hyperparameters; its newest value is what HParams shows.
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.log_metrics({"hp_metric": value}, step=trainer.global_step)
            logger.experiment.flush()


def _one_line(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "/")


__all__: List[str] = ["TrainingBoard", "retrieval_examples", "similarity_figure", "val_thumbnails"]
