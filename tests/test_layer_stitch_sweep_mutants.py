"""The layer sweep's own code, fast: its bookkeeping, the Trainer of one cut, the penalty figure and the report files.

The expensive parts (building two networks per cut, training, scoring) are replaced by small stand-ins that record
what they are given, so each test checks what ``sweep.py`` itself does against expectations written out here: which
cut lands in which cell, which options reach the data and the modules, what one cut's Trainer does (a real Trainer
on a two-parameter module), what the heatmap shows and what the JSON, CSV and TensorBoard files hold.
"""

import csv
import json
import logging
import re
from types import SimpleNamespace

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from prh_stitch.layer_stitch import sweep
from prh_stitch.layer_stitch.sweep import SweepReport, penalty_figure, train_cut, write_sweep_report

# ---- one cut's Trainer ---------------------------------------------------------------------------------------------


class CountingModule(pl.LightningModule):
    """Two parameters; counts its training and validation steps; ``evaluate`` reports what it saw."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(2, 1)
        self.train_steps = 0
        self.val_steps = 0
        self.evaluated = []

    def training_step(self, batch, batch_idx):
        self.train_steps += 1
        x, y = batch
        return ((self.linear(x).squeeze(1) - y) ** 2).mean()

    def validation_step(self, batch, batch_idx):
        self.val_steps += 1

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def evaluate(self, split="val"):
        self.evaluated.append(split)
        return {"split": split, "train_steps": self.train_steps, "val_steps": self.val_steps}


class TwoBatches(pl.LightningDataModule):
    """8 training rows in batches of 4 (two steps an epoch) and 4 validation rows."""

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        return DataLoader(TensorDataset(torch.randn(8, 2, generator=g), torch.randn(8, generator=g)), batch_size=4)

    def val_dataloader(self):
        return DataLoader(TensorDataset(torch.zeros(4, 2), torch.zeros(4)), batch_size=4)


class RecordingTrainer(pl.Trainer):
    """A real Trainer that remembers itself and trains only on one device (several would start processes)."""

    made = []

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        RecordingTrainer.made.append(self)

    def fit(self, *args, **kwargs):
        if self.num_devices != 1:
            return None
        return super().fit(*args, **kwargs)


@pytest.fixture
def recording_trainer(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # Lightning's default folder for logs and checkpoints: must stay empty
    RecordingTrainer.made = []
    monkeypatch.setattr(pl, "Trainer", RecordingTrainer)
    return RecordingTrainer.made


@pytest.fixture
def lightning_messages():
    """Every record of Lightning's loggers at INFO and above (Lightning may not propagate to the root)."""
    records = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append
    loggers = [logging.getLogger(name) for name in ("pytorch_lightning", "lightning_fabric")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    yield records
    for logger, level in zip(loggers, levels):
        logger.removeHandler(handler)
        logger.setLevel(level)


def test_one_cut_trains_its_epochs_without_validation_files_or_output_and_returns_the_val_scores(
        recording_trainer, lightning_messages, tmp_path, capfd):
    module = CountingModule()
    result = train_cut(module, TwoBatches(), 3, "cpu")
    assert result == {"split": "val", "train_steps": 6, "val_steps": 0}  # 3 epochs of 2 batches, no validation
    assert module.evaluated == ["val"]
    [trainer] = recording_trainer
    assert trainer.current_epoch == 3 and trainer.global_step == 6
    assert trainer.logger is None and trainer.checkpoint_callback is None and trainer.progress_bar_callback is None
    assert list(tmp_path.iterdir()) == []  # no lightning_logs/, no checkpoints/
    out, err = capfd.readouterr()
    assert "Epoch" not in out + err  # no progress bar
    messages = "\n".join(str(r.getMessage()) for r in lightning_messages)
    assert "Trainable params" not in messages and "Total params" not in messages + out + err  # no model summary


def test_one_cut_trains_on_one_device_where_the_accelerator_offers_several(recording_trainer, monkeypatch):
    from lightning_fabric.accelerators.cpu import CPUAccelerator as FabricCPU
    from pytorch_lightning.accelerators.cpu import CPUAccelerator

    monkeypatch.setattr(CPUAccelerator, "auto_device_count", staticmethod(lambda: 4))
    monkeypatch.setattr(FabricCPU, "auto_device_count", staticmethod(lambda: 4))
    module = CountingModule()
    result = train_cut(module, TwoBatches(), 1, "cpu")
    [trainer] = recording_trainer
    assert trainer.num_devices == 1
    assert result["train_steps"] == 2


def test_one_cut_trains_on_the_accelerator_it_is_given(monkeypatch, tmp_path):
    """A GPU asked for on a machine without one is an error, not a silent CPU run ("auto" would pick the CPU)."""
    from lightning_fabric.accelerators.cuda import CUDAAccelerator as FabricCUDA
    from pytorch_lightning.accelerators.cuda import CUDAAccelerator
    from pytorch_lightning.accelerators.mps import MPSAccelerator

    monkeypatch.chdir(tmp_path)
    for cls in (CUDAAccelerator, FabricCUDA, MPSAccelerator):
        monkeypatch.setattr(cls, "is_available", staticmethod(lambda: False))
    module = CountingModule()
    with pytest.raises(Exception, match="CUDAAccelerator` can not run on your system"):
        train_cut(module, TwoBatches(), 1, "cuda")
    assert module.train_steps == 0


# ---- the sweep's bookkeeping ----------------------------------------------------------------------------------------

LAYER_NAMES = ["stem"] + [f"blocks.{i}" for i in range(7)]


class FakeData:
    made = []

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        FakeData.made.append(self)


class FakeCut:
    """Stands in for ``LayerStitchingModule``: an index names a layer (as ``layer_name`` does); it records its
    arguments and a draw of torch's generator at construction (what the cut's initialisation would see)."""

    made = []

    def __init__(self, model_a, model_b, layer_a, layer_b, **kwargs):
        self.args = (model_a, model_b, layer_a, layer_b)
        self.kwargs = kwargs
        self.layer_a = LAYER_NAMES[layer_a] if isinstance(layer_a, int) else layer_a
        self.layer_b = LAYER_NAMES[layer_b] if isinstance(layer_b, int) else layer_b
        self.draw = torch.rand(1).item()
        FakeCut.made.append(self)


def cut_result(layer_a, layer_b):
    """A distinct result for each cut (a swapped row, column or key shows): score r/10 + c/100 for row r and
    column c of the LAYER_NAMES, B's own score 0.875."""
    score = LAYER_NAMES.index(layer_a) / 10 + LAYER_NAMES.index(layer_b) / 100
    return {"score": score, "b_score": 0.875, "penalty": 0.875 - score, "agreement": 0.5 + score}


@pytest.fixture
def stand_ins(monkeypatch):
    """The data module, the cut's module and ``train_cut`` replaced; the calls of ``train_cut`` and the levels of
    Lightning's loggers while it ran are recorded."""
    import prh_stitch.layer_stitch.data as data
    import prh_stitch.layer_stitch.lightning as lightning

    FakeData.made, FakeCut.made = [], []
    monkeypatch.setattr(data, "LayerStitchDataModule", FakeData)
    monkeypatch.setattr(lightning, "LayerStitchingModule", FakeCut)
    calls = []

    def fake_train_cut(module, dm, epochs, accelerator):
        calls.append(SimpleNamespace(module=module, dm=dm, epochs=epochs, accelerator=accelerator, levels=(
            logging.getLogger("pytorch_lightning").level, logging.getLogger("lightning_fabric").level)))
        return cut_result(module.layer_a, module.layer_b)

    monkeypatch.setattr(sweep, "train_cut", fake_train_cut)
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)  # seed_everything sets it; restored after the test
    return calls


def test_every_cut_lands_in_its_cell_with_the_names_of_its_layers(stand_ins):
    report = sweep.layer_sweep("net_a", "net_b", layers_a=[1, "blocks.3"], layers_b=["stem", 2, 4], out=None,
                               progress=False)
    assert (report.model_a, report.model_b, report.target, report.metric) == ("net_a", "net_b", "soft",
                                                                            "agreement with B")
    assert report.layers_a == ["blocks.0", "blocks.3"] and report.layers_b == ["stem", "blocks.1", "blocks.3"]
    assert [call.module.args for call in stand_ins] == [
        ("net_a", "net_b", a, b) for a in (1, "blocks.3") for b in ("stem", 2, 4)]
    expected = [[cut_result(a, b) for b in report.layers_b] for a in report.layers_a]
    for key in ("score", "penalty", "agreement"):
        assert getattr(report, key) == [[cell[key] for cell in row] for row in expected]
    assert report.b_score == 0.875
    assert len({v for row in report.score for v in row}) == 6


def test_options_reach_the_data_every_cut_and_its_training(stand_ins):
    report = sweep.layer_sweep("net_a", "net_b", ["blocks.1"], ["blocks.2", "blocks.3"], target="labels",
                               source="fashion_mnist", n_train=40, n_val=24, image_size=64, batch_size=8, epochs=5,
                               lr=0.25, out=None, init="identity", seed=7, cache_dir="/some/cache", accelerator="gpu",
                               progress=False)
    [dm] = FakeData.made
    assert dm.kwargs == dict(source="fashion_mnist", n_train=40, n_val=24, image_size=64, seed=7, batch_size=8,
                             cache_dir="/some/cache")
    assert [cut.kwargs for cut in FakeCut.made] == [dict(target="labels", init="identity", lr=0.25)] * 2
    assert [(call.dm, call.epochs, call.accelerator) for call in stand_ins] == [(dm, 5, "gpu")] * 2
    assert report.metric == "accuracy" and report.target == "labels" and report.epochs == 5


def test_every_cut_starts_from_the_seed(stand_ins):
    torch.manual_seed(7)
    expected = torch.rand(1).item()
    sweep.layer_sweep("net_a", "net_b", ["blocks.1", "blocks.2"], ["blocks.2", "blocks.3"], seed=7, out=None,
                      progress=False)
    assert [cut.draw for cut in FakeCut.made] == [expected] * 4


def test_the_defaults_sweep_lite0s_blocks_into_lite2s_and_write_runs_layer_sweep(stand_ins, monkeypatch, tmp_path):
    """The defaults the README's example spells out: Lite0 blocks.2/4/6 into Lite2's, into runs/layer_sweep."""
    monkeypatch.chdir(tmp_path)
    report = sweep.layer_sweep(progress=False)
    [dm] = FakeData.made
    assert dm.kwargs == dict(source="scenes", n_train=512, n_val=256, image_size=128, seed=0, batch_size=32,
                             cache_dir=None)
    layers = ["blocks.2", "blocks.4", "blocks.6"]
    assert [cut.args for cut in FakeCut.made] == [("efficientnet_lite0", "efficientnet_lite2", a, b)
                                                  for a in layers for b in layers]
    assert [cut.kwargs for cut in FakeCut.made] == [dict(target="soft", init="lstsq", lr=1e-3)] * 9
    assert {(call.epochs, call.accelerator) for call in stand_ins} == {(3, "cpu")}
    assert (report.model_a, report.model_b, report.metric) == ("efficientnet_lite0", "efficientnet_lite2",
                                                               "agreement with B")
    assert json.loads((tmp_path / "runs" / "layer_sweep" / "penalty.json").read_text())["layers_b"] == layers
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]


def test_the_report_goes_to_out_and_nothing_is_written_without_it(stand_ins, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    report = sweep.layer_sweep("net_a", "net_b", ["stem"], ["blocks.1"], out=None, progress=False)
    assert list(tmp_path.iterdir()) == []
    again = sweep.layer_sweep("net_a", "net_b", ["stem"], ["blocks.1"], out=str(tmp_path / "here"), progress=False)
    assert json.loads((tmp_path / "here" / "penalty.json").read_text()) == json.loads(json.dumps(again.to_dict()))
    assert report.score == again.score == [[0.02]]  # stem is row 0, blocks.1 column 2


def test_the_sweep_times_itself(stand_ins, monkeypatch):
    clock = iter([100.0, 112.5])
    monkeypatch.setattr(sweep, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    report = sweep.layer_sweep("net_a", "net_b", ["stem"], ["blocks.1"], out=None, progress=False)
    assert report.seconds == 12.5


def test_each_cut_is_logged_with_its_models_layers_score_and_penalty(stand_ins, caplog):
    with caplog.at_level(logging.INFO, logger="prh_stitch.layer_stitch"):
        sweep.layer_sweep("net_a", "net_b", [1], ["blocks.2", 4], out=None, progress=False)
    messages = [r.getMessage() for r in caplog.records if r.name == "prh_stitch.layer_stitch"]
    assert messages == ["net_a blocks.0 -> net_b blocks.2: score 0.1300, penalty +0.7450",
                        "net_a blocks.0 -> net_b blocks.3: score 0.1400, penalty +0.7350"]


def test_the_progress_bar_counts_cuts_against_their_total(stand_ins, capsys):
    sweep.layer_sweep("net_a", "net_b", ["stem", "blocks.0"], ["blocks.1", "blocks.2", "blocks.3"], out=None)
    err = capsys.readouterr().err
    last = re.split(r"[\r\n]", err.strip())[-1]
    assert re.fullmatch(r"layer sweep: cuts trained: 100%\|.*\| 6/6 \[[^\]]*, (\?|[\d.]+)(cut/s|s/cut)\]", last), last
    sweep.layer_sweep("net_a", "net_b", ["stem"], ["blocks.1"], out=None, progress=False)
    assert capsys.readouterr().err == ""


def test_lightning_is_quiet_during_the_cuts_and_its_levels_come_back_even_after_an_error(stand_ins, monkeypatch):
    lightning, fabric = logging.getLogger("pytorch_lightning"), logging.getLogger("lightning_fabric")
    levels = lightning.level, fabric.level
    try:
        lightning.setLevel(logging.DEBUG)
        fabric.setLevel(logging.INFO)
        sweep.layer_sweep("net_a", "net_b", ["stem"], ["blocks.1", "blocks.2"], out=None, progress=False)
        assert [call.levels for call in stand_ins] == [(logging.WARNING, logging.WARNING)] * 2
        assert (lightning.level, fabric.level) == (logging.DEBUG, logging.INFO)

        def failing(*args):
            raise RuntimeError("a cut failed")

        monkeypatch.setattr(sweep, "train_cut", failing)
        with pytest.raises(RuntimeError, match="a cut failed"):
            sweep.layer_sweep("net_a", "net_b", ["stem"], ["blocks.1"], out=None, progress=False)
        assert (lightning.level, fabric.level) == (logging.DEBUG, logging.INFO)
    finally:
        lightning.setLevel(levels[0])
        fabric.setLevel(levels[1])


@pytest.mark.parametrize("layers_a, layers_b", [([], ["stem"]), (["stem"], []), ([], [])])
def test_an_empty_layer_list_is_refused_in_one_line_before_anything_is_built(stand_ins, layers_a, layers_b):
    with pytest.raises(ValueError) as error:
        sweep.layer_sweep("net_a", "net_b", layers_a, layers_b, out=None, progress=False)
    assert str(error.value) == "give at least one layer of each model to sweep (layers_a and layers_b)"
    assert FakeData.made == [] and FakeCut.made == []


# ---- the penalty figure ---------------------------------------------------------------------------------------------

def report_of(penalty, layers_a=("x", "y"), layers_b=("p", "q", "r"), metric="accuracy"):
    return SweepReport("net_a", "net_b", "labels", metric, layers_a=list(layers_a), layers_b=list(layers_b),
                       score=penalty, penalty=penalty, agreement=penalty)


def test_the_penalty_figure_shows_every_cell_in_a_range_from_zero():
    # All positive: the colour range still starts at 0. 0.4 is exactly half the maximum (black: strictly above
    # half is white); 0.3 lies between a third and a half of it (black).
    penalty = [[0.2, 0.4, 0.8], [0.3, 0.25, 0.5]]
    fig = penalty_figure(report_of(penalty))
    ax, image = fig.axes[0], fig.axes[0].images[0]
    np.testing.assert_array_equal(image.get_array(), np.array(penalty))
    assert image.get_clim() == (0.0, 0.8) and image.get_cmap().name == "magma_r"
    assert np.allclose(fig.get_size_inches(), (1.2 + 1.1 * 3, 1.0 + 0.8 * 2))
    labels = ax.get_xticklabels()
    assert [t.get_text() for t in labels] == ["p", "q", "r"] and list(ax.get_xticks()) == [0, 1, 2]
    assert [(t.get_rotation(), t.get_ha()) for t in labels] == [(45.0, "right")] * 3
    assert [t.get_text() for t in ax.get_yticklabels()] == ["x", "y"] and list(ax.get_yticks()) == [0, 1]
    texts = [(t.get_text(), t.get_position(), t.get_color(), t.get_ha(), t.get_va()) for t in ax.texts]
    assert texts == [(f"{v:.2f}", (j, i), "white" if v > 0.4 else "black", "center", "center")
                     for i, row in enumerate(penalty) for j, v in enumerate(row)]
    assert [t[2] for t in texts] == ["black", "black", "white", "black", "black", "white"]
    assert (ax.get_xlabel(), ax.get_ylabel(), ax.get_title()) == (
        "B = net_b (resumes after)", "A = net_a (cut at)", "stitching penalty (accuracy)")
    assert len(fig.axes) == 2 and image.colorbar is not None and image.colorbar.ax is fig.axes[1]
    assert image.colorbar.mappable is image and (image.colorbar.vmin, image.colorbar.vmax) == (0.0, 0.8)


def test_the_penalty_figure_range_reaches_negative_penalties_and_a_flat_matrix_keeps_a_range():
    fig = penalty_figure(report_of([[-0.3, 0.6]], layers_a=["x"], layers_b=["p", "q"]))
    assert fig.axes[0].images[0].get_clim() == (-0.3, 0.6)
    assert np.allclose(fig.get_size_inches(), (1.2 + 1.1 * 2, 1.0 + 0.8 * 1))
    flat = penalty_figure(report_of([[0.0], [0.0], [0.0]], layers_a=["x", "y", "z"], layers_b=["p"]))
    assert flat.axes[0].images[0].get_clim() == (0.0, 1e-6)
    assert np.allclose(flat.get_size_inches(), (1.2 + 1.1 * 1, 1.0 + 0.8 * 3))
    assert [t.get_color() for t in flat.axes[0].texts] == ["black"] * 3  # 0 is not above half of 0


# ---- the report files -----------------------------------------------------------------------------------------------

def two_by_two():
    return SweepReport("net/a", "net_b", "soft", "agreement with B", layers_a=["blocks.1", "layer 2"],
                       layers_b=["stem", "head/fc"], b_score=0.875, score=[[0.5, 0.25], [0.125, 0.75]],
                       penalty=[[0.375, 0.625], [0.75, 0.125]], agreement=[[0.5, 0.5], [1.0, 0.0]], epochs=2,
                       seconds=3.5)


def test_the_json_and_csv_hold_every_cut(tmp_path):
    out = tmp_path / "sweep"
    paths = write_sweep_report(two_by_two(), out)
    assert paths == {"json": out / "penalty.json", "csv": out / "penalty.csv", "png": out / "penalty.png",
                     "pdf": out / "penalty.pdf", "tensorboard": out / "tensorboard"}
    assert all(path.exists() for path in paths.values())
    assert json.loads((out / "penalty.json").read_text()) == {
        "model_a": "net/a", "model_b": "net_b", "target": "soft", "metric": "agreement with B",
        "layers_a": ["blocks.1", "layer 2"], "layers_b": ["stem", "head/fc"], "b_score": 0.875,
        "score": [[0.5, 0.25], [0.125, 0.75]], "penalty": [[0.375, 0.625], [0.75, 0.125]],
        "agreement": [[0.5, 0.5], [1.0, 0.0]], "epochs": 2, "seconds": 3.5}
    assert (out / "penalty.csv").read_text() == (
        "layer_a,layer_b,score,b_score,penalty,agreement\n"
        "blocks.1,stem,0.5,0.875,0.375,0.5\n"
        "blocks.1,head/fc,0.25,0.875,0.625,0.5\n"
        "layer 2,stem,0.125,0.875,0.75,1.0\n"
        "layer 2,head/fc,0.75,0.875,0.125,0.0\n")
    with open(out / "penalty.csv", newline="") as handle:
        assert len(list(csv.DictReader(handle))) == 4
    assert (out / "penalty.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "penalty.pdf").read_bytes()[:5] == b"%PDF-"


def test_a_rewritten_report_replaces_the_folder_whole(tmp_path):
    out = tmp_path / "sweep"
    write_sweep_report(two_by_two(), out)
    (out / "stale.txt").write_text("from an earlier run")
    report = two_by_two()
    report.penalty = [[0.0, 0.0], [0.0, 0.5]]
    write_sweep_report(report, out)
    assert not (out / "stale.txt").exists()
    assert json.loads((out / "penalty.json").read_text())["penalty"] == [[0.0, 0.0], [0.0, 0.5]]


def test_tensorboard_gets_the_heatmap_and_every_cuts_penalty(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "sweep"
    write_sweep_report(two_by_two(), out)
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    assert events.Tags()["images"] == ["layer_sweep/penalty"]
    [image] = events.Images("layer_sweep/penalty")
    assert image.encoded_image_string == (out / "penalty.png").read_bytes()
    scalars = {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    assert scalars == {"penalty/blocks.1__stem": [0.375], "penalty/blocks.1__head_fc": [0.625],
                       "penalty/layer_2__stem": [0.75], "penalty/layer_2__head_fc": [0.125]}


def test_records_are_the_cuts_in_row_major_order():
    records = two_by_two().records
    assert records == [
        {"layer_a": "blocks.1", "layer_b": "stem", "score": 0.5, "b_score": 0.875, "penalty": 0.375,
         "agreement": 0.5},
        {"layer_a": "blocks.1", "layer_b": "head/fc", "score": 0.25, "b_score": 0.875, "penalty": 0.625,
         "agreement": 0.5},
        {"layer_a": "layer 2", "layer_b": "stem", "score": 0.125, "b_score": 0.875, "penalty": 0.75,
         "agreement": 1.0},
        {"layer_a": "layer 2", "layer_b": "head/fc", "score": 0.75, "b_score": 0.875, "penalty": 0.125,
         "agreement": 0.0}]
