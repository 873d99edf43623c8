"""The LightningModule of prefix stitching: frozen image encoder -> trained map -> frozen causal LM.

The image side is the feature store's, exactly as for stitcher training: the module asks the
:class:`~prh_stitch.data.datamodule.StitchingDataModule` for one encoder's features (both of its sides are that
request, so its splits, DDP samplers and skip counts serve unchanged), and never runs the image encoder while
training. The map turns a feature vector into ``n_prefix`` input embeddings of the LM; the loss is the caption's
negative log-likelihood after that prefix (see :mod:`prh_stitch.prefix.captions`).

The LM is held outside the module tree, like the encoders of the feature stitcher: it is never wrapped by DDP, never
in the optimizer or a checkpoint (which stays a few MB), never switched to train mode by Lightning, and every one of
its parameters has ``requires_grad`` False; gradients flow through it into the prefix only. It is moved to the
training device in ``setup``. Mixed precision (``trainer.precision: bf16-mixed`` or ``16-mixed``) autocasts the LM's
forward with the rest of the step; the map's weights stay float32.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import Any, Dict, Optional, Union

import pytorch_lightning as pl
import torch
from torch import Tensor
from torchmetrics.aggregation import CatMetric

from prh_stitch import __version__
from prh_stitch.checkpoint import CHECKPOINT_KEY
from prh_stitch.data.datamodule import FeatureRequest, StitchingDataModule
from prh_stitch.encoders import EncoderSpec, encoder_from_spec
from prh_stitch.encoders.base import coerce_spec
from prh_stitch.prefix.captions import CaptionTokens, caption_nats, tokenize_captions, training_loss
from prh_stitch.prefix.language_models import FrozenLanguageModel, load_language_model
from prh_stitch.prefix.prefix_map import PrefixMapSpec, as_prefix, build_prefix_stitcher, objective_record

CHECKPOINT_FORMAT = 1
EVAL_SPLITS = ("val", "test")


class _Frozen:
    """Plain holder (not an nn.Module): the encoder and the LM stay out of the module tree and checkpoints."""

    def __init__(self, encoder, lm: FrozenLanguageModel) -> None:
        self.encoder, self.lm = encoder, lm


class PrefixStitchingModule(pl.LightningModule):
    def __init__(
        self,
        source: Union[EncoderSpec, Dict[str, Any]] = EncoderSpec(name="efficientnet_lite0"),
        language_model: str = "smollm2_135m",
        language_model_options: Optional[Dict[str, Any]] = None,
        n_prefix: int = 4,
        prefix_map: Union[PrefixMapSpec, Dict[str, Any]] = PrefixMapSpec(),
        max_caption_tokens: int = 64,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        schedule: str = "constant",
    ) -> None:
        """
        Args:
            source: the frozen image encoder whose cached features are mapped (name, layer, pooling, weights).
            language_model: the frozen causal LM (``smollm2_135m``, ``tiny_gpt2``, or ``hf:<id or folder>``).
            language_model_options: options of the LM's builder (e.g. ``{layers: 2, width: 32}`` for tiny_gpt2).
            n_prefix: input embeddings of the LM made from one image.
            prefix_map: the trained map (a registered stitcher core and its input normalisation).
            max_caption_tokens: longest caption accepted, in text tokens (a longer one is an error, not cut).
            lr: peak AdamW learning rate.
            weight_decay: AdamW weight decay.
            warmup_steps: linear warm-up steps before the schedule.
            schedule: ``constant`` or ``cosine`` (decay to 0 over the run).
        """
        super().__init__()
        if schedule not in ("cosine", "constant"):
            raise ValueError(f"unknown schedule {schedule!r}; choose 'cosine' or 'constant'")
        self.source_spec = EncoderSpec.coerce(source)
        self.map_spec = coerce_spec(PrefixMapSpec, prefix_map)
        self.n_prefix = int(n_prefix)
        self.save_hyperparameters({
            "source": self.source_spec.to_dict(), "language_model": language_model,
            "language_model_options": dict(language_model_options or {}), "n_prefix": self.n_prefix,
            "prefix_map": asdict(self.map_spec), "max_caption_tokens": max_caption_tokens, "lr": lr,
            "weight_decay": weight_decay, "warmup_steps": warmup_steps, "schedule": schedule,
        })
        lm = load_language_model(language_model, **(language_model_options or {}))
        self.frozen = _Frozen(encoder_from_spec(self.source_spec), lm)
        in_dim = self.frozen.encoder.feature_dim(self.source_spec.layer, self.source_spec.pooling)
        embedding_std = float(lm.model.get_input_embeddings().weight.float().std())
        # Named ``stitcher`` so that checkpoints read like every stitcher's (``stitcher.*``, see prefix_map.py).
        self.stitcher = build_prefix_stitcher(self.map_spec, in_dim, self.n_prefix, lm.embed_dim, embedding_std)
        self.tokens: Dict[str, CaptionTokens] = {}
        # (sample index, nats, bytes) rows of every rank; compute() gathers them, repeats are dropped by index.
        self.eval_rows = {split: CatMetric() for split in EVAL_SPLITS}
        self.test_scores: Optional[Dict[str, float]] = None

    @property
    def lm(self) -> FrozenLanguageModel:
        return self.frozen.lm

    def prefix(self, features: Tensor) -> Tensor:
        """(N, F) image features -> (N, n_prefix, D) LM input embeddings."""
        return as_prefix(self.stitcher(features.float()), self.n_prefix)

    # ---- data -------------------------------------------------------------------------------------
    def feature_request(self) -> FeatureRequest:
        return FeatureRequest(self.frozen.encoder, self.source_spec.layer, self.source_spec.pooling)

    def _datamodule(self) -> StitchingDataModule:
        dm = getattr(self.trainer, "datamodule", None)
        if not isinstance(dm, StitchingDataModule):
            raise TypeError("PrefixStitchingModule trains from cached features: pass a StitchingDataModule to the "
                            "Trainer")
        if dm.mode != "cached":
            raise ValueError("prefix stitching trains from the feature store: set data.mode cached")
        return dm

    def prepare_data(self) -> None:
        self._datamodule().prepare_features([self.feature_request()], self.trainer.strategy.root_device)

    def setup(self, stage: str) -> None:
        dm = self._datamodule()
        request = self.feature_request()
        dm.setup_features(request, request)  # one encoder: both sides of the pair dataset are its features
        for split, captions in dm.captions.items():
            self.tokens[split] = tokenize_captions(self.lm, captions, self.hparams.max_caption_tokens)
        if stage == "fit":
            # Deterministic given the training features: every rank fits the same statistics.
            self.stitcher.fit_normalization(dm.datasets["train"].tensors[0], None)
        self.lm.to(self.trainer.strategy.root_device)

    # ---- steps ------------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx: int) -> Tensor:
        features, _, index, _ = batch
        tokens = self.tokens["train"].rows(index, self.device)
        loss = training_loss(self.lm, self.prefix(features), tokens)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(index))
        return loss

    def _evaluation_step(self, split: str, batch) -> None:
        features, _, index, _ = batch
        tokens = self.tokens[split].rows(index, self.device)
        nats = caption_nats(self.lm, self.prefix(features), tokens)
        rows = torch.stack([index.to(nats.device).double(), nats, tokens.bytes.double()], dim=1)
        self.eval_rows[split].to(self.device).update(rows)

    def _evaluation_end(self, split: str) -> Dict[str, float]:
        metric = self.eval_rows[split]
        rows = metric.compute().view(-1, 3)
        metric.reset()
        # The DistributedSampler pads with repeats of the first samples: each sample index counts once.
        _, first = _unique_first(rows[:, 0].long())
        rows = rows[first]
        bpb = float(rows[:, 1].sum() / math.log(2) / rows[:, 2].sum())
        self.log(f"{split}/bits_per_byte", bpb, prog_bar=True, sync_dist=False)
        return {"bits_per_byte": bpb, "captions": len(rows)}

    def validation_step(self, batch, batch_idx: int) -> None:
        self._evaluation_step("val", batch)

    def on_validation_epoch_end(self) -> None:
        self._evaluation_end("val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._evaluation_step("test", batch)

    def on_test_epoch_end(self) -> None:
        self.test_scores = self._evaluation_end("test")

    # ---- optimisation -----------------------------------------------------------------------------
    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.stitcher.parameters(), lr=self.hparams.lr,
                                      weight_decay=self.hparams.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup, cosine = int(self.hparams.warmup_steps), self.hparams.schedule == "cosine"

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            if not cosine:
                return 1.0
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---- checkpoints ------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        # The usual stitcher metadata (see StitchingModule.on_save_checkpoint): load_stitcher and the model folder
        # read it as is; the LM is the "target", its input embeddings the target layer.
        encoder = self.frozen.encoder
        dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        patterns = dict(dm.patterns) if isinstance(dm, StitchingDataModule) else {}
        checkpoint[CHECKPOINT_KEY] = {
            "format": CHECKPOINT_FORMAT,
            "version": __version__,
            "stitcher": self.stitcher.config(),
            "source": self.source_spec.to_dict(),
            "target": EncoderSpec(name=self.hparams.language_model,
                                  options=dict(self.hparams.language_model_options)).to_dict(),
            "source_layer": encoder.layer_names[encoder.resolve_layer(self.source_spec.layer)],
            "target_layer": "input_embeddings",
            "source_fingerprint": encoder.fingerprint([self.source_spec.layer], self.source_spec.pooling),
            "target_fingerprint": self.lm.fingerprint(),
            "objective": objective_record(self.hparams.language_model, self.n_prefix, self.lm.embed_dim),
            "fit": {"method": "gradient", "init": None, "closed_form": None},
            "data": {**patterns, "choices_made_on": "val"},
        }


def _unique_first(values: Tensor):
    """(unique values, position of each one's first occurrence)."""
    order = torch.argsort(values, stable=True)
    sorted_values = values[order]
    keep = torch.ones_like(sorted_values, dtype=torch.bool)
    keep[1:] = sorted_values[1:] != sorted_values[:-1]
    return sorted_values[keep], order[keep]
