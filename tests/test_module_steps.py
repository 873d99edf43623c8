"""The Lightning module's steps, one at a time and fast: tiny random encoders, a few dozen planted feature rows,
Trainers with no checkpointing or progress bar, and step methods called directly where no trainer is needed.

Each test checks what a step computes (the loss it returns and logs, the whole-set scores it reports, the
optimizer and schedule it configures) against an independent recompute, so a mutation of a step cannot pass.
"""

import math

import pytest
import torch
from pytorch_lightning import Callback, Trainer
from pytorch_lightning.loggers.logger import Logger

from prh_stitch.closed_form import ClosedFormResult
from prh_stitch.evaluation.captions import caption_retrieval, logged_scores
from prh_stitch.losses import Diverged
from test_train import PlantedPairs, tiny_module

LR = 0.01


class MemoryLogger(Logger):
    """Every ``log_metrics`` call, in memory: what a real logger (TensorBoard, CSV) would be given."""

    def __init__(self):
        super().__init__()
        self.rows = []

    @property
    def name(self):
        return "memory"

    @property
    def version(self):
        return 0

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.rows.append((step, dict(metrics)))

    def keys(self):
        return {key for _, metrics in self.rows for key in metrics}

    def values(self, key):
        return [metrics[key] for _, metrics in self.rows if key in metrics]


def small_data(tmp_path, **kwargs):
    """48 training rows in batches of 32 and 16, 40 validation rows (32 + 8), 24 test rows: unequal batches, so an
    epoch mean that ignored the batch sizes would differ from the row mean."""
    sizes = dict(n_train=48, n_val=40, n_test=24, batch_size=32)
    sizes.update(kwargs)
    return PlantedPairs(tmp_path / "cache", **sizes)


def loaded(model, data):
    """The data module with its planted features in place and the module's normalisation fitted, no Trainer."""
    data.setup_features(*model.feature_requests())
    model.stitcher.fit_normalization(*data.training_tensors())
    for split, metric in (("val", model.val_retrieval), ("test", model.test_retrieval)):
        metric.set_split(data.captions[split], data.train_captions())
    return data


def small_trainer(tmp_path, callbacks=(), **kwargs):
    options = dict(max_epochs=1, accelerator="cpu", devices=1, logger=MemoryLogger(), enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                   log_every_n_steps=1, default_root_dir=str(tmp_path))
    options.update(kwargs)
    return Trainer(callbacks=list(callbacks), **options)


def rows(data, split, start=0, stop=None):
    return [t[start:stop] for t in data.datasets[split].tensors]


def weighted_loss(model, data, split):
    """The row-weighted mean of the objective over the split's batches of 32, recomputed here."""
    source, target, _, _ = data.datasets[split].tensors
    total = 0.0
    with torch.no_grad():
        for start in range(0, len(source), 32):
            pred = model.stitcher(source[start:start + 32])
            total += float(model.objective(pred, target[start:start + 32])) * len(pred)
    return total / len(source)


# ---------------------------------------------------------------- training_step

@pytest.mark.parametrize("objective", ["contrastive", "mse", "cosine"])
def test_a_training_step_returns_its_batch_objective_and_a_gradient_step_on_it_lowers_it(tmp_path, objective):
    torch.manual_seed(0)
    model = tiny_module(objective={"name": objective})
    data = loaded(model, small_data(tmp_path))
    batch = rows(data, "train", 0, 16)
    loss = model.training_step(batch, 0)
    with torch.no_grad():
        expected = model.objective(model.stitcher(batch[0]), batch[1])
    assert loss.requires_grad and float(loss.detach()) == pytest.approx(float(expected), rel=1e-6)
    # Descending the returned value lowers the objective: it is the loss itself, not its negation or a copy.
    optimizer = torch.optim.SGD(model.stitcher.parameters(), lr=0.05)
    before = [p.detach().clone() for p in model.stitcher.parameters()]
    loss.backward()
    optimizer.step()
    assert any(not torch.equal(b, p) for b, p in zip(before, model.stitcher.parameters()))
    with torch.no_grad():
        assert float(model.objective(model.stitcher(batch[0]), batch[1])) < float(expected)


def test_a_streamed_batch_is_encoded_by_the_module_before_the_stitcher(tmp_path, monkeypatch):
    """A dict batch (data.mode stream) holds raw inputs: the step encodes them (encode_streamed_batch) and the
    loss is the objective of the stitched encoded features."""
    torch.manual_seed(0)
    model = tiny_module()
    data = loaded(model, small_data(tmp_path))
    source, target, _, _ = rows(data, "train", 0, 12)
    seen = []

    def encode(batch):
        seen.append(batch)
        return source, target

    monkeypatch.setattr(model, "encode_streamed_batch", encode)
    batch = {"inputs": {"source": "raw images", "target": "raw texts"}, "key": [str(i) for i in range(12)]}
    loss = model.training_step(batch, 0)
    assert seen == [batch]
    with torch.no_grad():
        assert float(loss) == pytest.approx(float(model.objective(model.stitcher(source), target)), rel=1e-6)


class StepRecord(Callback):
    """Per training step: the loss the step returned, the logged step loss, and the temperature it used."""

    def __init__(self):
        self.returned, self.logged, self.temperatures = [], [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.temperatures.append(float(pl_module.objective.temperature))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.returned.append((float(outputs["loss"]), len(batch[0])))
        self.logged.append(float(trainer.callback_metrics["train/loss_step"]))


def test_training_logs_the_step_loss_its_row_weighted_epoch_mean_and_the_epoch_mean_temperature(tmp_path):
    torch.manual_seed(0)
    model, data, record = tiny_module(), small_data(tmp_path), StepRecord()
    trainer = small_trainer(tmp_path, callbacks=[record])
    trainer.fit(model, datamodule=data)
    assert [n for _, n in record.returned] == [32, 16]
    assert record.logged == pytest.approx([loss for loss, _ in record.returned], rel=1e-6)
    epoch_mean = sum(loss * n for loss, n in record.returned) / 48
    metrics = trainer.callback_metrics
    assert float(metrics["train/loss_epoch"]) == pytest.approx(epoch_mean, rel=1e-6)
    temperature = sum(t * n for t, n in zip(record.temperatures, (32, 16))) / 48
    assert float(metrics["train/temperature"]) == pytest.approx(temperature, rel=1e-6)
    # The temperature is an epoch mean only; the loss is shown per step and per epoch on the progress bar.
    assert {k for k in metrics if k.startswith("train/")} == {"train/loss", "train/loss_step", "train/loss_epoch",
                                                               "train/temperature"}
    assert {k for k in trainer.progress_bar_metrics if k.startswith("train/")} == {"train/loss_step",
                                                                                   "train/loss_epoch"}
    logger = trainer.logger
    assert logger.values("train/loss_step") == pytest.approx(record.logged, rel=1e-6)
    assert [step for step, m in logger.rows if "train/loss_step" in m] == [0, 1]
    assert logger.values("train/temperature") == [pytest.approx(temperature, rel=1e-6)]


def test_an_objective_without_a_temperature_logs_no_temperature(tmp_path):
    model, data = tiny_module(objective={"name": "mse"}), small_data(tmp_path)
    trainer = small_trainer(tmp_path)
    trainer.fit(model, datamodule=data)
    assert "train/loss_epoch" in trainer.callback_metrics
    assert not any("temperature" in k for k in trainer.callback_metrics)


class NaNStitcherAt(Callback):
    """Breaks the stitcher (NaN weights) before a chosen training batch or before validation."""

    def __init__(self, batch=None, validation=False):
        self.batch, self.validation = batch, validation

    def _break(self, pl_module):
        with torch.no_grad():
            pl_module.stitcher.core.weight.fill_(float("nan"))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.batch:
            self._break(pl_module)

    def on_validation_epoch_start(self, trainer, pl_module):
        if self.validation:
            self._break(pl_module)


@pytest.mark.parametrize("where", ["train", "val"])
def test_a_diverged_stitcher_is_reported_with_the_global_step_and_the_learning_rate(tmp_path, where):
    """Batch 1 of training runs at global step 1; validation after the first epoch at step 2."""
    torch.manual_seed(0)
    model, data = tiny_module(), small_data(tmp_path)
    breaker = NaNStitcherAt(batch=1) if where == "train" else NaNStitcherAt(validation=True)
    trainer = small_trainer(tmp_path, callbacks=[breaker])
    step = 1 if where == "train" else 2
    with pytest.raises(Diverged, match=rf"^training diverged at step {step} \(lr 0\.01\): the stitcher's outputs "
                                        rf"for (32|16) of (32|16) rows are not finite"):
        trainer.fit(model, datamodule=data)


def test_an_evaluation_step_on_a_diverged_stitcher_names_the_run_not_the_data(tmp_path):
    model = tiny_module()
    data = loaded(model, small_data(tmp_path))
    with torch.no_grad():
        model.stitcher.core.weight.fill_(float("inf"))
    for stage in ("val", "test"):
        with pytest.raises(Diverged, match=r"^training diverged at step 0 \(lr 0\.01\)"):
            model._evaluation_step(stage, rows(data, stage, 0, 8))


# ---------------------------------------------------------------- validation and test

class ValidationRecord(Callback):
    def __init__(self):
        self.stitchers = []

    def on_validation_epoch_start(self, trainer, pl_module):
        # The stitcher and the objective (its temperature enters the validation loss) as validation ran them.
        self.stitchers.append({k: v.clone() for k, v in pl_module.state_dict().items()})


def test_validation_logs_the_row_weighted_loss_and_the_whole_set_scores_of_the_stitcher_it_ran(tmp_path):
    torch.manual_seed(0)
    model, data, record = tiny_module(), small_data(tmp_path), ValidationRecord()
    trainer = small_trainer(tmp_path, max_epochs=2, callbacks=[record])
    trainer.fit(model, datamodule=data)
    assert len(record.stitchers) == 2
    logger = trainer.logger
    val_rows = [(step, m) for step, m in logger.rows if "val/loss" in m]
    assert [step for step, _ in val_rows] == [1, 3]  # after each epoch's two steps
    source, target, _, _ = data.datasets["val"].tensors
    for state, (_, logged) in zip(record.stitchers, val_rows):
        model.load_state_dict(state)
        with torch.no_grad():
            scores = caption_retrieval(model.stitcher.eval()(source), target, data.captions["val"],
                                       data.train_captions())
        expected = logged_scores("val", scores)
        assert logged["val/loss"] == pytest.approx(weighted_loss(model, data, "val"), rel=1e-5)
        assert set(logged) - {"val/loss", "epoch"} == set(expected)
        for key, value in expected.items():
            assert logged[key] == pytest.approx(value, abs=1e-6), key
        assert scores["subsets"]["all"]["n"] == 40
    # val/r@1 is for the progress bar only; the logger gets the full names, the progress bar only the short one.
    assert "val/r@1" not in logger.keys()
    assert float(trainer.progress_bar_metrics["val/r@1"]) == pytest.approx(val_rows[-1][1]["val/recall@1"])
    assert not any(k.startswith("val/") and k != "val/r@1" for k in trainer.progress_bar_metrics)
    assert float(trainer.callback_metrics["val/r@1"]) == pytest.approx(val_rows[-1][1]["val/recall@1"])
    assert not any(k.startswith("closed_form/") for k in logger.keys())  # a gradient run chose nothing


def test_the_test_pass_keeps_and_logs_the_whole_set_test_scores(tmp_path):
    torch.manual_seed(0)
    model, data = tiny_module(), small_data(tmp_path)
    trainer = small_trainer(tmp_path)
    trainer.fit(model, datamodule=data)
    assert model.test_scores is None  # fitting never touches the test split
    trainer.test(model, datamodule=data, verbose=False)
    source, target, _, _ = data.datasets["test"].tensors
    with torch.no_grad():
        expected = caption_retrieval(model.stitcher.eval()(source), target, data.captions["test"],
                                     data.train_captions())
    for name, subset in expected["subsets"].items():
        assert model.test_scores["subsets"][name] == pytest.approx(subset, abs=1e-6), name
    for key in ("a2b/recall@1", "a2b/recall@5", "b2a/recall@1", "a2b/mean_rank", "mean_cosine"):
        assert model.test_scores[key] == pytest.approx(expected[key], abs=1e-6), key
    logged = trainer.logger.rows[-1][1]
    assert logged["test/loss"] == pytest.approx(weighted_loss(model, data, "test"), rel=1e-5)
    for key, value in logged_scores("test", expected).items():
        assert logged[key] == pytest.approx(value, abs=1e-6), key
    assert "test/r@1" not in trainer.callback_metrics and not any(k.startswith("val/") for k in logged)
    # A second test pass starts afresh (the metric was reset): the same scores, not those of twice the rows.
    first = model.test_scores
    trainer.test(model, datamodule=data, verbose=False)
    assert model.test_scores["subsets"]["all"]["n"] == 24
    assert model.test_scores["a2b/recall@1"] == pytest.approx(first["a2b/recall@1"])


@pytest.mark.parametrize("stage", ["val", "test"])
def test_evaluation_drops_the_samplers_padded_repeats_and_orders_rows_by_sample_index(tmp_path, stage):
    """Under DDP the sampler pads the last rank's share with repeats of the first samples, and ranks interleave
    their rows: the steps pass each row's sample index, so the scores are those of the split once, in order."""
    torch.manual_seed(0)
    model = tiny_module()
    data = loaded(model, small_data(tmp_path))
    source, target, index, group = data.datasets[stage].tensors
    n = len(source)
    # Two "ranks" of a 3-way sampler: strided rows, the last share padded with the first two samples again.
    order = torch.cat([torch.arange(1, n, 2), torch.arange(0, n, 2), torch.tensor([0, 1])])
    for start in range(0, len(order), 16):
        part = order[start:start + 16]
        model._evaluation_step(stage, [source[part], target[part], index[part], group[part]])
    scores = model._evaluation_epoch_end(stage)
    with torch.no_grad():
        expected = caption_retrieval(model.stitcher.eval()(source), target, data.captions[stage],
                                     data.train_captions())
    assert scores["subsets"]["all"]["n"] == n
    for key in ("a2b/recall@1", "a2b/recall@5", "b2a/recall@1", "a2b/mean_rank", "mean_cosine"):
        assert scores[key] == pytest.approx(expected[key], abs=1e-6), key
    for name, subset in expected["subsets"].items():
        assert scores["subsets"][name] == pytest.approx(subset, abs=1e-6), name
    # Rows sharing a caption count as correct for each other (the groups reach the metric): planted pairs of rows
    # share one, so the grouped recall exceeds the recall that counts only the row itself.
    with torch.no_grad():
        from prh_stitch.metrics import retrieval

        ungrouped = retrieval(model.stitcher(source), target)
    assert expected["a2b/recall@5"] > ungrouped["a2b/recall@5"]
    # The metric starts afresh for the next epoch: its scores are those of the stitcher as it is then.
    with torch.no_grad():
        model.stitcher.core.weight.mul_(-1.0)
        expected = caption_retrieval(model.stitcher(source), target, data.captions[stage], data.train_captions())
    model._evaluation_step(stage, [source, target, index, group])
    assert model._evaluation_epoch_end(stage)["mean_cosine"] == pytest.approx(expected["mean_cosine"], abs=1e-6)
    assert expected["mean_cosine"] != pytest.approx(scores["mean_cosine"], abs=1e-3)


def test_validation_logs_what_the_closed_form_selection_chose(tmp_path):
    model = tiny_module()
    data = loaded(model, small_data(tmp_path))  # validate() alone fits no normalisation
    model.closed_form_result = ClosedFormResult(method="ridge", ridge=0.25, gain=1.5, whiten=0.125)
    trainer = small_trainer(tmp_path)
    trainer.validate(model, datamodule=data, verbose=False)
    logged = {k: v for _, m in trainer.logger.rows for k, v in m.items() if k.startswith("closed_form/")}
    assert logged == {"closed_form/ridge": 0.25, "closed_form/gain": 1.5, "closed_form/whiten": 0.125}
    model.closed_form_result = ClosedFormResult(method="lstsq")  # nothing chosen: nothing logged
    trainer = small_trainer(tmp_path)
    trainer.validate(model, datamodule=data, verbose=False)
    assert not any(k.startswith("closed_form/") for k in trainer.logger.keys())
    assert "val/recall@1" in trainer.logger.keys()


# ---------------------------------------------------------------- optimisation

def lrs_over(model, estimated_steps, n):
    from types import SimpleNamespace

    model._trainer = SimpleNamespace(estimated_stepping_batches=estimated_steps, global_step=0)
    config = model.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    seen = []
    for _ in range(n):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return seen, config


@pytest.mark.parametrize("estimated, expected", [
    (0, [LR, 0.0, 0.0]),  # no steps estimated: a schedule of one step
    (1, [LR, 0.0, 0.0]),
    (2, [LR, LR / 2, 0.0]),
    (2.9, [LR, LR / 2, 0.0]),  # Lightning's estimate is rounded down
])
def test_cosine_without_warmup_decays_from_the_peak_over_the_estimated_steps(estimated, expected):
    seen, _ = lrs_over(tiny_module(), estimated, 3)
    assert seen == [pytest.approx(v, abs=1e-12) for v in expected]


def test_warmup_as_long_as_the_run_ends_at_the_peak_and_then_decays_at_once():
    seen, _ = lrs_over(tiny_module(warmup_steps=3), 3, 5)
    assert seen == [pytest.approx(v, abs=1e-12) for v in (LR / 3, 2 * LR / 3, LR, LR, 0.0)]
    seen, _ = lrs_over(tiny_module(warmup_steps=2), 3, 4)
    assert seen == [pytest.approx(v, abs=1e-12) for v in (LR / 2, LR, LR, 0.0)]
    seen, _ = lrs_over(tiny_module(warmup_steps=2, schedule="constant"), 3, 5)
    assert seen == [pytest.approx(v, abs=1e-12) for v in (LR / 2, LR, LR, LR, LR)]


def test_a_fixed_temperature_leaves_one_parameter_group_the_stitcher_with_weight_decay():
    model = tiny_module(objective={"name": "contrastive", "options": {"learn_temperature": False}},
                        weight_decay=0.3)
    _, config = lrs_over(model, 10, 1)
    optimizer = config["optimizer"]
    assert isinstance(optimizer, torch.optim.AdamW)
    (group,) = optimizer.param_groups
    assert {id(p) for p in group["params"]} == {id(p) for p in model.stitcher.parameters()}
    assert group["weight_decay"] == 0.3 and group["initial_lr"] == LR
    model = tiny_module(objective={"name": "mse"})
    _, config = lrs_over(model, 10, 1)
    assert len(config["optimizer"].param_groups) == 1 and config["optimizer"].param_groups[0]["weight_decay"] == 0.0


def test_an_adamw_step_on_the_training_loss_moves_the_stitcher_downhill(tmp_path):
    """The configured optimizer applied to the step's loss lowers that loss on the same batch."""
    torch.manual_seed(0)
    model = tiny_module()
    data = loaded(model, small_data(tmp_path))
    _, config = lrs_over(model, 10, 0)
    optimizer = config["optimizer"]
    model._trainer = None  # the step below logs nothing without a real Trainer
    batch = rows(data, "train", 0, 32)
    first = model.training_step(batch, 0)
    first.backward()
    optimizer.step()
    with torch.no_grad():
        assert float(model.training_step(batch, 0)) < float(first)


def test_a_closed_form_run_configures_its_solve_as_the_only_optimizer_step(tmp_path):
    model = tiny_module(stitcher={"name": "affine", "fit": "ridge", "closed_form": {"ridge": 0.5, "gain": None,
                                                                                  "whiten": None}})
    optimizer = model.configure_optimizers()
    assert type(optimizer).__name__ == "ClosedFormStep"
    assert [g["lr"] for g in optimizer.param_groups] == [0.0]
    assert {id(p) for p in optimizer.param_groups[0]["params"]} == {id(p) for p in model.stitcher.parameters()}
    assert model.automatic_optimization is False
    # Its step is the closed-form fit on the data module's training split, as fit_closed_form does it directly.
    from types import SimpleNamespace

    from prh_stitch.closed_form import fit_closed_form
    from prh_stitch.stitchers import Stitcher

    data = loaded(model, small_data(tmp_path))
    reference = Stitcher(**model.stitcher.config())
    reference.load_state_dict(model.stitcher.state_dict())
    model._trainer = SimpleNamespace(datamodule=data)
    optimizer.step()
    val_source, val_target, _, val_groups = data.datasets["val"].tensors
    expected = fit_closed_form(reference, data.training_tensors(), "ridge", val=(val_source, val_target),
                               val_groups=val_groups, ridge=0.5, gain=None, whiten=None)
    assert model.closed_form_result.ridge == expected.ridge == 0.5
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(model.stitcher.state_dict()[key], value)
    assert not torch.equal(model.stitcher.core.weight, Stitcher(**model.stitcher.config()).core.weight)


# ---------------------------------------------------------------- two processes

class ValidationLoss(Callback):
    def __init__(self):
        self.loss, self.state = None, None

    def on_validation_end(self, trainer, pl_module):
        self.loss = float(trainer.callback_metrics["val/loss"])
        self.state = {k: v.clone() for k, v in pl_module.state_dict().items()}


def _ddp_loss_worker(rank, world, root):
    import os

    import torch.distributed as dist

    os.environ.update(LOCAL_RANK=str(rank), NODE_RANK="0", WORLD_SIZE=str(world))
    dist.init_process_group("gloo", init_method=f"file://{root}/rendezvous", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        torch.set_num_threads(1)
        model, data, seen = tiny_module(), small_data(root, n_val=41), ValidationLoss()
        small_trainer(root, callbacks=[seen], strategy="ddp", devices=world, logger=False).fit(model, datamodule=data)
        torch.save({"loss": seen.loss, "state": seen.state}, root / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_process_validation_loss_is_the_row_weighted_mean_over_both_ranks_on_every_rank(tmp_path):
    """41 validation rows on 2 ranks: rank 0 holds rows 0, 2, ..., 40, rank 1 rows 1, 3, ..., 39 and the sampler's
    repeat of row 0. The logged loss is synchronised: the same on both ranks, the mean over all 42 rows served."""
    import torch.multiprocessing as mp

    mp.spawn(_ddp_loss_worker, args=(2, tmp_path), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    model, data = tiny_module(), small_data(tmp_path / "reference", n_val=41)
    data.setup_features(*model.feature_requests())
    model.load_state_dict(ranks[0]["state"])
    source, target, _, _ = data.datasets["val"].tensors
    with torch.no_grad():
        losses = [float(model.objective(model.stitcher.eval()(source[rows]), target[rows]))
                  for rows in (torch.arange(0, 41, 2), torch.cat([torch.arange(1, 41, 2), torch.tensor([0])]))]
    assert losses[0] != pytest.approx(losses[1], rel=1e-3)  # the ranks' own means differ
    for rank in ranks:
        assert rank["loss"] == pytest.approx((losses[0] + losses[1]) / 2, rel=1e-5)
