"""Frozen encoders built from fetched zoo folders. Loading needs none of the fetch-time packages (onnx, gguf, pyarrow)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict

import torch

from prh_stitch.encoders.base import FrozenEncoder


def _hf_text(folder: Path, name: str, model_class: str, max_length: int, **model_kwargs: Any) -> FrozenEncoder:
    import transformers

    from prh_stitch.encoders.hf_backend import HFTextEncoder

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
    model = getattr(transformers, model_class).from_pretrained(str(folder), dtype=torch.float32, **model_kwargs)
    return HFTextEncoder(str(folder), name=name, model=model, tokenizer=tokenizer, max_length=max_length,
                         default_pooling="mean")


def mpnet_base(folder: Path, max_length: int = 128, **_: Any) -> FrozenEncoder:
    # The checkpoint carries MPNet's (unused) pooler, so the default architecture loads it exactly.
    return _hf_text(folder, "mpnet_base", "MPNetModel", max_length)


def paraphrase_minilm_l3(folder: Path, max_length: int = 128, **_: Any) -> FrozenEncoder:
    # The ONNX export has no pooler: building one would add random, run-dependent weights to the fingerprint.
    return _hf_text(folder, "paraphrase_minilm_l3", "BertModel", max_length, add_pooling_layer=False)


def smollm2_135m(folder: Path, max_length: int = 128, **_: Any) -> FrozenEncoder:
    # The decoder body (LlamaModel) without the LM head: its 31 hidden states, mean-pooled over real tokens.
    return _hf_text(folder, "smollm2_135m", "LlamaModel", max_length)


def glove_6b_50d(folder: Path, max_words: int = 128, **_: Any) -> FrozenEncoder:
    from prh_stitch.encoders.static_vectors import StaticWordEncoder

    return StaticWordEncoder.from_folder(folder, "glove_6b_50d", max_words=max_words)


def mobilenet_v2(folder: Path, **_: Any) -> FrozenEncoder:
    import json

    from prh_stitch.encoders.torchvision_backend import TorchvisionEncoder
    from prh_stitch.encoders.weights import load_state_dict_file, load_strict
    from prh_stitch.zoo.converters.torchvision_pth import torchvision_model

    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    model = torchvision_model(config["architecture"], config["num_classes"])
    load_strict(model, load_state_dict_file(str(folder / "model.safetensors")), f"mobilenet_v2 from {folder}")
    return TorchvisionEncoder(model, "mobilenet_v2")


BUILDERS: Dict[str, Callable[..., FrozenEncoder]] = {
    "mpnet_base": mpnet_base,
    "paraphrase_minilm_l3": paraphrase_minilm_l3,
    "glove_6b_50d": glove_6b_50d,
    "smollm2_135m": smollm2_135m,
    "mobilenet_v2": mobilenet_v2,
}
