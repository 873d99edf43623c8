"""Small helpers shared by the converters: find a file in unpacked distributions, write tensors reproducibly."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List

import torch


def find_all(root: Path, pattern: str) -> List[Path]:
    return sorted(p for p in Path(root).glob(pattern) if p.is_file())


def find_one(root: Path, pattern: str) -> Path:
    found = find_all(root, pattern)
    if len(found) != 1:
        raise ValueError(
            f"expected exactly one file matching {pattern!r} under {root}, found {len(found)}; "
            "the downloaded package is not the version this zoo entry was written for"
        )
    return found[0]


def save_tensors(state_dict: Dict[str, torch.Tensor], path: Path) -> None:
    """Write a ``.safetensors`` file whose bytes depend only on the tensors (names, dtypes, shapes, values).

    safetensors orders tensors itself and writes no timestamps, so only the metadata has to be fixed; tensors are
    made contiguous and detached from any shared storage (tied weights must be dropped by the caller beforehand).
    """
    from safetensors.torch import save_file

    tensors = {key: value.detach().to("cpu").contiguous().clone() for key, value in sorted(state_dict.items())}
    save_file(tensors, str(path), metadata={"format": "pt"})
