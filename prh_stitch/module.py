"""The LightningModule: two frozen encoders, one trainable stitcher, one objective.

The encoders are held but deliberately kept *outside* the module tree (not registered submodules): they run
once, before training, to fill the feature store, and after that training touches only cached features. So
they are never moved to the training device, never wrapped by DDP, never in the optimizer and never in a
checkpoint; the checkpoint stores their specs (name, layer, pooling, weights source) instead.

The exception is ``data.mode: stream`` (see ``prh_stitch.streamed``): training batches are then raw, and both
encoders run in every training step, on the training device, without gradients; they stay outside the module
tree all the same (not wrapped by DDP, not in the optimizer or the checkpoint).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, Optional, Union

import pytorch_lightning as pl
import torch
from torch import Tensor

from prh_stitch import __version__
from prh_stitch.checkpoint import CHECKPOINT_KEY
from prh_stitch.closed_form import METHODS as CLOSED_FORM_METHODS
from prh_stitch.closed_form import ClosedFormResult, check_ridge_grid, fit_closed_form
from prh_stitch.data.datamodule import FeatureRequest, StitchingDataModule
from prh_stitch.encoders import EncoderSpec, FrozenEncoder, encoder_from_spec
from prh_stitch.encoders.base import coerce_spec
from prh_stitch.losses import LOSSES, build_loss, check_stitched
from prh_stitch.stitchers import STITCHERS, Stitcher

CHECKPOINT_FORMAT = 1


FITS = ("gradient",) + CLOSED_FORM_METHODS
CLOSED_FORM_OPTIONS = ("ridge", "ridge_grid", "select_by", "scaling", "center", "precision", "gain", "whiten",
                       "unsupervised")  # unsupervised: closed_form/unsupervised.py's UnsupervisedOptions


@dataclass
class StitcherSpec:
    """Which stitcher to train: a registered name, normalisation of its input and output, core options.

    ``fit`` is how its weights are obtained: ``gradient`` (AdamW on the objective) or a closed form on the
    training features (``lstsq``, ``ridge``, ``procrustes``; ``linear``/``affine`` stitchers only), which takes
    no gradient steps: the run is one epoch whose single optimizer step is the solve (:class:`ClosedFormStep`),
    then validates once and writes its checkpoints. ``init`` starts a gradient fit from a closed form (fitted in
    ``setup``) instead of random weights. ``closed_form`` holds that fit's options (``ridge``, ``ridge_grid``,
    ``select_by``, ``scaling``, ``center``, ``precision``; see :mod:`prh_stitch.closed_form`); the ridge
    strength is chosen on the validation split by recall@1 unless ``ridge`` fixes it.
    """

    name: str = "linear"
    input_norm: str = "standard"
    output_norm: str = "none"
    options: Dict[str, Any] = field(default_factory=dict)
    fit: str = "gradient"
    init: Optional[str] = None
    closed_form: Dict[str, Any] = field(default_factory=dict)

    @property
    def closed_form_method(self) -> Optional[str]:
        """The closed form this spec runs (as the whole fit or as the initialisation), or None."""
        return self.fit if self.fit != "gradient" else self.init

    def check(self) -> None:
        if self.fit not in FITS:
            raise ValueError(f"unknown stitcher fit {self.fit!r}; choose one of {', '.join(FITS)}")
        if self.init is not None:
            if self.fit != "gradient":
                raise ValueError(f"stitcher init {self.init!r} applies to fit 'gradient' only; fit {self.fit!r} "
                                 "is already closed-form (drop init)")
            if self.init not in CLOSED_FORM_METHODS:
                raise ValueError(f"unknown stitcher init {self.init!r}; choose one of {', '.join(CLOSED_FORM_METHODS)} "
                                 "or null for the default random initialisation")
        unknown = sorted(set(self.closed_form) - set(CLOSED_FORM_OPTIONS))
        if unknown:
            raise ValueError(f"unknown closed_form option(s) {unknown}; valid: {list(CLOSED_FORM_OPTIONS)}")
        if self.closed_form_method is None:
            if self.closed_form:
                raise ValueError("closed_form options are set but neither fit nor init is a closed form "
                                 f"({', '.join(CLOSED_FORM_METHODS)})")
            return
        if self.name not in ("linear", "affine"):
            raise ValueError(f"closed-form fits ({self.closed_form_method}) need stitcher 'linear' or 'affine', "
                             f"not {self.name!r}")
        if "ridge_grid" in self.closed_form:
            check_ridge_grid(self.closed_form["ridge_grid"])


@dataclass
class ObjectiveSpec:
    """Training objective: ``mse``, ``cosine`` or ``contrastive``, with its options."""

    name: str = "contrastive"
    options: Dict[str, Any] = field(default_factory=dict)


class ClosedFormStep(torch.optim.Optimizer):
    """An "optimizer" whose one step is a closed-form fit of the stitcher.

    Lightning counts optimizer steps (``global_step``) and its checkpoint callbacks save only after steps, so a
    closed-form run takes exactly one: the solve. ``lr`` is 0 because no gradient is ever applied; it is there
    for callbacks such as LearningRateMonitor that read every optimizer's learning rate.
    """

    def __init__(self, params, solve: Callable[[], None]) -> None:
        super().__init__(params, {"lr": 0.0})
        self._solve = solve

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        self._solve()


@dataclass
class _EncoderPair:
    """Plain holder (not an nn.Module), so the encoders stay out of the module tree."""

    source: FrozenEncoder
    target: FrozenEncoder


class StitchingModule(pl.LightningModule):
    def __init__(
        self,
        source: Union[EncoderSpec, Dict[str, Any]] = EncoderSpec(name="efficientnet_lite0"),
        target: Union[EncoderSpec, Dict[str, Any]] = EncoderSpec(name="minilm_l6", pooling="mean"),
        stitcher: Union[StitcherSpec, Dict[str, Any]] = StitcherSpec(),
        objective: Union[ObjectiveSpec, Dict[str, Any]] = ObjectiveSpec(),
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        schedule: str = "cosine",
    ) -> None:
        """
        Args:
            source: the frozen encoder whose features are stitched (name, layer, pooling, weights).
            target: the frozen encoder whose feature space the stitcher maps into.
            stitcher: the trainable map from source to target features.
            objective: the training loss between stitched source and target features.
            lr: peak AdamW learning rate.
            weight_decay: AdamW weight decay.
            warmup_steps: linear warm-up steps before the schedule.
            schedule: ``cosine`` (decay to 0 over the run) or ``constant``.
        """
        super().__init__()
        self.source_spec = EncoderSpec.coerce(source)
        self.target_spec = EncoderSpec.coerce(target)
        self.stitcher_spec = coerce_spec(StitcherSpec, stitcher)
        self.objective_spec = coerce_spec(ObjectiveSpec, objective)
        if schedule not in ("cosine", "constant"):
            raise ValueError(f"unknown schedule {schedule!r}; choose 'cosine' or 'constant'")
        STITCHERS.get(self.stitcher_spec.name)  # fail on a bad name before loading any encoder
        self.stitcher_spec.check()
        LOSSES.get(self.objective_spec.name)
        # Plain dicts only: checkpoints must load with torch.load(weights_only=True).
        self.save_hyperparameters({
            "source": self.source_spec.to_dict(), "target": self.target_spec.to_dict(),
            "stitcher": asdict(self.stitcher_spec), "objective": asdict(self.objective_spec),
            "lr": lr, "weight_decay": weight_decay, "warmup_steps": warmup_steps, "schedule": schedule,
        })
        self.encoders = _EncoderPair(encoder_from_spec(self.source_spec), encoder_from_spec(self.target_spec))
        in_dim = self.encoders.source.feature_dim(self.source_spec.layer, self.source_spec.pooling)
        out_dim = self.encoders.target.feature_dim(self.target_spec.layer, self.target_spec.pooling)
        spec = self.stitcher_spec
        self.stitcher = Stitcher(spec.name, in_dim, out_dim, spec.input_norm, spec.output_norm, **spec.options)
        self.objective = build_loss(self.objective_spec.name, **self.objective_spec.options)
        from prh_stitch.evaluation.captions import SplitRetrieval

        # Exact whole-set scores of the held-out splits: val (every choice is made on it) and test (reported once).
        self.val_retrieval = SplitRetrieval(ks=(1, 5, 10))
        self.test_retrieval = SplitRetrieval(ks=(1, 5, 10))
        self.test_scores: Optional[Dict[str, Any]] = None  # caption_retrieval of the last test run
        self.closed_form_result: Optional[ClosedFormResult] = None
        if self.gradient_free:
            # The closed-form solve is this run's single optimizer step (see ClosedFormStep), taken by hand.
            self.automatic_optimization = False

    @property
    def gradient_free(self) -> bool:
        """True when the stitcher is fitted in closed form only (no gradient steps)."""
        return self.stitcher_spec.fit != "gradient"

    # ---- encoders and features ------------------------------------------------------------------
    @property
    def source_encoder(self) -> FrozenEncoder:
        return self.encoders.source

    @property
    def target_encoder(self) -> FrozenEncoder:
        return self.encoders.target

    def feature_requests(self):
        return (
            FeatureRequest(self.encoders.source, self.source_spec.layer, self.source_spec.pooling),
            FeatureRequest(self.encoders.target, self.target_spec.layer, self.target_spec.pooling),
        )

    def _datamodule(self) -> StitchingDataModule:
        dm = getattr(self.trainer, "datamodule", None)
        if not isinstance(dm, StitchingDataModule):
            raise TypeError("StitchingModule trains from cached features: pass a StitchingDataModule to the Trainer")
        return dm

    def prepare_data(self) -> None:
        # Once per node, before any process trains: extraction on the device this process will use.
        self._datamodule().prepare_features(list(self.feature_requests()), self.trainer.strategy.root_device)

    def setup(self, stage: str) -> None:
        dm = self._datamodule()
        if dm.mode == "stream":
            self._setup_stream(dm)
        dm.setup_features(*self.feature_requests())
        # Seen/unseen scores need each row's caption and the training split's captions.
        for split, metric in (("val", self.val_retrieval), ("test", self.test_retrieval)):
            metric.set_split(dm.captions[split], dm.train_captions())
        if stage == "fit" and dm.mode == "stream":
            from prh_stitch.streamed import fit_normalization_on_stream

            fit_normalization_on_stream(self.stitcher, dm.normalization_batches(), self.encode_streamed_batch,
                                        self.trainer.strategy.all_gather)
        elif stage == "fit":
            # Deterministic given the training features, so every rank fits the same statistics; a resumed run
            # then overwrites them with the checkpoint's (identical) ones.
            self.stitcher.fit_normalization(*dm.training_tensors())
            if self.stitcher_spec.init is not None:
                self._fit_closed_form(dm)  # the starting point of gradient training
            if self.gradient_free and self.trainer is not None:
                # A closed-form run is one epoch: its first batch takes the single "step" (the solve), then the epoch's
                # validation pass and the checkpoint callbacks run exactly as after gradient training. More epochs
                # would repeat the same solve.
                self.trainer.fit_loop.max_epochs = 1

    def on_fit_start(self) -> None:
        # Skipped samples never hide: every split's counts go to TensorBoard (zeros included, so "none" is visible).
        if self.logger is not None:
            metrics = {}
            for split, reasons in self._datamodule().skipped.items():
                metrics[f"data/{split}_skipped"] = float(sum(reasons.values()))
                metrics.update({f"data/{split}_skipped/{reason}": float(n) for reason, n in reasons.items()})
            if metrics:
                self.logger.log_metrics(metrics, step=0)

    def _setup_stream(self, dm: StitchingDataModule) -> None:
        if self.stitcher_spec.closed_form_method is not None:
            raise ValueError(f"stitcher fit/init {self.stitcher_spec.closed_form_method!r} needs the training "
                             "features in the store: use data.mode cached")
        # The encoders run in the training loop: on the training device (Lightning moves only the module tree).
        trainer = self._trainer  # None outside a Trainer (the ``trainer`` property raises instead)
        device = trainer.strategy.root_device if trainer is not None else self.device
        self.encoders.source.to(device)
        self.encoders.target.to(device)

    def encode_streamed_batch(self, batch: Dict[str, Any]) -> tuple:
        """(source, target) features of a raw streamed batch: the feature store's encode call, no gradients."""
        from prh_stitch.streamed import encode_streamed

        inputs = batch["inputs"]
        return (encode_streamed(self.encoders.source, inputs["source"], self.source_spec.layer, self.source_spec.pooling),
                encode_streamed(self.encoders.target, inputs["target"], self.target_spec.layer, self.target_spec.pooling))

    def on_train_epoch_end(self) -> None:
        streaming = getattr(self._datamodule(), "streaming", None)
        if streaming is not None and self.logger is not None:  # mode stream: what this rank's stream skipped so far
            reasons = streaming.skipped.get("train", {})
            self.log("data/train_stream_skipped", float(sum(reasons.values())), sync_dist=True, reduce_fx="sum")

    def _fit_closed_form(self, dm: StitchingDataModule) -> None:
        """Closed-form fit on the training split; the ridge strength is chosen on the validation split.

        Under DDP every rank holds all training features, but each accumulates only its strided shard of rows and
        the float64 sums are all-reduced: the same statistics (bit for bit on every rank) for 1/world the work.
        """
        import torch.distributed as dist

        source, target = dm.training_tensors()
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if distributed:
            rank, world = dist.get_rank(), dist.get_world_size()
            source, target = source[rank::world], target[rank::world]
        val_source, val_target, _, val_groups = dm.datasets["val"].tensors
        spec = self.stitcher_spec
        self.closed_form_result = fit_closed_form(
            self.stitcher, (source, target), spec.closed_form_method, val=(val_source, val_target),
            val_groups=val_groups, distributed=distributed, **spec.closed_form,
        )

    # ---- steps --------------------------------------------------------------------------------
    def forward(self, source_features: Tensor) -> Tensor:
        return self.stitcher(source_features)

    def training_step(self, batch, batch_idx: int) -> Optional[Tensor]:
        if self.gradient_free:
            if batch_idx == 0:
                self.optimizers().step()  # the closed-form fit; every rank takes it (it all-reduces under DDP)
            return None
        if isinstance(batch, dict):  # data.mode stream: raw inputs, encoded here
            source, target = self.encode_streamed_batch(batch)
        else:
            source, target, _, _ = batch
        pred = self.stitcher(source)
        if self.objective.check_finite:  # a diverged run says so, not "bad data" (one sync, like the loss's check)
            check_stitched(pred, source, self.global_step, self.hparams.lr)
        loss = self.objective(pred, target)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(source))
        temperature = getattr(self.objective, "temperature", None)
        if temperature is not None:
            self.log("train/temperature", temperature, on_step=False, on_epoch=True, batch_size=len(source))
        return loss

    def _evaluation_step(self, stage: str, batch) -> None:
        """One step of val or test: the same loss and the same whole-set retrieval for both splits."""
        source, target, index, group = batch
        pred = self.stitcher(source)
        if self.objective.check_finite:
            check_stitched(pred, source, self.global_step, self.hparams.lr)
        self.log(f"{stage}/loss", self.objective(pred, target), on_epoch=True, sync_dist=True, batch_size=len(source))
        getattr(self, f"{stage}_retrieval").update(pred, target, index=index, groups=group)

    def _evaluation_epoch_end(self, stage: str) -> Dict[str, Any]:
        from prh_stitch.evaluation.captions import logged_scores

        # compute() gathers every rank's rows and drops the sampler's padded repeats: whole-set metrics.
        metric = getattr(self, f"{stage}_retrieval")
        scores = metric.compute()
        metric.reset()
        self.log_dict(logged_scores(stage, scores), prog_bar=False)
        return scores

    def validation_step(self, batch, batch_idx: int) -> None:
        self._evaluation_step("val", batch)

    def test_step(self, batch, batch_idx: int) -> None:
        self._evaluation_step("test", batch)

    def on_test_epoch_end(self) -> None:
        self.test_scores = self._evaluation_epoch_end("test")

    def on_validation_epoch_end(self) -> None:
        scores = self._evaluation_epoch_end("val")
        self.log("val/r@1", scores["a2b/recall@1"], prog_bar=True, logger=False)
        result = self.closed_form_result
        if result is not None:
            # What the held-out selection chose, next to the scores it was chosen by.
            for name in ("ridge", "gain", "whiten"):
                if getattr(result, name, None) is not None:
                    self.log(f"closed_form/{name}", float(getattr(result, name)))

    # ---- optimisation -------------------------------------------------------------------------
    def configure_optimizers(self):
        if self.gradient_free:
            return ClosedFormStep(self.stitcher.parameters(), lambda: self._fit_closed_form(self._datamodule()))
        # Weight decay on the stitcher only: decaying the objective's temperature would bias it, not regularise.
        groups = [
            {"params": [p for p in self.stitcher.parameters() if p.requires_grad]},
            {"params": [p for p in self.objective.parameters() if p.requires_grad], "weight_decay": 0.0},
        ]
        groups = [g for g in groups if g["params"]]
        optimizer = torch.optim.AdamW(groups, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = int(self.hparams.warmup_steps)
        cosine = self.hparams.schedule == "cosine"

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            if not cosine:
                return 1.0
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return 0.5 * (1.0 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---- checkpoints --------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        # Everything load_stitcher needs, as plain data next to the weights.
        checkpoint[CHECKPOINT_KEY] = {
            "format": CHECKPOINT_FORMAT,
            "version": __version__,
            "stitcher": self.stitcher.config(),
            "source": self.source_spec.to_dict(),
            "target": self.target_spec.to_dict(),
            "source_layer": self.encoders.source.layer_names[self.encoders.source.resolve_layer(self.source_spec.layer)],
            "target_layer": self.encoders.target.layer_names[self.encoders.target.resolve_layer(self.target_spec.layer)],
            # Which features the stitcher expects, exactly (weights, preprocessing, layer, pooling): the model folder's.
            "source_fingerprint": self.encoders.source.fingerprint([self.source_spec.layer], self.source_spec.pooling),
            "target_fingerprint": self.encoders.target.fingerprint([self.target_spec.layer], self.target_spec.pooling),
            "objective": asdict(self.objective_spec),
            "fit": {"method": self.stitcher_spec.fit, "init": self.stitcher_spec.init,
                    "closed_form": self.closed_form_result.as_dict() if self.closed_form_result else None},
            # Which data each split was, and where choices were made: evaluate.py stitch reports test by default.
            "data": self._split_record(),
        }

    def _split_record(self) -> Dict[str, Any]:
        dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        patterns = dict(dm.patterns) if isinstance(dm, StitchingDataModule) else {}  # as resolved for this run
        return {**patterns, "choices_made_on": "val"}
