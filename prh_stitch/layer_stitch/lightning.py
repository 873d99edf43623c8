"""The LightningModule of one cut: A up to ``layer_a``, the stitching layer, B from ``layer_b`` on.

Both networks are frozen; only the stitching layer trains, against

- ``target: soft`` — B's own logits on the same image (KL divergence at ``temperature``; no labels needed). The
  score is *agreement*: how often the stitched network's top-1 equals B's;
- ``target: labels`` — class labels through a linear probe fitted on B's pre-logits features. The score is probe
  *accuracy*.

The **stitching penalty** is ``score(B alone) − score(stitched)`` (B alone agrees with itself: 1.0).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Union

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prh_stitch.encoders import build_encoder
from prh_stitch.encoders.base import Layer
from prh_stitch.encoders.timm_backend import TimmEncoder
from prh_stitch.layer_stitch.data import LayerStitchDataModule
from prh_stitch.layer_stitch.probe import fit_probe
from prh_stitch.layer_stitch.stitch_layer import StitchLayer
from prh_stitch.layer_stitch.surgery import layer_name, require_timm, run_from, run_until

TARGETS = ("soft", "labels")
SPLITS = ("train", "val")


@dataclass
class _Frozen:
    """Plain holder (not an nn.Module): the networks and the probe stay out of the module tree and checkpoints."""

    a: TimmEncoder
    b: TimmEncoder
    probe: Optional[nn.Linear] = None


class LayerStitchingModule(pl.LightningModule):
    def __init__(
        self,
        model_a: str = "efficientnet_lite0",
        model_b: str = "efficientnet_lite2",
        layer_a: Layer = "blocks.3",
        layer_b: Layer = "blocks.3",
        target: str = "soft",
        temperature: float = 1.0,
        init: str = "lstsq",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
    ) -> None:
        """
        Args:
            model_a: the network run up to ``layer_a`` (a built-in or ``timm:<name>``; frozen).
            model_b: the network continued from ``layer_b`` to its head (frozen).
            layer_a: cut layer of A (index or name in A's ``layer_names``).
            layer_b: layer of B whose output the stitching layer imitates; B resumes after it.
            target: ``soft`` (KL to B's own logits, no labels) or ``labels`` (cross-entropy through a linear probe
                fitted on B's pre-logits features).
            temperature: softmax temperature of the soft targets.
            init: stitching-layer init: ``lstsq`` (regress B's layer-j activations on A's layer-i ones over the
                training images, then calibrate the BatchNorm), ``identity`` (equal widths) or ``default``
                (PyTorch's random init).
            lr: AdamW learning rate of the stitching layer.
            weight_decay: AdamW weight decay of the stitching layer.
        """
        super().__init__()
        if target not in TARGETS:
            raise ValueError(f"unknown stitching target {target!r}; choose one of {', '.join(TARGETS)}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        # Named explicitly rather than read from the caller's frame: the same hparams, also when a tool (mutmut)
        # runs this body as a function defined outside the class.
        self.save_hyperparameters({"model_a": model_a, "model_b": model_b, "layer_a": layer_a, "layer_b": layer_b,
                                   "target": target, "temperature": temperature, "init": init, "lr": lr,
                                   "weight_decay": weight_decay})
        a = require_timm(build_encoder(model_a, True, None, {}), "A")
        b = a if model_b == model_a else require_timm(build_encoder(model_b, True, None, {}), "B")
        self.frozen = _Frozen(a, b)
        self.layer_a, self.layer_b = layer_name(a, layer_a), layer_name(b, layer_b)
        # Shapes from one blank image at A's native size (a ViT accepts only that); attach() re-measures them at the
        # data's resolution, where only the spatial sizes (the resize target) may differ.
        probe = torch.zeros(1, *a.data_config["input_size"])
        with torch.no_grad():
            in_shape, out_shape = run_until(a, self.layer_a, probe).shape[1:], run_until(b, self.layer_b, probe).shape[1:]
        self.stitch = StitchLayer(in_shape, out_shape, init)
        # Set once the data-dependent init has run; in the state dict, so a later attach() (evaluation after
        # training) never re-initialises trained weights.
        self.register_buffer("initialised", torch.tensor(False))
        self._shapes_at = int(probe.shape[-1])

    # ---- setup: sizes at the data's resolution, caches, probe --------------------------------------------------
    def attach(self, dm: LayerStitchDataModule, device: Union[str, torch.device] = "cpu") -> None:
        """Fill the caches and the probe from ``dm`` (done by ``setup``; call directly to evaluate without a Trainer)."""
        self._data = dm
        for encoder in (self.frozen.a, self.frozen.b):
            encoder.to(device)
        self._fit_shapes(dm)
        self.cache = {split: dm.cached(self.frozen.a, "activations", self.layer_a, split) for split in SPLITS}
        init = self.hparams.init
        if init != "default" and not bool(self.initialised):
            target = dm.cached(self.frozen.b, "activations", self.layer_b, "train") if init == "lstsq" else None
            self.stitch.init_from_data(self.cache["train"], target, init)
            self.initialised.fill_(True)
        self.b_outputs = {split: dm.cached(self.frozen.b, "logits", -1, split) for split in SPLITS}
        if self.hparams.target == "labels":
            num_classes = int(max(int(dm.labels(s).max()) for s in SPLITS)) + 1
            features = {s: dm.cached(self.frozen.b, "pre_logits", -1, s) for s in SPLITS}
            self.frozen.probe = fit_probe(features["train"], dm.labels("train"), num_classes).to(device)
            self.b_outputs = {s: self.frozen.probe(features[s].to(device)).cpu() for s in SPLITS}

    def _fit_shapes(self, dm: LayerStitchDataModule) -> None:
        """At the data's resolution the spatial sizes (the resize target) may differ from the probe image's; the
        widths do not (they are the networks' own)."""
        if dm.image_size == self._shapes_at:
            return
        first = torch.arange(1)
        with torch.no_grad():
            self.stitch.in_shape = tuple(run_until(self.frozen.a, self.layer_a,
                                                   dm.normalised_images(self.frozen.a, "train", first)).shape[1:])
            self.stitch.out_shape = tuple(run_until(self.frozen.b, self.layer_b,
                                                    dm.normalised_images(self.frozen.b, "train", first)).shape[1:])
        self._shapes_at = dm.image_size

    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        if not isinstance(dm, LayerStitchDataModule):
            raise TypeError("LayerStitchingModule needs a LayerStitchDataModule (data.class_path in the config)")
        self.attach(dm, self.trainer.strategy.root_device)

    # ---- forward and steps --------------------------------------------------------------------------------------
    def forward(self, activations: Tensor) -> Tensor:
        """Stitched outputs (B's logits, or probe logits for ``target: labels``) from A's cut activations."""
        hidden = self.stitch(activations.float())
        if self.hparams.target == "labels":
            return self.frozen.probe(run_from(self.frozen.b, self.layer_b, hidden, pre_logits=True))
        return run_from(self.frozen.b, self.layer_b, hidden)

    def loss(self, out: Tensor, reference: Tensor, labels: Tensor) -> Tensor:
        """KL to B's softened outputs (``soft``, scaled by T² as in distillation) or cross-entropy (``labels``)."""
        if self.hparams.target == "labels":
            return F.cross_entropy(out, labels)
        t = self.hparams.temperature
        return F.kl_div(F.log_softmax(out / t, 1), F.log_softmax(reference / t, 1), log_target=True,
                        reduction="batchmean") * t * t

    def _step(self, batch, split: str):
        index, labels = batch
        out = self(self.cache[split][index.cpu()].to(self.device))
        reference = self.b_outputs[split][index.cpu()].to(self.device)
        return self.loss(out, reference, labels), out, reference, labels

    def training_step(self, batch, batch_idx: int) -> Tensor:
        loss, _, _, _ = self._step(batch, "train")
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(batch[0]))
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        loss, out, reference, labels = self._step(batch, "val")
        n = len(labels)
        agreement = (out.argmax(1) == reference.argmax(1)).float().mean()
        self.log("val/loss", loss, batch_size=n)
        self.log("val/agreement", agreement, batch_size=n, prog_bar=True)
        if self.hparams.target == "labels":
            accuracy = (out.argmax(1) == labels).float().mean()
            b_accuracy = (reference.argmax(1) == labels).float().mean()
            self.log("val/accuracy", accuracy, batch_size=n, prog_bar=True)
            self.log("val/b_accuracy", b_accuracy, batch_size=n)
            self.log("val/penalty", b_accuracy - accuracy, batch_size=n)
        else:
            self.log("val/penalty", 1.0 - agreement, batch_size=n)

    def on_validation_epoch_start(self) -> None:
        # Validation and the checkpoints it selects score the function that was trained (see precise_batchnorm).
        self.stitch.precise_batchnorm(self.cache["train"])

    def on_train_end(self) -> None:
        self.stitch.precise_batchnorm(self.cache["train"])

    def configure_optimizers(self):
        return torch.optim.AdamW(self.stitch.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)

    @torch.no_grad()
    def evaluate(self, split: str = "val") -> Dict[str, float]:
        """Score, B's score, the penalty and the agreement with B over a whole split (eval mode)."""
        was = self.stitch.training
        self.stitch.eval()
        device = next(self.stitch.parameters()).device
        outs = torch.cat([self(chunk.to(device)).cpu() for chunk in self.cache[split].split(128)])
        self.stitch.train(was)
        reference = self.b_outputs[split]
        agreement = float((outs.argmax(1) == reference.argmax(1)).float().mean())
        score, b_score = agreement, 1.0
        if self.hparams.target == "labels":
            labels = self._data.labels(split)
            score = float((outs.argmax(1) == labels).float().mean())
            b_score = float((reference.argmax(1) == labels).float().mean())
        return {"score": score, "b_score": b_score, "penalty": b_score - score, "agreement": agreement}

    def on_save_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        checkpoint["prh_stitch_layer"] = {"layer_a": self.layer_a, "layer_b": self.layer_b,
                                          "in_shape": list(self.stitch.in_shape),
                                          "out_shape": list(self.stitch.out_shape)}
