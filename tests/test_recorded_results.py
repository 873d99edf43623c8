"""Numbers that configs take from recorded runs agree with the run's own output file (no transcription slip)."""

import json
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def test_study_zoo_full_probe_scores_are_the_recorded_gpu_run():
    config = yaml.safe_load((REPO / "configs" / "study_zoo.yaml").read_text())
    full = config["competence"]["vision_probe_full"]
    subset = config["competence"]["vision_probe"]
    recorded = json.loads((REPO / "benchmarks/results/2026-11-30-h200/fashion_mnist_probe.json").read_text())
    assert recorded["protocol"]["n_train"] == 60000 and recorded["protocol"]["n_test"] == 10000
    # The recorded run used the shipped probe's protocol, only on all images.
    assert recorded["protocol"]["val_fraction"] == subset["probe"]["val_fraction"]
    assert recorded["protocol"]["seed"] == subset["probe"]["seed"]
    assert set(full["scores"]) == set(recorded["models"]) == set(config["vision"])
    for name, model in recorded["models"].items():
        assert model["n_test"] == 10000 and model["n_fit"] + model["n_val"] == 60000
        assert full["scores"][name] == round(100 * model["top1"], 2), name
    assert "benchmarks/results/2026-11-30-h200/fashion_mnist_probe.json" in full["source"]
