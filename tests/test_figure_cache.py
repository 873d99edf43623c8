"""The figure cache: a figure whose inputs and drawing code are unchanged is not drawn again, and an entry that does
not match its digests is never served."""

import json
import logging

import pytest

from prh_stitch import reports
from prh_stitch.figure_cache import Drawing, FigureCache, figure_cache
from prh_stitch.report_board import report_board


def heatmap_inputs(scale=1.0):
    matrix = [[0.1 * scale, 0.2], [0.3, 0.4 * scale], [0.5, 0.6]]
    return (matrix, ["a0", "a1", "a2"], ["b0", "b1"], "A", "B", "mutual_knn", (2, 1), 0.05)


class CountingDraw:
    """layer_heatmap, counting its calls (the key names the module and function it wraps)."""

    def __init__(self):
        self.calls = 0
        self.__module__ = reports.layer_heatmap.__module__
        self.__qualname__ = reports.layer_heatmap.__qualname__

    def __call__(self, *args):
        self.calls += 1
        return reports.layer_heatmap(*args)


def image_tags(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: acc.Images(tag) for tag in acc.Tags()["images"]}


def test_a_rerun_copies_the_verified_files_without_drawing(tmp_path):
    draw = CountingDraw()
    with figure_cache(tmp_path / "cache") as cache:
        first = reports.save_figure(Drawing(draw, heatmap_inputs()), tmp_path / "one" / "f.png")
        again = reports.save_figure(Drawing(draw, heatmap_inputs()), tmp_path / "two" / "f.png")
    assert draw.calls == 1 and (cache.draws, cache.hits) == (1, 1)
    for suffix in (".png", ".pdf"):
        assert first.with_suffix(suffix).read_bytes() == again.with_suffix(suffix).read_bytes()
    assert first.read_bytes().startswith(b"\x89PNG") and first.with_suffix(".pdf").read_bytes().startswith(b"%PDF")

    # Other inputs are another figure.
    with figure_cache(tmp_path / "cache") as cache:
        other = reports.save_figure(Drawing(draw, heatmap_inputs(scale=2.0)), tmp_path / "three" / "f.png")
    assert draw.calls == 2 and cache.draws == 1
    assert other.read_bytes() != first.read_bytes()


def test_without_an_active_cache_every_figure_is_drawn(tmp_path):
    draw = CountingDraw()
    for name in ("one", "two"):
        reports.save_figure(Drawing(draw, heatmap_inputs()), tmp_path / name / "f.png")
    assert draw.calls == 2
    with figure_cache(None):
        reports.save_figure(Drawing(draw, heatmap_inputs()), tmp_path / "three" / "f.png")
    assert draw.calls == 3


@pytest.mark.parametrize("damage", ["truncate_png", "edit_pdf", "drop_index", "bad_index"])
def test_an_entry_that_does_not_match_its_digests_is_drawn_again(tmp_path, damage, caplog):
    draw = CountingDraw()
    root = tmp_path / "cache"
    with figure_cache(root):
        good = reports.save_figure(Drawing(draw, heatmap_inputs()), tmp_path / "one" / "f.png").read_bytes()
    key = Drawing(draw, heatmap_inputs()).key()
    png, pdf, index = (root / f"{key}{s}" for s in (".png", ".pdf", ".json"))
    if damage == "truncate_png":
        png.write_bytes(png.read_bytes()[:100])
    elif damage == "edit_pdf":
        pdf.write_bytes(pdf.read_bytes().replace(b"%PDF", b"%PDX", 1))
    elif damage == "drop_index":
        index.unlink()
    else:
        index.write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="prh_stitch.figure_cache"), figure_cache(root) as cache:
        redrawn = reports.save_figure(Drawing(draw, heatmap_inputs()), tmp_path / "two" / "f.png")
    assert draw.calls == 2 and cache.hits == 0
    assert redrawn.read_bytes()[:8] == good[:8] and len(redrawn.read_bytes()) > 100
    if damage != "drop_index":  # an absent entry is simply not cached; a damaged one is reported
        assert "drawing the figure again" in caplog.text
    # The redraw repaired the entry: it now verifies.
    assert FigureCache(root).get(key) is not None
    assert json.loads(index.read_text()).keys() == {".png", ".pdf"}


def test_the_key_follows_the_inputs_and_the_drawing_function():
    base = Drawing(reports.layer_heatmap, heatmap_inputs())
    assert base.key() == Drawing(reports.layer_heatmap, heatmap_inputs()).key()
    assert base.key() != Drawing(reports.layer_heatmap, heatmap_inputs(scale=1.5)).key()
    assert base.key() != Drawing(reports.model_heatmap, heatmap_inputs()).key()


def test_a_cached_figure_still_goes_to_tensorboard_as_the_same_png(tmp_path):
    draw = CountingDraw()
    for name in ("one", "two"):  # the second run reads the cache
        with figure_cache(tmp_path / "cache"), report_board(tmp_path / name) as board:
            path = reports.save_figure(Drawing(draw, heatmap_inputs()), tmp_path / name / "f.png", board, "layers/x")
    assert draw.calls == 1
    for name in ("one", "two"):
        images = image_tags(tmp_path / name / "tensorboard")
        assert list(images) == ["layers/x"]
        (event,) = images["layers/x"]
        assert event.encoded_image_string == path.read_bytes()
        from PIL import Image

        with Image.open(path) as image:
            assert (event.width, event.height) == image.size
