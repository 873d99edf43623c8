"""A torchvision classifier's ``.pth`` state dict -> safetensors, checked by a strict load into the architecture."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict

from prh_stitch.encoders.weights import load_state_dict_file, load_strict
from prh_stitch.zoo.converters.files import find_one, save_tensors


def torchvision_model(architecture: str, num_classes: int) -> Any:
    import torchvision

    builder = getattr(torchvision.models, architecture, None)
    if builder is None:
        raise ValueError(f"torchvision has no model {architecture!r}")
    return builder(weights=None, num_classes=num_classes)


def convert_torchvision_pth(sources: Path, out: Path, options: Dict[str, Any]) -> Dict[str, Any]:
    pth = find_one(sources, options["pth_glob"])
    state = load_state_dict_file(str(pth))  # weights_only=True: a pickle with code in it is refused
    model = torchvision_model(options["architecture"], options["num_classes"])
    load_strict(model, state, f"torchvision {options['architecture']} from {pth.name}")
    save_tensors(model.state_dict(), Path(out) / "model.safetensors")
    config = {"architecture": options["architecture"], "num_classes": options["num_classes"]}
    (Path(out) / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return {"pth": pth.name}
