"""Loading weights from local files without unpickling arbitrary objects."""

from __future__ import annotations

import os
from typing import Dict, Mapping

import torch
from torch import Tensor


def load_state_dict_file(path: str) -> Dict[str, Tensor]:
    """Read a state dict from ``.safetensors`` or a torch file (``weights_only=True``).

    Common wrappers (``{"state_dict": ...}``, ``{"model": ...}``) are unwrapped. Anything that would need
    arbitrary code to unpickle is refused with a message saying so.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file {path!r} does not exist; check the encoder's 'checkpoint' path")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle.UnpicklingError and friends: say what happened, in one line
        raise ValueError(
            f"could not read weights from {path!r} safely ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
            "only plain tensor state dicts (torch.save(model.state_dict()) or .safetensors) are accepted"
        ) from None
    for wrapper in ("state_dict", "model", "module"):
        if isinstance(obj, Mapping) and wrapper in obj and isinstance(obj[wrapper], Mapping):
            obj = obj[wrapper]
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(f"{path!r} does not hold a state dict of tensors")
    return dict(obj)


def map_state_dict_by_order(source: Mapping[str, Tensor], target: Mapping[str, Tensor], what: str) -> Dict[str, Tensor]:
    """Rename ``source`` tensors to ``target``'s keys, pairing them by position.

    Used for checkpoints that hold the same architecture under other key names (e.g. efficientnet_pytorch
    -> timm). Order alone is a weak guarantee, so every pair's shape must agree, and the counts must match.
    """
    if len(source) != len(target):
        raise ValueError(f"{what}: the file has {len(source)} tensors, the model expects {len(target)}")
    mapped = {}
    for i, ((src_key, src), (dst_key, dst)) in enumerate(zip(source.items(), target.items())):
        if src.shape != dst.shape:
            raise ValueError(
                f"{what}: tensor {i} ({src_key!r}, shape {tuple(src.shape)}) does not match "
                f"{dst_key!r} (shape {tuple(dst.shape)}); the weights file is not this architecture"
            )
        mapped[dst_key] = src
    return mapped


def load_strict(model: torch.nn.Module, state_dict: Mapping[str, Tensor], what: str) -> None:
    """``load_state_dict(strict=True)`` with a short, readable message instead of a wall of keys."""
    result = model.load_state_dict(state_dict, strict=False)
    problems = []
    if result.missing_keys:
        problems.append(f"{len(result.missing_keys)} missing (e.g. {result.missing_keys[:3]})")
    if result.unexpected_keys:
        problems.append(f"{len(result.unexpected_keys)} unexpected (e.g. {result.unexpected_keys[:3]})")
    if problems:
        raise ValueError(f"{what}: weights do not fit the model: " + "; ".join(problems))
