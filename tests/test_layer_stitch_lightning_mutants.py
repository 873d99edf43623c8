"""The layer-stitching module's wiring, fast: which weights it asks for, what it reads from the data module, and
where setup and attach put things; and the label probe on a hard set, against SciPy.

Without an accelerator a device cannot be told from the CPU by the results, so the device hand-over is checked on the
calls themselves: what ``setup`` passes to ``attach``, and what ``attach`` passes to ``.to`` of the frozen networks and
the probe.
"""

import numpy as np
import pytest
import timm
import torch

import prh_stitch.layer_stitch.lightning as lightning
from prh_stitch.layer_stitch import LayerStitchingModule
from prh_stitch.layer_stitch.probe import fit_probe
from test_layer_stitch_steps import cut, data, trainer


def test_the_frozen_networks_are_asked_for_their_pretrained_weights_and_one_network_serves_both_sides(monkeypatch):
    built = []
    create_model = timm.create_model

    def offline_create_model(name, pretrained=False, **kwargs):
        built.append((name, pretrained))
        return create_model(name, pretrained=False, **kwargs)  # the same architecture, without the download

    monkeypatch.setattr(timm, "create_model", offline_create_model)
    LayerStitchingModule("timm:test_resnet", "timm:test_efficientnet", "layer1", "blocks.1")
    assert built == [("test_resnet", True), ("test_efficientnet", True)]
    built.clear()
    same = LayerStitchingModule("timm:test_resnet", "timm:test_resnet", "layer1", "layer2")
    assert built == [("test_resnet", True)]  # built once: A and B are one network
    assert same.frozen.b is same.frozen.a


def test_attach_puts_both_networks_and_the_probe_on_the_device_it_is_given(tmp_path, monkeypatch):
    module = cut(target="labels")
    device = torch.device("cpu")
    moved = []

    def recording(what, move):
        return lambda *args, **kwargs: (moved.append((what, args)), move(*args, **kwargs))[1]

    assert module.frozen.a is module.frozen.b  # one network on both sides: attach moves it once per side
    monkeypatch.setattr(module.frozen.a, "to", recording("network", module.frozen.a.to))
    fit_probe = lightning.fit_probe

    def recorded_fit_probe(*args, **kwargs):
        probe = fit_probe(*args, **kwargs)
        probe.to = recording("probe", probe.to)
        return probe

    monkeypatch.setattr(lightning, "fit_probe", recorded_fit_probe)
    module.attach(data(tmp_path), device)
    assert moved == [("network", (device,)), ("network", (device,)), ("probe", (device,))]


def test_setup_attaches_the_trainers_data_module_on_the_trainers_root_device(tmp_path, monkeypatch):
    dm, module = data(tmp_path), cut()
    attached = []
    attach = module.attach
    monkeypatch.setattr(module, "attach", lambda *args: (attached.append(args), attach(*args))[1])
    fit = trainer(max_steps=1, limit_val_batches=0)
    fit.fit(module, datamodule=dm)
    assert attached == [(dm, fit.strategy.root_device)]


def test_attach_reads_b_at_its_cut_only_for_the_least_squares_start(tmp_path, monkeypatch):
    """B's activations over the training split are the regression target of ``lstsq``; ``identity`` and ``default``
    never need them (a whole pass of B saved)."""
    for init in ("identity", "default", "lstsq"):
        dm = data(tmp_path)
        asked = []
        cached = dm.cached

        def recording_cached(encoder, what, layer, split, cached=cached, asked=asked):
            asked.append((what, layer if what == "activations" else None, split))
            return cached(encoder, what, layer, split)

        monkeypatch.setattr(dm, "cached", recording_cached)
        pl_module = LayerStitchingModule("tiny_resnet", "tiny_resnet", "layer1", "layer1", init=init)
        pl_module.attach(dm)
        a_cut = [("activations", "layer1", "train"), ("activations", "layer1", "val")]
        b_cut = [("activations", "layer1", "train")] if init == "lstsq" else []
        assert asked == a_cut + b_cut + [("logits", None, "train"), ("logits", None, "val")], init


class _MoveRecordingTensor(torch.Tensor):
    """A tensor that notes every ``.to`` call made on it or on what is indexed or computed from it."""

    moves = []

    def to(self, *args, **kwargs):
        _MoveRecordingTensor.moves.append(args)
        return super().to(*args, **kwargs)


def test_a_steps_inputs_and_references_and_the_probe_features_go_to_the_modules_device(tmp_path, monkeypatch):
    dm, module = data(tmp_path), cut(target="labels")
    device = torch.device("cpu")
    cached = dm.cached

    def recording_features(encoder, what, layer, split):
        value = cached(encoder, what, layer, split)
        return value.as_subclass(_MoveRecordingTensor) if what == "pre_logits" else value

    monkeypatch.setattr(dm, "cached", recording_features)
    monkeypatch.setattr(_MoveRecordingTensor, "moves", [])
    module.attach(dm, device)
    # The probe's features (pre-logits of both splits) were moved to the device the probe was put on.
    assert _MoveRecordingTensor.moves == [(device,), (device,)]
    index = torch.tensor([0, 3, 5])
    batch = (index, dm.labels("train")[index])
    for inputs in ("cache", "b_outputs"):  # A's activations at the cut, then B's outputs
        plain = getattr(module, inputs)
        monkeypatch.setattr(module, inputs, {s: v.as_subclass(_MoveRecordingTensor) for s, v in plain.items()})
        monkeypatch.setattr(_MoveRecordingTensor, "moves", [])
        module._step(batch, "train")
        assert _MoveRecordingTensor.moves[:1] == [(module.device,)], inputs
        monkeypatch.setattr(module, inputs, plain)


# ---------------------------------------------------------------- the probe

def _probe_objective(features, labels, num_classes, weight_decay):
    """fit_probe's objective in float64 (mean cross-entropy + weight_decay·|W|² on standardised features), as a
    function of the standardised-space parameters, with its SciPy minimum."""
    from scipy.optimize import minimize

    x = features.double().numpy()
    mean, std = x.mean(0), np.maximum(x.std(0, ddof=1), 1e-6)
    z, onehot, d = (x - mean) / std, np.eye(num_classes)[labels.numpy()], x.shape[1]

    def objective(w, b):
        logits = z @ w.T + b
        logits = logits - logits.max(1, keepdims=True)
        log_p = logits - np.log(np.exp(logits).sum(1, keepdims=True))
        return -(onehot * log_p).sum(1).mean() + weight_decay * (w ** 2).sum(), np.exp(log_p)

    def value_and_gradient(theta):
        w, b = theta[:num_classes * d].reshape(num_classes, d), theta[num_classes * d:]
        value, p = objective(w, b)
        grad_logits = (p - onehot) / len(z)
        return value, np.concatenate([(grad_logits.T @ z + 2 * weight_decay * w).ravel(), grad_logits.sum(0)])

    best = minimize(value_and_gradient, np.zeros(num_classes * (d + 1)), jac=True, method="L-BFGS-B",
                    options={"gtol": 1e-10, "ftol": 1e-15, "maxiter": 5000}).fun

    def of_probe(probe):  # the raw-feature layer back in standardised space: W·std, b + W_raw·mean
        w_raw, b_raw = probe.weight.double().numpy(), probe.bias.double().numpy()
        return objective(w_raw * std, b_raw + w_raw @ mean)[0]

    return of_probe, best


@pytest.mark.parametrize("seed, rows, width, classes", [(30, 100, 5, 4), (19, 30, 30, 3)])
def test_the_probe_reaches_the_optimum_when_one_row_lies_a_thousand_deviations_out(seed, rows, width, classes):
    """Standardising does not tame an outlier row: the objective is far from quadratic there. Plain unit L-BFGS
    steps overshoot on these sets (objective 61591 and 134 instead of 1.30 and 0.52); the line search reaches the
    optimum."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (rows,), generator=g)
    features = torch.randn(rows, width, generator=g)
    features[0] *= 1000
    of_probe, best = _probe_objective(features, labels, classes, 1e-5)
    assert of_probe(fit_probe(features, labels, classes, 1e-5)) - best < 1e-4
