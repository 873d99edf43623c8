"""Layer-to-layer stitching: run network A up to layer i, a stitching layer, then network B from layer j.

The classic test of whether two networks represent alike (Lenc & Vedaldi 2015; Bansal et al. 2021): if a
cheap stitching layer can carry A's layer-i activations into B's layer j with little loss, the two
representations differ by little more than that layer. Both networks are frozen; only the stitching layer
trains, against

- ``target: soft`` — B's own logits on the same image (KL divergence at ``temperature``; no labels needed).
  The score is *agreement*: how often the stitched network's top-1 equals B's;
- ``target: labels`` — class labels through a linear probe fitted on B's pre-logits features (B's head
  classifies ImageNet, not the data's classes). The score is probe *accuracy*.

The **stitching penalty** is ``score(B alone) − score(stitched)`` (B alone agrees with itself: 1.0).

Pieces:
- :func:`run_until` / :func:`run_from` — A's activation at a layer, and B's forward from a layer to its logits,
  for the timm families in scope: EfficientNet (``blocks.j`` → ``blocks[j+1:]``, ``conv_head``, ``bn2``,
  ``forward_head``), ResNet (``act1``/``layerK`` → the later stages, ``forward_head``) and VisionTransformer
  (``blocks.j`` → ``blocks[j+1:]``, ``norm``, ``forward_head``); ``pre_logits`` feeds the classifier directly.
  Other architectures raise a clear error.
- :class:`StitchLayer` — 1×1 convolution + BatchNorm for spatial maps (bilinear resize first when the spatial
  sizes differ), a linear map for token sequences (same number of tokens) or pooled vectors.
- :class:`LayerStitchDataModule` — images of the built-in scenes or Fashion-MNIST with their class labels,
  and a cache of everything frozen: A's activations at the cut, B's logits and pre-logits features (float16
  on disk under ``cache_dir/layer_stitch``, keyed by model, layer, image size and data).
- :class:`LayerStitchingModule` — the LightningModule ``train.py --config configs/layer_stitch_*.yaml`` trains.
- :func:`sweep` / :func:`main_sweep` — every (i, j) of two layer lists: a penalty matrix, JSON, CSV and a
  heatmap PNG.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from prh_stitch.encoders import build_encoder
from prh_stitch.encoders.timm_backend import HEAD_LAYER, TimmEncoder

log = logging.getLogger("prh_stitch.layer_stitch")

TARGETS = ("soft", "labels")
INITS = ("lstsq", "identity", "default")
Layer = Union[int, str]


# ----------------------------------------------------------------------------------------------------------------
# Running a network up to a layer, and from a layer on
# ----------------------------------------------------------------------------------------------------------------


class _Stop(Exception):
    """Raised by the hook on the cut layer: nothing after it needs to run."""


def _family(model: nn.Module) -> str:
    from timm.models.efficientnet import EfficientNet
    from timm.models.resnet import ResNet
    from timm.models.vision_transformer import VisionTransformer

    for cls, name in ((EfficientNet, "efficientnet"), (ResNet, "resnet"), (VisionTransformer, "vit")):
        if isinstance(model, cls):
            return name
    raise ValueError(
        f"layer-to-layer stitching supports timm EfficientNet, ResNet and VisionTransformer models; "
        f"{type(model).__name__} is not one of them (its forward cannot be resumed from a layer here)"
    )


def resolve_layer(encoder: TimmEncoder, layer: Layer) -> str:
    """A layer index (negative from the end) or name of ``encoder.layer_names`` -> its name, or a clear error."""
    names = encoder.layer_names
    if isinstance(layer, str) and not layer.lstrip("-").isdigit():
        if layer not in names:
            raise ValueError(f"layer {layer!r} does not exist in {encoder.name!r}; its layers are {names}")
        return layer
    index = int(layer)
    if not -len(names) <= index < len(names):
        raise ValueError(f"layer {index} is out of range for {encoder.name!r}, which has {len(names)} layers "
                         f"(0..{len(names) - 1}, or negative from the end): {names}")
    return names[index]


def _require_timm(encoder: Any, role: str) -> TimmEncoder:
    if not isinstance(encoder, TimmEncoder):
        raise ValueError(f"model {role} ({getattr(encoder, 'name', encoder)!r}) is not a timm vision network; "
                         "layer-to-layer stitching needs two (e.g. efficientnet_lite0, tiny_resnet, tiny_vit)")
    _family(encoder.model)
    return encoder


def run_until(encoder: TimmEncoder, layer: Layer, images: Tensor) -> Tensor:
    """The output of ``layer`` (unpooled: a map ``(B, C, H, W)`` or tokens ``(B, T, D)``; ``pre_logits``: ``(B, D)``)."""
    name = resolve_layer(encoder, layer)
    model = encoder.model
    if name == HEAD_LAYER:
        return model.forward_head(model.forward_features(images), pre_logits=True)
    captured: Dict[str, Tensor] = {}

    def hook(_module, _inputs, output):
        captured["out"] = output[0] if isinstance(output, (tuple, list)) else output
        raise _Stop

    handle = model.get_submodule(name).register_forward_hook(hook)
    try:
        model.forward_features(images)
    except _Stop:
        pass
    finally:
        handle.remove()
    return captured["out"]


_RESNET_STEM = ("conv1", "bn1", "act1", "maxpool")


def run_from(encoder: TimmEncoder, layer: Layer, hidden: Tensor, pre_logits: bool = False) -> Tensor:
    """Continue ``encoder``'s forward from the output of ``layer`` to its logits (or pre-logits features)."""
    name = resolve_layer(encoder, layer)
    model = encoder.model
    if name == HEAD_LAYER:
        return hidden if pre_logits else model.get_classifier()(hidden)
    family = _family(model)
    if family in ("efficientnet", "vit"):
        container, _, index = name.partition(".")
        if container != "blocks":
            raise ValueError(f"cannot resume {type(model).__name__} from {name!r}; use one of its blocks.* layers")
        x = model.blocks[int(index) + 1:](hidden)
        x = model.bn2(model.conv_head(x)) if family == "efficientnet" else model.norm(x)
    else:  # resnet: the stem's remaining modules, then the later stages, in forward_features order
        order = list(_RESNET_STEM) + [f"layer{k}" for k in range(1, 5)]
        if name not in order:
            raise ValueError(f"cannot resume ResNet from {name!r}; use one of {order}")
        x = hidden
        for module_name in order[order.index(name) + 1:]:
            x = model.get_submodule(module_name)(x)
    return model.forward_head(x, pre_logits=pre_logits)


# ----------------------------------------------------------------------------------------------------------------
# The stitching layer
# ----------------------------------------------------------------------------------------------------------------


def _kind(shape: Tuple[int, ...]) -> str:
    return {3: "map", 2: "tokens", 1: "vector"}.get(len(shape), "unknown")


class StitchLayer(nn.Module):
    """Maps A's activation (per-sample shape ``in_shape``) to B's (``out_shape``).

    Maps ``(C, H, W)`` -> ``(C', H', W')``: bilinear resize to ``(H', W')`` if needed, 1×1 conv (no bias), BatchNorm.
    Tokens ``(T, D)`` -> ``(T, D')`` and vectors ``(D,)`` -> ``(D',)``: a linear map (with bias).
    ``init="identity"`` (equal widths only) makes the layer the identity in eval mode, exactly: the BatchNorm's
    weight is ``sqrt(1 + eps)`` against its initial running variance 1. ``init="lstsq"`` starts like ``default``;
    :meth:`init_from_data` then sets it from activations (LayerStitchingModule does so when it sees the data).
    """

    def __init__(self, in_shape: Sequence[int], out_shape: Sequence[int], init: str = "lstsq") -> None:
        super().__init__()
        self.in_shape, self.out_shape = tuple(int(s) for s in in_shape), tuple(int(s) for s in out_shape)
        kind_in, kind_out = _kind(self.in_shape), _kind(self.out_shape)
        if kind_in != kind_out or kind_in == "unknown":
            raise ValueError(f"cannot stitch a {kind_in} of shape {self.in_shape} into a {kind_out} of shape "
                             f"{self.out_shape}: both cuts must give spatial maps, both token sequences, or both "
                             "pooled vectors (pick layers of the same kind)")
        if kind_in == "tokens" and self.in_shape[0] != self.out_shape[0]:
            raise ValueError(f"cannot stitch {self.in_shape[0]} tokens into {self.out_shape[0]}: token sequences "
                             "must have the same length (same patch grid and prefix tokens)")
        if init not in INITS:
            raise ValueError(f"unknown stitch init {init!r}; choose one of {', '.join(INITS)}")
        self.kind = kind_in
        c_in, c_out = (self.in_shape[0], self.out_shape[0]) if kind_in == "map" else (self.in_shape[-1], self.out_shape[-1])
        if kind_in == "map":
            self.conv = nn.Conv2d(c_in, c_out, kernel_size=1, bias=False)
            self.bn = nn.BatchNorm2d(c_out)
        else:
            self.linear = nn.Linear(c_in, c_out)
        if init == "identity":
            if c_in != c_out:
                raise ValueError(f"identity init needs equal widths, got {c_in} -> {c_out}; use init 'default'")
            with torch.no_grad():
                if kind_in == "map":
                    self.conv.weight.copy_(torch.eye(c_in)[:, :, None, None])
                    self.bn.weight.fill_((1 + self.bn.eps) ** 0.5)
                else:
                    self.linear.weight.copy_(torch.eye(c_in))
                    self.linear.bias.zero_()

    def _resized(self, x: Tensor) -> Tensor:
        if self.kind == "map" and tuple(x.shape[-2:]) != self.out_shape[1:]:
            x = F.interpolate(x, size=self.out_shape[1:], mode="bilinear", align_corners=False)
        return x

    def forward(self, x: Tensor) -> Tensor:
        if self.kind != "map":
            return self.linear(x)
        return self.bn(self.conv(self._resized(x)))

    def _rows(self, x: Tensor) -> Tensor:
        """Activations as rows of features: one row per pixel (maps), per token, or per sample."""
        x = self._resized(x.float())
        return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1]) if self.kind == "map" else x.reshape(-1, x.shape[-1])

    @torch.no_grad()
    def init_from_data(self, source: Tensor, target: Optional[Tensor], method: str, chunk: int = 64) -> None:
        """Data-dependent start: ``lstsq`` regresses ``target`` activations on ``source`` ones (ridge 1e-4,
        relative; one row per pixel/token, float64 sums); ``identity`` keeps the identity map.

        For maps, the BatchNorm is then calibrated so that the layer computes that affine map in *both* modes: its
        running statistics are those of ``conv(x)`` over ``source`` and its affine parameters undo them
        (``γ = sqrt(var + eps)``, ``β = mean + bias``). Without this, training-mode BatchNorm would first normalise
        the carefully initialised map away, and short training would start from scratch.
        """
        from prh_stitch.closed_form import fit_closed_form
        from prh_stitch.stitchers import Stitcher

        width_in = self.in_shape[0] if self.kind == "map" else self.in_shape[-1]
        width_out = self.out_shape[0] if self.kind == "map" else self.out_shape[-1]
        bias = torch.zeros(width_out)
        if method == "lstsq":
            vehicle = Stitcher("affine", width_in, width_out)
            pairs = ((self._rows(x), self._rows(y)) for x, y in zip(source.split(chunk), target.split(chunk)))
            fit_closed_form(vehicle, pairs, "ridge", ridge=1e-4)
            weight, bias = vehicle.core.weight, vehicle.core.bias
            if self.kind == "map":
                self.conv.weight.copy_(weight[:, :, None, None])
            else:
                self.linear.weight.copy_(weight)
                self.linear.bias.copy_(bias)
        elif method != "identity":
            raise ValueError(f"unknown data-dependent init {method!r}")
        if self.kind != "map":
            return
        count, total, squares = 0, torch.zeros(width_out, dtype=torch.float64), torch.zeros(width_out, dtype=torch.float64)
        for x in source.split(chunk):
            z = self.conv(self._resized(x.float())).double()
            count += z.shape[0] * z.shape[2] * z.shape[3]
            total += z.sum((0, 2, 3))
            squares += z.square().sum((0, 2, 3))
        mean = total / count
        var = (squares / count - mean.square()).clamp_min(0)
        self.bn.running_mean.copy_(mean)
        self.bn.running_var.copy_(var)
        self.bn.weight.copy_((var + self.bn.eps).sqrt())
        self.bn.bias.copy_(mean + bias.double())


# ----------------------------------------------------------------------------------------------------------------
# Data and the cache of frozen outputs
# ----------------------------------------------------------------------------------------------------------------


def _load_images(source: str, split: str, n: int, image_size: int, seed: int) -> Tuple[Tensor, Tensor]:
    """``n`` RGB images (uint8, ``(n, 3, S, S)``) and their class labels from a data source."""
    from PIL import Image

    from prh_stitch.data.sources import SOURCES

    if source == "scenes":
        samples = SOURCES.get("scenes")(n=n, seed=seed, size=image_size, split=split)
    elif source == "fashion_mnist":
        samples = SOURCES.get("fashion_mnist")(split="train" if split == "train" else "test", limit=n)
    else:
        raise ValueError(f"unknown layer-stitch data source {source!r}; choose 'scenes' or 'fashion_mnist'")
    images, labels = [], []
    for _key, image, _caption, meta in samples:
        image = image.convert("RGB")
        if image.size != (image_size, image_size):
            image = image.resize((image_size, image_size), Image.BILINEAR)
        images.append(torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1))
        labels.append(int(meta["label"]))
    if len(images) < n:
        raise ValueError(f"{source} {split} has only {len(images)} images, {n} were asked for")
    return torch.stack(images), torch.tensor(labels, dtype=torch.long)


class LayerStitchDataModule(pl.LightningDataModule):
    """Images with class labels; batches are ``(sample_index, label)`` into per-split frozen caches."""

    def __init__(
        self,
        source: str = "scenes",
        n_train: int = 512,
        n_val: int = 256,
        image_size: int = 128,
        seed: int = 0,
        batch_size: int = 32,
        encode_batch_size: int = 64,
        cache_dir: Optional[str] = None,
    ) -> None:
        """
        Args:
            source: ``scenes`` (built in; label = shape of the first object, 6 classes) or ``fashion_mnist``.
            n_train: training images.
            n_val: validation images (Fashion-MNIST: from its test split).
            image_size: side in pixels fed to both networks (CNNs take any size; a ViT needs its own).
            seed: scene seed.
            batch_size: stitch-layer training batch size.
            encode_batch_size: batch size when filling the cache with the frozen networks.
            cache_dir: where cached activations go (default ``$PRH_STITCH_CACHE`` or ``~/.cache/prh_stitch``).
        """
        super().__init__()
        from prh_stitch.data.features import default_cache_dir

        if source not in ("scenes", "fashion_mnist"):
            raise ValueError(f"unknown layer-stitch data source {source!r}; choose 'scenes' or 'fashion_mnist'")
        self.source, self.n = source, {"train": int(n_train), "val": int(n_val)}
        self.image_size, self.seed = int(image_size), int(seed)
        self.batch_size, self.encode_batch_size = int(batch_size), int(encode_batch_size)
        self.cache_root = Path(cache_dir) if cache_dir else default_cache_dir()
        self._images: Dict[str, Tuple[Tensor, Tensor]] = {}
        self._memo: Dict[str, Tensor] = {}

    def data_key(self, split: str) -> str:
        return f"{self.source}-{split}-{self.n[split]}-{self.image_size}-{self.seed}"

    def images(self, split: str) -> Tuple[Tensor, Tensor]:
        if split not in self._images:
            self._images[split] = _load_images(self.source, split, self.n[split], self.image_size, self.seed)
        return self._images[split]

    def labels(self, split: str) -> Tensor:
        return self.images(split)[1]

    def _normalised(self, encoder: TimmEncoder, images: Tensor) -> Tensor:
        mean = torch.tensor(encoder.data_config["mean"]).view(1, 3, 1, 1)
        std = torch.tensor(encoder.data_config["std"]).view(1, 3, 1, 1)
        return ((images.float() / 255.0 - mean) / std).to(encoder.device)

    def normalised_images(self, encoder: TimmEncoder, split: str, index: Tensor) -> Tensor:
        return self._normalised(encoder, self.images(split)[0][index.cpu()])

    @torch.no_grad()
    def cached(self, encoder: TimmEncoder, what: str, layer: Layer, split: str) -> Tensor:
        """Frozen outputs of ``encoder`` on split images: ``what`` = ``activations`` (at ``layer``), ``logits`` or
        ``pre_logits``. Computed once, then kept in memory and on disk (float16)."""
        name = resolve_layer(encoder, layer) if what == "activations" else what
        spec = json.dumps([encoder.fingerprint([-1], None), what, name, self.data_key(split)])
        key = hashlib.sha1(spec.encode()).hexdigest()[:20]
        if key in self._memo:
            return self._memo[key]
        path = self.cache_root / "layer_stitch" / f"{key}.pt"
        if path.is_file():
            value = torch.load(path, map_location="cpu", weights_only=True)
        else:
            images = self.images(split)[0]
            chunks = []
            for start in range(0, len(images), self.encode_batch_size):
                batch = self._normalised(encoder, images[start:start + self.encode_batch_size])
                if what == "activations":
                    out = run_until(encoder, name, batch)
                else:
                    out = encoder.model.forward_features(batch)
                    out = encoder.model.forward_head(out, pre_logits=what == "pre_logits")
                chunks.append(out.float().cpu())
            value = torch.cat(chunks)
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_suffix(f".tmp{os.getpid()}")
            torch.save(value.half() if what == "activations" else value, partial)
            os.replace(partial, path)  # whole file or nothing, even with several processes
            value = torch.load(path, map_location="cpu", weights_only=True)
        self._memo[key] = value
        return value

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        labels = self.labels(split)
        dataset = TensorDataset(torch.arange(len(labels)), labels)
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=shuffle, generator=generator)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False)


# ----------------------------------------------------------------------------------------------------------------
# The probe and the LightningModule
# ----------------------------------------------------------------------------------------------------------------


def fit_probe(features: Tensor, labels: Tensor, num_classes: int, weight_decay: float = 1e-3, steps: int = 200
              ) -> nn.Linear:
    """Multinomial logistic regression on standardised features (full-batch L-BFGS: deterministic)."""
    mean, std = features.mean(0), features.std(0).clamp_min(1e-6)
    x = (features - mean) / std
    probe = nn.Linear(features.shape[1], num_classes)
    nn.init.zeros_(probe.weight)
    nn.init.zeros_(probe.bias)
    optimizer = torch.optim.LBFGS(probe.parameters(), lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(probe(x), labels) + weight_decay * probe.weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    # Fold the standardisation into the probe so it applies to raw features.
    with torch.no_grad():
        probe.weight.div_(std)
        probe.bias.sub_(probe.weight @ mean)
    return probe.requires_grad_(False)


@dataclass
class _Frozen:
    """Plain holder (not an nn.Module): the networks, caches and probe stay out of the module tree."""

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
                training images, then calibrate the BatchNorm; the usual start, Csiszárik et al. 2021), ``identity``
                (equal widths) or ``default`` (PyTorch's random init).
            lr: Adam learning rate of the stitching layer.
            weight_decay: AdamW weight decay of the stitching layer.
        """
        super().__init__()
        if target not in TARGETS:
            raise ValueError(f"unknown stitching target {target!r}; choose one of {', '.join(TARGETS)}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.save_hyperparameters()
        a = _require_timm(build_encoder(model_a, True, None, {}), "A")
        b = a if model_b == model_a else _require_timm(build_encoder(model_b, True, None, {}), "B")
        self.frozen = _Frozen(a, b)
        self.layer_a, self.layer_b = resolve_layer(a, layer_a), resolve_layer(b, layer_b)
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
    def _dm(self) -> LayerStitchDataModule:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if not isinstance(dm, LayerStitchDataModule):
            raise TypeError("LayerStitchingModule needs a LayerStitchDataModule")
        return dm

    def attach(self, dm: LayerStitchDataModule, device: Union[str, torch.device] = "cpu") -> None:
        """Fill the caches and the probe from ``dm`` (done by ``setup``; call directly to evaluate without a Trainer)."""
        self._data = dm
        for encoder in (self.frozen.a, self.frozen.b):
            encoder.to(device)
        size = dm.image_size
        if size != self._shapes_at:  # spatial sizes depend on the resolution: rebuild the resize target only
            with torch.no_grad():
                sample = dm.normalised_images(self.frozen.b, "train", torch.arange(1))
                out_shape = tuple(run_until(self.frozen.b, self.layer_b, sample).shape[1:])
                sample_a = dm.normalised_images(self.frozen.a, "train", torch.arange(1))
                in_shape = tuple(run_until(self.frozen.a, self.layer_a, sample_a).shape[1:])
            if in_shape[0] != self.stitch.in_shape[0] or out_shape[0] != self.stitch.out_shape[0] or \
                    _kind(in_shape) != self.stitch.kind:
                raise ValueError(f"at {size}px the cut shapes are {in_shape} -> {out_shape}, which the stitching "
                                 f"layer built for {self.stitch.in_shape} -> {self.stitch.out_shape} cannot take")
            self.stitch.in_shape, self.stitch.out_shape = in_shape, out_shape
            self._shapes_at = size
        self.cache = {split: dm.cached(self.frozen.a, "activations", self.layer_a, split) for split in ("train", "val")}
        init = self.hparams.init
        if init != "default" and not bool(self.initialised):
            target = dm.cached(self.frozen.b, "activations", self.layer_b, "train") if init == "lstsq" else None
            self.stitch.init_from_data(self.cache["train"], target, init)
            self.initialised.fill_(True)
        self.b_logits = {split: dm.cached(self.frozen.b, "logits", -1, split) for split in ("train", "val")}
        if self.hparams.target == "labels":
            num_classes = int(max(int(dm.labels(s).max()) for s in ("train", "val"))) + 1
            train_features = dm.cached(self.frozen.b, "pre_logits", -1, "train")
            self.frozen.probe = fit_probe(train_features, dm.labels("train"), num_classes).to(device)
            self.b_outputs = {s: self.frozen.probe(dm.cached(self.frozen.b, "pre_logits", -1, s).to(device)).cpu()
                              for s in ("train", "val")}
        else:
            self.b_outputs = self.b_logits

    def setup(self, stage: str) -> None:
        self.attach(self._dm(), self.trainer.strategy.root_device)

    # ---- forward ----------------------------------------------------------------------------------------------
    def forward(self, activations: Tensor) -> Tensor:
        """Stitched outputs (B's logits, or probe logits for ``target: labels``) from A's cut activations."""
        hidden = self.stitch(activations.float())
        if self.hparams.target == "labels":
            return self.frozen.probe(run_from(self.frozen.b, self.layer_b, hidden, pre_logits=True))
        return run_from(self.frozen.b, self.layer_b, hidden)

    def _step(self, batch, split: str):
        index, labels = batch
        out = self(self.cache[split][index.cpu()].to(self.device))
        reference = self.b_outputs[split][index.cpu()].to(self.device)
        if self.hparams.target == "soft":
            t = self.hparams.temperature
            loss = F.kl_div(F.log_softmax(out / t, 1), F.log_softmax(reference / t, 1), log_target=True,
                            reduction="batchmean") * t * t
        else:
            loss = F.cross_entropy(out, labels)
        return loss, out, reference, labels

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

    def configure_optimizers(self):
        return torch.optim.AdamW(self.stitch.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)

    @torch.no_grad()
    def evaluate(self, split: str = "val") -> Dict[str, float]:
        """Score, B's score and the penalty over a whole split (eval mode), as the sweep reports them."""
        was = self.stitch.training
        self.stitch.eval()
        device = self.stitch.conv.weight.device if self.stitch.kind == "map" else self.stitch.linear.weight.device
        outs = torch.cat([self(chunk.to(device)).cpu() for chunk in self.cache[split].split(128)])
        self.stitch.train(was)
        reference = self.b_outputs[split]
        labels = self._data.labels(split)
        agreement = float((outs.argmax(1) == reference.argmax(1)).float().mean())
        if self.hparams.target == "labels":
            score = float((outs.argmax(1) == labels).float().mean())
            b_score = float((reference.argmax(1) == labels).float().mean())
        else:
            score, b_score = agreement, 1.0
        return {"score": score, "b_score": b_score, "penalty": b_score - score, "agreement": agreement}

    def on_save_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        checkpoint["prh_stitch_layer"] = {"layer_a": self.layer_a, "layer_b": self.layer_b,
                                          "in_shape": list(self.stitch.in_shape),
                                          "out_shape": list(self.stitch.out_shape)}


# ----------------------------------------------------------------------------------------------------------------
# The sweep
# ----------------------------------------------------------------------------------------------------------------


def sweep(
    model_a: str,
    model_b: str,
    layers_a: Sequence[Layer],
    layers_b: Sequence[Layer],
    data: Optional[Dict[str, Any]] = None,
    target: str = "soft",
    epochs: int = 3,
    lr: float = 1e-3,
    out_dir: Optional[str] = None,
    seed: int = 0,
) -> Dict[str, Any]:
    """Train a stitching layer for every (layer_a, layer_b) and report the penalty matrix.

    Returns ``{"model_a", "model_b", "layers_a", "layers_b", "target", "score", "penalty", "b_score",
    "seconds"}`` with ``score``/``penalty`` as ``len(layers_a) × len(layers_b)`` lists (rows: A's layers). With
    ``out_dir``, writes ``penalty.json``, ``penalty.csv`` and ``penalty.png`` (heatmap) there. A's activations at
    each cut are computed once and shared by every j (and cached on disk for later runs).
    """
    dm = LayerStitchDataModule(**(data or {}))
    # One Trainer per cell: keep Lightning's per-Trainer banner (GPU available, ...) out of the sweep's output.
    for name in ("pytorch_lightning", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    if not layers_a or not layers_b:
        raise ValueError("give at least one layer of each model to sweep")
    score = [[0.0] * len(layers_b) for _ in layers_a]
    penalty = [[0.0] * len(layers_b) for _ in layers_a]
    names_a: List[str] = []
    names_b: List[str] = []
    b_score = None
    start = time.perf_counter()
    for r, la in enumerate(layers_a):
        for c, lb in enumerate(layers_b):
            pl.seed_everything(seed, verbose=False)
            module = LayerStitchingModule(model_a, model_b, la, lb, target=target, lr=lr)
            trainer = pl.Trainer(max_epochs=epochs, logger=False, enable_checkpointing=False,
                                 enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                                 devices=1, num_sanity_val_steps=0, limit_val_batches=0)
            trainer.fit(module, datamodule=dm)
            result = module.evaluate("val")
            score[r][c], penalty[r][c], b_score = result["score"], result["penalty"], result["b_score"]
            if r == 0:
                names_b.append(module.layer_b)
            if c == 0:
                names_a.append(module.layer_a)
            log.info("%s %s -> %s %s: score %.4f, penalty %.4f", model_a, module.layer_a, model_b, module.layer_b,
                     result["score"], result["penalty"])
            print(f"  {model_a}:{module.layer_a} -> {model_b}:{module.layer_b}: score {result['score']:.4f} "
                  f"penalty {result['penalty']:+.4f}", flush=True)
    report = {"model_a": model_a, "model_b": model_b, "layers_a": names_a, "layers_b": names_b, "target": target,
              "metric": "accuracy" if target == "labels" else "agreement with B", "b_score": b_score,
              "score": score, "penalty": penalty, "epochs": epochs, "seconds": time.perf_counter() - start}
    if out_dir:
        write_report(report, out_dir)
    return report


def write_report(report: Dict[str, Any], out_dir: str) -> None:
    """``penalty.json``, ``penalty.csv`` (rows: A's layers) and ``penalty.png`` (heatmap) in ``out_dir``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "penalty.json").write_text(json.dumps(report, indent=2))
    with open(out / "penalty.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([f"{report['model_a']} \\ {report['model_b']}"] + report["layers_b"])
        for name, row in zip(report["layers_a"], report["penalty"]):
            writer.writerow([name] + [f"{v:.4f}" for v in row])
    matrix = np.array(report["penalty"])
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * matrix.shape[1], 1.0 + 0.8 * matrix.shape[0]))
    image = ax.imshow(matrix, cmap="magma_r", vmin=min(0.0, float(matrix.min())), vmax=max(1e-6, float(matrix.max())))
    ax.set_xticks(range(matrix.shape[1]), report["layers_b"], rotation=45, ha="right")
    ax.set_yticks(range(matrix.shape[0]), report["layers_a"])
    ax.set_xlabel(f"B = {report['model_b']} (resumes after)")
    ax.set_ylabel(f"A = {report['model_a']} (cut at)")
    for (i, j), value in np.ndenumerate(matrix):
        ax.text(j, i, f"{value:.2f}", ha="center", va="center", color="white" if value > matrix.max() / 2 else "black")
    ax.set_title(f"stitching penalty ({report['metric']})")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(out / "penalty.png", dpi=120)
    plt.close(fig)


def _layer_arg(text: str) -> Layer:
    return int(text) if text.lstrip("-").isdigit() else text


def main_sweep(argv: Optional[List[str]] = None) -> int:
    """``evaluate.py layer-sweep``: train every cut of two layer lists and write the penalty matrix and heatmap."""
    parser = argparse.ArgumentParser(prog="evaluate.py layer-sweep", description=main_sweep.__doc__)
    parser.add_argument("--model-a", default="efficientnet_lite0")
    parser.add_argument("--model-b", default="efficientnet_lite2")
    parser.add_argument("--layers-a", nargs="+", type=_layer_arg, default=["blocks.2", "blocks.4", "blocks.6"])
    parser.add_argument("--layers-b", nargs="+", type=_layer_arg, default=["blocks.2", "blocks.4", "blocks.6"])
    parser.add_argument("--target", choices=TARGETS, default="soft")
    parser.add_argument("--source", default="scenes", help="scenes or fashion_mnist")
    parser.add_argument("--n-train", type=int, default=512)
    parser.add_argument("--n-val", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--out", default="runs/layer_sweep", help="folder for penalty.json/.csv/.png")
    args = parser.parse_args(argv)
    data = {"source": args.source, "n_train": args.n_train, "n_val": args.n_val, "image_size": args.image_size,
            "batch_size": args.batch_size}
    try:
        report = sweep(args.model_a, args.model_b, args.layers_a, args.layers_b, data=data, target=args.target,
                       epochs=args.epochs, lr=args.lr, out_dir=args.out)
    except (ValueError, FileNotFoundError) as exc:
        print(f"evaluate.py layer-sweep: error: {exc}", file=sys.stderr)
        return 2
    print(f"B alone ({report['metric']}): {report['b_score']:.4f}; penalty matrix (rows {args.model_a}, "
          f"columns {args.model_b}) in {args.out}/penalty.png, .csv, .json ({report['seconds']:.0f} s)")
    return 0
