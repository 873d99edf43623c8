"""Loading trained stitchers from Lightning checkpoints, stitcher folders or Hub ids, never unpickling arbitrary objects."""

from __future__ import annotations

import os
from typing import Any, Dict, Tuple

import torch

from prh_stitch.encoders.base import EncoderSpec
from prh_stitch.errors import UserError
from prh_stitch.stitchers import Stitcher

CHECKPOINT_KEY = "prh_stitch"


def read_checkpoint(path: str | os.PathLike) -> Dict[str, Any]:
    """``torch.load(weights_only=True)``: tensors and plain containers only, never arbitrary classes."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(
            f"refusing to load {path!r}: it is not a checkpoint that loads safely as plain tensors and data "
            f"({first_line[:200]}). prh_stitch never unpickles arbitrary objects; was the file tampered with "
            "or written by another program?"
        ) from None
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path!r} is not a Lightning checkpoint (top level is {type(checkpoint).__name__})")
    return checkpoint


def read_stitcher_checkpoint(path: str | os.PathLike) -> Tuple[Dict[str, Any], Dict[str, torch.Tensor]]:
    """``(metadata, stitcher state dict)`` of a prh_stitch training checkpoint, read without unpickling."""
    checkpoint = read_checkpoint(path)
    meta = checkpoint.get(CHECKPOINT_KEY)
    if not isinstance(meta, dict) or "stitcher" not in meta or "state_dict" not in checkpoint:
        raise ValueError(f"{os.fspath(path)!r} is not a prh_stitch checkpoint (no {CHECKPOINT_KEY!r} section)")
    prefix = "stitcher."
    state = {k[len(prefix):]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
    return meta, state


def load_stitcher(path: str | os.PathLike, map_location: str | torch.device = "cpu", **hub_options: Any) -> Stitcher:
    """The trained stitcher of a checkpoint, a stitcher folder or a Hugging Face Hub id, ready to map source
    features to the target space.

    ``path`` is a Lightning ``.ckpt`` file (``torch.load(weights_only=True)``), a folder written by
    ``HubStitcher.save_pretrained`` (``train.py`` leaves one next to ``last.ckpt``) or a Hub repository id
    (``owner/name``; ``hub_options`` such as ``revision`` or ``cache_dir`` go to huggingface_hub). None of them
    unpickles anything. The returned module (in eval mode) includes the fitted input/output normalisation and
    carries what it expects as attributes: ``source_spec`` / ``target_spec`` (:class:`EncoderSpec`: encoder
    name, layer, pooling, weights) and ``source_layer`` / ``target_layer`` (resolved layer names).
    """
    if not os.path.isfile(path):
        from prh_stitch.model_folder import load_stitcher_folder

        if os.path.isdir(path) or _looks_like_hub_id(os.fspath(path)):
            return load_stitcher_folder(path, map_location=map_location, **hub_options)
    if hub_options:
        raise TypeError(f"options {sorted(hub_options)} apply to stitcher folders and Hub ids, not to the checkpoint "
                        f"file {os.fspath(path)!r}")
    meta, state = read_stitcher_checkpoint(path)
    try:
        stitcher = Stitcher(**meta["stitcher"])
        stitcher.load_state_dict(state, strict=True)
    except (TypeError, RuntimeError) as exc:  # metadata and weights disagree: an edited or foreign file
        from prh_stitch.errors import state_dict_problem

        detail = state_dict_problem(exc)
        raise ValueError(f"{os.fspath(path)!r}: its metadata describes a stitcher {meta['stitcher'].get('name')!r} "
                         f"that its weights do not fit ({detail}); the file was edited or mixed up: use the "
                         "checkpoint as train.py wrote it, or retrain") from None
    stitcher.source_spec = EncoderSpec.coerce(meta["source"])
    stitcher.target_spec = EncoderSpec.coerce(meta["target"])
    stitcher.source_layer = meta.get("source_layer")
    stitcher.target_layer = meta.get("target_layer")
    stitcher.source_fingerprint = meta.get("source_fingerprint")
    stitcher.target_fingerprint = meta.get("target_fingerprint")
    return stitcher.to(map_location).eval()


def check_trained_with(stitcher: Stitcher, side: str, fingerprint: str) -> None:
    """Refuse to apply a stitcher to a ``side`` ("source" / "target") whose features it was not trained on.

    ``fingerprint`` is what the encoder (or language model) built now gives for the stitched layer and pooling;
    the stitcher carries the one recorded at training (None in files written before fingerprints: not checked).
    A mismatch means other weights (a hub model updated, a local file replaced), other preprocessing, layer or
    pooling: the stitcher would map features it never saw and report a meaningless score.
    """
    recorded = getattr(stitcher, f"{side}_fingerprint", None)
    if recorded is not None and recorded != fingerprint:
        spec = getattr(stitcher, f"{side}_spec", None)
        name = getattr(spec, "name", None) or "?"
        raise UserError(f"the stitcher was trained on {side} {name!r} with fingerprint {recorded}, but that {side} "
                        f"now gives {fingerprint}: its weights, preprocessing, layer or pooling differ, so the "
                        f"stitcher would map features it never saw. Use the {side} weights it was trained with "
                        "(its spec's weights/revision), or train a stitcher for these ones")


def _looks_like_hub_id(text: str) -> bool:
    """``owner/name`` with no file suffix and no leading ``.``/``/``: what a missing local path rarely looks like."""
    parts = text.split("/")
    return (len(parts) == 2 and all(parts) and not text.startswith((".", "~"))
            and not text.endswith((".ckpt", ".pt", ".pth", ".safetensors")))
