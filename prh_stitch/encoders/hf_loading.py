"""Loading Hugging Face models for the ``hf:`` encoders: library options passed through, towers picked out.

The loading options are constructor arguments of every ``hf:`` encoder (so a config's ``options`` map one to one
onto them) and go to ``from_pretrained`` unchanged: ``torch_dtype`` ("bfloat16", "float16", "float32" or "auto"),
``device_map`` ("auto", "cuda:0", a dict ...: accelerate spreads a large model over one or several GPUs),
``revision``, ``trust_remote_code`` and ``attn_implementation`` ("sdpa", "eager", "flash_attention_2").

Two-tower models (CLIP, SigLIP, AltCLIP ...) hold a vision and a text tower; ``hf:PATH#vision`` and
``hf:PATH#text`` name one of them. A tower brings the model's own ``projection`` into the shared embedding space.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn

from prh_stitch.encoders.weights import load_state_dict_file, load_strict

TOWERS = ("vision", "text")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


@dataclass
class LoadingOptions:
    """What ``from_pretrained`` is told besides the path; None leaves the library's default."""

    torch_dtype: Optional[str] = None
    device_map: Any = None
    revision: Optional[str] = None
    trust_remote_code: bool = False
    attn_implementation: Optional[str] = None

    def __post_init__(self) -> None:
        if self.torch_dtype is not None and self.torch_dtype != "auto" and self.torch_dtype not in DTYPES:
            raise ValueError(f"unknown torch_dtype {self.torch_dtype!r}; use one of {sorted(DTYPES)} or 'auto'")

    def from_pretrained_kwargs(self) -> Dict[str, Any]:
        import transformers

        kwargs: Dict[str, Any] = {"trust_remote_code": self.trust_remote_code}
        if self.torch_dtype is not None:
            dtype = self.torch_dtype if self.torch_dtype == "auto" else DTYPES[self.torch_dtype]
            # transformers 4.56 renamed the argument to `dtype`; older releases only know `torch_dtype`.
            major, minor = (int(p) for p in transformers.__version__.split(".")[:2])
            kwargs["dtype" if (major, minor) >= (4, 56) else "torch_dtype"] = dtype
        for key in ("device_map", "revision", "attn_implementation"):
            if getattr(self, key) is not None:
                kwargs[key] = getattr(self, key)
        return kwargs


def split_tower(model_id: str) -> Tuple[str, Optional[str]]:
    """``"PATH#text"`` -> ``("PATH", "text")``; a name without ``#`` names no tower."""
    path, sep, tower = model_id.rpartition("#")
    if not sep:
        return model_id, None
    if tower not in TOWERS:
        raise ValueError(f"encoder 'hf:{model_id}': unknown tower {tower!r}; use '#vision' or '#text'")
    return path, tower


def load_hf_model(path: str, pretrained: bool, checkpoint: Optional[str], options: LoadingOptions) -> nn.Module:
    """``AutoModel`` from a hub id or local folder: its weights, a ``checkpoint`` file's, or random (architecture only)."""
    from transformers import AutoConfig, AutoModel

    kwargs = options.from_pretrained_kwargs()
    try:
        if pretrained and checkpoint is None:
            # Parts a checkpoint lacks (ViT's pooler in DINO checkpoints) are newly initialised: from a fixed seed,
            # so the weights digest, and with it the feature store's key, is the same on every load.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                return AutoModel.from_pretrained(path, **kwargs)
        config = AutoConfig.from_pretrained(path, revision=options.revision,
                                            trust_remote_code=options.trust_remote_code)
    except OSError as exc:
        raise ValueError(
            f"could not load Hugging Face model {path!r}: {str(exc).splitlines()[0]} "
            "Give an existing local folder, or a hub id while online (it is cached for offline use after)."
        ) from None
    extra = {"attn_implementation": options.attn_implementation} if options.attn_implementation else {}
    model = AutoModel.from_config(config, trust_remote_code=options.trust_remote_code, **extra)
    if checkpoint is not None:
        load_strict(model, load_state_dict_file(checkpoint), f"model {path!r} from {checkpoint!r}")
    if options.torch_dtype not in (None, "auto"):
        model = model.to(DTYPES[options.torch_dtype])
    return model


def is_two_tower(model: nn.Module) -> bool:
    return all(hasattr(model, f"{tower}_model") for tower in TOWERS)


def pick_tower(model: nn.Module, path: str, tower: Optional[str]) -> Tuple[nn.Module, Optional[nn.Module]]:
    """(the tower, its projection into the shared space) of a two-tower model; (model, None) for a one-tower model.

    The projection is the model's ``visual_projection`` / ``text_projection`` applied to the tower's own pooled
    output, which is how CLIP-like models compute ``get_image_features`` / ``get_text_features``; models whose
    pooled output is already the shared embedding (SigLIP) have no projection module, so it is the identity.
    """
    if not is_two_tower(model):
        if tower is not None:
            raise ValueError(f"encoder 'hf:{path}#{tower}': {type(model).__name__} has no separate towers; "
                             "drop the '#' suffix")
        return model, None
    if tower is None:
        raise ValueError(f"encoder 'hf:{path}': {type(model).__name__} has a vision and a text tower; "
                         f"name one: 'hf:{path}#vision' or 'hf:{path}#text'")
    projection = getattr(model, "visual_projection" if tower == "vision" else "text_projection", None)
    return getattr(model, f"{tower}_model"), projection if projection is not None else nn.Identity()


def placed_by_device_map(model: nn.Module, device_map: Any) -> bool:
    """True when the config placed the model (``device_map``; accelerate records a multi-device placement in
    ``hf_device_map``, a one-device map leaves no trace): moving it whole would undo, or break, that placement."""
    return device_map is not None or bool(getattr(model, "hf_device_map", None))


def load_tower(model_name_or_path: str, pretrained: bool, checkpoint: Optional[str], options: LoadingOptions,
               modality: str, encoder_name: str) -> Tuple[nn.Module, Optional[nn.Module], bool]:
    """(tower, projection, placed by ``device_map``) for an encoder of ``modality`` (``image`` or ``text``).

    A ``#vision`` / ``#text`` suffix naming the other modality's tower is refused before anything is loaded: the
    ``hf:`` backend picks the encoder class by the tower, these classes cannot read the other one.
    """
    path, tower = split_tower(model_name_or_path)
    other = "text" if modality == "image" else "vision"
    if tower == other:
        raise ValueError(f"encoder {encoder_name!r} is a {other} tower; build it with the hf: backend")
    full = load_hf_model(path, pretrained, checkpoint, options)
    model, projection = pick_tower(full, path, tower)
    return model, projection, placed_by_device_map(full, options.device_map)
