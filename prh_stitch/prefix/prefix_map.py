"""The trained part of prefix stitching: a registered stitcher core from image features to ``n_prefix`` LM input
embeddings, saved and loaded exactly like every stitcher.

The map *is* a :class:`~prh_stitch.stitchers.Stitcher` (``linear``, ``affine``, ``mlp``, ...) whose output has
``n_prefix * embed_dim`` dimensions, read as ``n_prefix`` rows of the LM's input-embedding width. So a training
checkpoint holds it under ``stitcher.*`` with the usual ``prh_stitch`` metadata, :func:`prh_stitch.load_stitcher`
reads it (without unpickling), and ``train.py`` leaves the usual safetensors folder next to ``last.ckpt``. What
makes it a prefix is recorded as the objective's options (``caption_nll``: ``language_model``, ``n_prefix``,
``embed_dim``), which a folder's ``config.json`` and card carry too; :func:`load_prefix_map` reads them back.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import torch
from torch import Tensor, nn

from prh_stitch.encoders.base import EncoderSpec
from prh_stitch.stitchers import STITCHERS, Stitcher

OBJECTIVE = "caption_nll"


@dataclass
class PrefixMapSpec:
    """Which map to train: a registered stitcher core (``linear``, ``affine``, ``mlp``, ``lowrank``), the
    normalisation of its image-feature input (``standard``: training statistics), and core options."""

    name: str = "affine"
    input_norm: str = "standard"
    options: Dict[str, Any] = field(default_factory=dict)


def build_prefix_stitcher(spec: PrefixMapSpec, in_dim: int, n_prefix: int, embed_dim: int,
                          embedding_std: Optional[float] = None) -> Stitcher:
    """A stitcher to ``n_prefix * embed_dim``; with ``embedding_std``, its initial output is scaled to the LM's own
    token embeddings, so the first prefixes look like token inputs instead of vectors many times their size."""
    if int(n_prefix) < 1:
        raise ValueError(f"n_prefix must be >= 1 (prefix embeddings per image), got {n_prefix}")
    STITCHERS.get(spec.name)
    stitcher = Stitcher(spec.name, in_dim, int(n_prefix) * int(embed_dim), spec.input_norm, "none", **spec.options)
    if embedding_std is not None:
        last = [m for m in stitcher.core.modules() if isinstance(m, nn.Linear)][-1]
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            produced = float(stitcher.core(torch.randn(256, in_dim)).std())
            if produced > 0:
                for parameter in last.parameters():
                    parameter.mul_(embedding_std / produced)
    return stitcher


def as_prefix(flat: Tensor, n_prefix: int) -> Tensor:
    """(N, n_prefix * D) -> (N, n_prefix, D)."""
    return flat.view(flat.shape[0], n_prefix, flat.shape[1] // n_prefix)


@dataclass
class PrefixMap:
    """A loaded map: ``prefix_map(features)`` gives (N, n_prefix, embed_dim) input embeddings of ``language_model``."""

    stitcher: Stitcher
    n_prefix: int
    embed_dim: int
    language_model: str
    source_spec: EncoderSpec
    data: Dict[str, Any]

    def __call__(self, features: Tensor) -> Tensor:
        return as_prefix(self.stitcher(features), self.n_prefix)

    def to(self, device: torch.device | str) -> "PrefixMap":
        self.stitcher.to(device)
        return self


def objective_record(language_model: str, n_prefix: int, embed_dim: int) -> Dict[str, Any]:
    return {"name": OBJECTIVE, "options": {"language_model": language_model, "n_prefix": int(n_prefix),
                                           "embed_dim": int(embed_dim)}}


def load_prefix_map(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> PrefixMap:
    """The map of a prefix-stitching checkpoint (``.ckpt``) or stitcher folder, read without unpickling."""
    if os.path.isdir(path):
        from prh_stitch.model_folder import load_stitcher_folder

        stitcher = load_stitcher_folder(path, map_location=map_location)
        meta = stitcher.folder_config or {}
    else:
        from prh_stitch.checkpoint import load_stitcher, read_stitcher_checkpoint

        meta, _ = read_stitcher_checkpoint(path)
        stitcher = load_stitcher(path, map_location=map_location)
    objective = meta.get("objective") or {}
    if objective.get("name") != OBJECTIVE:
        raise ValueError(f"{os.fspath(path)!r} holds a feature stitcher (objective {objective.get('name')!r}), not a "
                         "prefix map: train one with configs/prefix_smollm2.yaml, or use evaluate.py stitch")
    options = objective["options"]
    n_prefix, embed_dim = int(options["n_prefix"]), int(options["embed_dim"])
    if n_prefix * embed_dim != stitcher.out_dim or not math.isfinite(n_prefix):
        raise ValueError(f"{os.fspath(path)!r}: a {stitcher.out_dim}-d map cannot be {n_prefix} x {embed_dim} prefix "
                         "embeddings; the file was edited or mixed up")
    return PrefixMap(stitcher.eval(), n_prefix, embed_dim, options["language_model"],
                     EncoderSpec.coerce(meta["source"]), dict(meta.get("data") or {}))
