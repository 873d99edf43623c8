"""Sanity checks of the real, fetched zoo models: does each one load, and does it behave like a trained model?

Each check is one small, well-known behaviour: a sentence encoder puts a paraphrase nearer than an unrelated
sentence; the language model completes "The capital of France is" with " Paris"; the ImageNet classifier names
what is in a real photo. Load times are measured too. These need the downloads, so they are a command, not tests.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List

import torch

SENTENCES = ("A man is playing a guitar.", "Someone is strumming a guitar.", "The stock market fell sharply today.")


@dataclass
class CheckResult:
    name: str
    load_seconds: float
    passed: bool
    detail: str


def _text_separation(encoder) -> tuple:
    batch = encoder.collate([encoder.transform(s) for s in SENTENCES])
    (features,) = encoder.encode(batch, layers=[-1])
    features = torch.nn.functional.normalize(features, dim=-1)
    near, far = float(features[0] @ features[1]), float(features[0] @ features[2])
    return near > far, f"cos(guitar, strumming) {near:.3f} vs cos(guitar, stock market) {far:.3f}"


def _capital_of_france(folder: Path) -> tuple:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    ids = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=3, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    text = tokenizer.decode(out[0, ids["input_ids"].shape[1]:])
    return text.startswith(" Paris"), f"greedy continuation of 'The capital of France is': {text!r}"


def _photo_top1(encoder) -> tuple:
    import matplotlib
    from PIL import Image
    from torchvision.models import MobileNet_V2_Weights

    photo = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    if not photo.is_file():
        return False, f"no test photo at {photo}"
    batch = encoder.collate([encoder.transform(Image.open(photo))])
    with torch.no_grad():
        logits = encoder.model(encoder.model_input(batch))
    probability, index = torch.softmax(logits, -1)[0].max(0)
    label = MobileNet_V2_Weights.IMAGENET1K_V1.meta["categories"][int(index)]
    return label in ("military uniform", "suit", "bow tie", "Windsor tie"), (
        f"top-1 on grace_hopper.jpg: {label!r} (p = {float(probability):.2f})")


def run_checks(names: List[str]) -> List[CheckResult]:
    from prh_stitch.encoders import build_encoder
    from prh_stitch.zoo.store import model_dir

    checks: Dict[str, Callable] = {"mobilenet_v2": _photo_top1}
    results = []
    for name in names:
        started = time.perf_counter()
        encoder = build_encoder(name)
        load_seconds = time.perf_counter() - started
        if name == "smollm2_135m":
            passed, detail = _capital_of_france(model_dir(name))
            batch = encoder.collate([encoder.transform(s) for s in SENTENCES])
            layers = encoder.encode(batch, layers=list(range(encoder.num_layers)))
            detail += f"; {len(layers)} hidden states of width {layers[-1].shape[-1]}"
        else:
            passed, detail = checks.get(name, _text_separation)(encoder)
        results.append(CheckResult(name, load_seconds, passed, detail))
    return results
