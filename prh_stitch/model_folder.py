"""A trained stitcher as a shareable model folder: ``config.json`` + ``model.safetensors`` + ``README.md``.

:class:`HubStitcher` is a :class:`~prh_stitch.stitchers.Stitcher` with ``huggingface_hub``'s
``PyTorchModelHubMixin``: ``save_pretrained(folder)``, ``from_pretrained(folder_or_hub_id)`` and
``push_to_hub(repo_id)``. The folder holds only JSON and safetensors, so loading it never unpickles anything.

``config.json`` is everything a user of the stitcher needs besides its weights: the stitcher's construction
arguments (architecture and normalisation), both encoder specs (name, layer, pooling, weights source) with the
resolved layer names and the encoders' fingerprints (weights, preprocessing, layer, pooling), the objective, the
fit, the data splits, and the selected checkpoint's test scores. The model card (``README.md``) is generated from
``config.json`` alone (:mod:`prh_stitch.model_card`), so ``push_to_hub`` writes the same card again.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from huggingface_hub import ModelCard, PyTorchModelHubMixin

from prh_stitch.encoders.base import EncoderSpec
from prh_stitch.stitchers import Stitcher

FOLDER_FORMAT = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
# The checkpoint's metadata copied into config.json as is (see StitchingModule.on_save_checkpoint).
META_KEYS = ("stitcher", "source", "target", "source_layer", "target_layer", "source_fingerprint",
             "target_fingerprint", "objective", "fit", "data")


class HubStitcher(
    Stitcher,
    PyTorchModelHubMixin,
    library_name="prh_stitch",
    tags=["prh_stitch", "model-stitching", "representation-alignment"],
):
    """A :class:`Stitcher` that saves as, and loads from, a model folder or a Hugging Face Hub repository.

    Build one from a training checkpoint with :meth:`from_checkpoint_file`; ``folder_config`` (the content of
    ``config.json``) travels with it, so ``save_pretrained`` and ``push_to_hub`` need no arguments besides
    where to.
    """

    folder_config: Optional[Dict[str, Any]] = None

    @classmethod
    def from_checkpoint_file(cls, path: str | os.PathLike, test: Optional[Dict[str, Any]] = None) -> "HubStitcher":
        """The stitcher of a Lightning checkpoint (read without unpickling), with its metadata as folder config.

        ``test`` is the selected checkpoint's test record (``test.json``'s content); its scores go to the card.
        """
        from prh_stitch.checkpoint import read_stitcher_checkpoint

        meta, state = read_stitcher_checkpoint(path)
        config = {"format": FOLDER_FORMAT, "library": "prh_stitch", "version": meta.get("version"),
                  **{key: meta.get(key) for key in META_KEYS}, "checkpoint": Path(path).name,
                  "test": _test_record(test)}
        return cls._build(config, state)

    @classmethod
    def _build(cls, config: Dict[str, Any], state: Dict[str, torch.Tensor]) -> "HubStitcher":
        stitcher = cls(**config["stitcher"])
        stitcher.load_state_dict(state, strict=True)
        stitcher.folder_config = config
        # The mixin saves this dict as config.json when push_to_hub/save_pretrained get no config of their own.
        stitcher._hub_mixin_config = config
        stitcher.source_spec = EncoderSpec.coerce(config["source"])
        stitcher.target_spec = EncoderSpec.coerce(config["target"])
        stitcher.source_layer = config.get("source_layer")
        stitcher.target_layer = config.get("target_layer")
        stitcher.source_fingerprint = config.get("source_fingerprint")
        stitcher.target_fingerprint = config.get("target_fingerprint")
        return stitcher.eval()

    # ---- the mixin's two hooks ------------------------------------------------------------------------
    def _save_pretrained(self, save_directory: Path) -> None:
        from safetensors.torch import save_file

        from prh_stitch.atomic import atomic_write_text
        from prh_stitch.model_card import model_card_text

        if self.folder_config is None:
            raise ValueError("this HubStitcher has no folder config (encoder specs, data, scores); build it with "
                             "HubStitcher.from_checkpoint_file(ckpt) or HubStitcher.from_pretrained(folder)")
        # save_file, not the mixin's save_model: every tensor is its own (no shared storage in a Stitcher), and the
        # state dict's names are exactly what from_pretrained loads with strict=True.
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(save_directory / WEIGHTS_NAME), metadata={"format": "pt"})
        atomic_write_text(save_directory / CONFIG_NAME, json.dumps(self.folder_config, indent=2, sort_keys=True) + "\n")
        # Written here (the mixin would keep an existing README.md): a re-saved folder gets a card that matches it.
        atomic_write_text(save_directory / "README.md", model_card_text(self.folder_config))

    @classmethod
    def _from_pretrained(cls, *, model_id: str, revision: Optional[str], cache_dir: Any, force_download: bool,
                         local_files_only: bool, token: Any, config: Optional[Dict[str, Any]] = None,
                         map_location: str | torch.device = "cpu", **injected: Any) -> "HubStitcher":
        # ``injected`` is config.json's top-level keys, which the mixin forwards because Stitcher takes **kwargs;
        # anything else is a keyword the caller mistyped.
        unknown = sorted(set(injected) - set(config or {}))
        if unknown:
            raise TypeError(f"HubStitcher.from_pretrained got unexpected keyword(s) {unknown}")
        if config is None or "stitcher" not in config:
            raise ValueError(f"{model_id!r} is not a prh_stitch stitcher folder: it has no {CONFIG_NAME} with a "
                             "'stitcher' section (save one with HubStitcher.save_pretrained)")
        if int(config.get("format", 0)) > FOLDER_FORMAT:
            raise ValueError(f"{model_id!r} was written in stitcher folder format {config['format']}, newer than "
                             f"this prh_stitch reads ({FOLDER_FORMAT}); upgrade prh_stitch")
        weights = _folder_file(model_id, WEIGHTS_NAME, revision=revision, cache_dir=cache_dir,
                               force_download=force_download, local_files_only=local_files_only, token=token)
        from safetensors.torch import load_file

        stitcher = cls._build(config, load_file(weights, device="cpu"))
        return stitcher.to(map_location)

    def generate_model_card(self, *args: Any, **kwargs: Any) -> ModelCard:
        from prh_stitch.model_card import model_card_text

        return ModelCard(model_card_text(self.folder_config))


def _folder_file(model_id: str, filename: str, **download: Any) -> str:
    """A file of a local folder, or of a Hub repository through huggingface_hub's cache (offline if asked)."""
    if os.path.isdir(model_id):
        path = os.path.join(model_id, filename)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"stitcher folder {model_id!r} has no {filename}; was it written by "
                                    "HubStitcher.save_pretrained?")
        return path
    from huggingface_hub import hf_hub_download

    return hf_hub_download(repo_id=model_id, filename=filename, **download)


def _test_record(test: Optional[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    if test is None:
        return None
    from prh_stitch.reports import to_jsonable

    keep = ("split", "checkpoint", "selected_by", "closed_form_tuned_on", "retrieval", "note")
    return to_jsonable({k: test[k] for k in keep if k in test})


def save_stitcher_folder(checkpoint: str | os.PathLike, folder: str | os.PathLike,
                         test: Optional[Dict[str, Any]] = None) -> Path:
    """Write the model folder of a training checkpoint (what ``train.py`` leaves next to ``last.ckpt``)."""
    folder = Path(folder)
    HubStitcher.from_checkpoint_file(checkpoint, test=test).save_pretrained(folder)
    return folder


def load_stitcher_folder(folder_or_hub_id: str | os.PathLike, map_location: str | torch.device = "cpu",
                         **hub_options: Any) -> HubStitcher:
    """``HubStitcher.from_pretrained``: a local folder, or a Hub id (``owner/name``, ``revision=...`` optional)."""
    name = os.fspath(folder_or_hub_id)
    if os.path.isdir(name):
        return HubStitcher.from_pretrained(name, map_location=map_location, **hub_options)
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return HubStitcher.from_pretrained(name, map_location=map_location, **hub_options)
    except (LocalEntryNotFoundError, RepositoryNotFoundError, HfHubHTTPError) as exc:
        # A mistyped local path looks like a Hub id (owner/name): say both readings, not only the Hub's.
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise FileNotFoundError(f"{name!r} is neither a local checkpoint or stitcher folder nor a Hub repository "
                                f"that could be read ({reason}); check the path, or the Hub id and your network "
                                "(HF_HUB_OFFLINE=1 reads only what was downloaded before)") from None
