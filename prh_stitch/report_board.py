"""TensorBoard beside the files of a report: the same Figure objects as image summaries, tables as text.

``evaluate.py align``, ``study`` and ``layer-sweep`` write their report files and, through :func:`report_board`, a
``tensorboard/`` subfolder of the report folder: ``tensorboard --logdir <report folder>`` then shows every figure
of the report (Images), its markdown tables (Text) and its headline numbers (Scalars).

Figures are rendered with matplotlib's Agg canvas directly rather than with ``SummaryWriter.add_figure``, which
imports pyplot (process-wide state a library must not touch); the summary written is the same image summary.
"""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

BOARD_FOLDER = "tensorboard"


def figure_pixels(fig) -> np.ndarray:
    """An ``(H, W, 3)`` uint8 rendering of a ``matplotlib.figure.Figure``, without pyplot."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def log_figure(writer, tag: str, fig, step: int = 0) -> None:
    """One figure as an image summary (what TensorBoard's Images tab shows)."""
    writer.add_image(tag, figure_pixels(fig), global_step=step, dataformats="HWC")


class ReportBoard:
    """A thin front of ``SummaryWriter`` for reports: figures, markdown and scalars under stable tags."""

    def __init__(self, folder: str | os.PathLike) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.folder = Path(folder)
        self.writer = SummaryWriter(log_dir=str(self.folder))

    def figure(self, tag: str, fig, step: int = 0) -> None:
        log_figure(self.writer, tag, fig, step)

    def png(self, tag: str, data: bytes, step: int = 0) -> None:
        """A rendered PNG as an image summary, its bytes as they are: the report's own file, neither drawn nor
        encoded twice (``add_image`` would encode its pixels again, about 0.1 s per figure)."""
        from PIL import Image
        from tensorboard.compat.proto.summary_pb2 import Summary

        with Image.open(io.BytesIO(data)) as image:  # reads the header only: the size
            width, height = image.size
            channels = len(image.getbands())
        summary = Summary(value=[Summary.Value(tag=tag, image=Summary.Image(
            height=height, width=width, colorspace=channels, encoded_image_string=data))])
        self.writer._get_file_writer().add_summary(summary, step)  # the writer's own path for add_image's summary

    def text(self, tag: str, markdown: str, step: int = 0) -> None:
        self.writer.add_text(tag, markdown, global_step=step)

    def scalar(self, tag: str, value: Optional[float], step: int = 0) -> None:
        if value is not None and np.isfinite(value):
            self.writer.add_scalar(tag, float(value), global_step=step)

    def close(self) -> None:
        self.writer.close()


@contextlib.contextmanager
def report_board(out: str | os.PathLike) -> Iterator[ReportBoard]:
    """A :class:`ReportBoard` writing into ``<out>/tensorboard``; flushed and closed when the block ends."""
    board = ReportBoard(Path(out) / BOARD_FOLDER)
    try:
        yield board
    finally:
        board.close()


def tag_part(text: str) -> str:
    """A model or layer name made safe as one part of a TensorBoard tag (``/`` separates tag groups)."""
    return "".join(c if c.isalnum() or c in "-_.@" else "_" for c in str(text))
