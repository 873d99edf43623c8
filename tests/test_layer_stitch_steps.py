"""The layer-stitching Lightning module's steps and the label probe, fast: tiny ResNets on a few dozen 48-pixel scenes.

Every logged or returned number is recomputed here from the module's frozen caches with plain torch (the KL of
softened logits, cross-entropy, argmax agreement), and the probe against an independent optimiser (SciPy).
"""

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from prh_stitch.layer_stitch import LayerStitchDataModule, LayerStitchingModule, StitchLayer
from prh_stitch.layer_stitch.probe import fit_probe
from prh_stitch.layer_stitch.surgery import run_until
from test_module_steps import MemoryLogger


def data(tmp_path, **kwargs):
    options = dict(n_train=16, n_val=12, image_size=48, batch_size=8, cache_dir=str(tmp_path / "cache"))
    options.update(kwargs)
    return LayerStitchDataModule(**options)


def cut(target="soft", init="lstsq", **kwargs):
    pl.seed_everything(0, verbose=False)
    return LayerStitchingModule("tiny_resnet", "tiny_resnet", "layer1", "layer2", target=target, init=init, **kwargs)


def trainer(callbacks=(), **kwargs):
    options = dict(max_epochs=1, logger=MemoryLogger(), enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, accelerator="cpu", devices=1, num_sanity_val_steps=0,
                   log_every_n_steps=1)
    options.update(kwargs)
    return pl.Trainer(callbacks=list(callbacks), **options)


def soft_loss(out, reference, t):
    """KL(p_B || p_stitched) of the temperature-softened outputs, summed over classes, averaged over rows, × T²."""
    p, log_p, log_q = F.softmax(reference / t, 1), F.log_softmax(reference / t, 1), F.log_softmax(out / t, 1)
    return float((p * (log_p - log_q)).sum(1).mean()) * t * t


def outputs(module, split, index):
    with torch.no_grad():
        return module(module.cache[split][index].float())


# ---------------------------------------------------------------- training_step and loss

@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_the_training_step_returns_the_distillation_loss_of_its_batch_and_descending_it_lowers_it(tmp_path,
                                                                                               temperature):
    module = cut(init="default", temperature=temperature)
    dm = data(tmp_path)
    module.attach(dm)
    index = torch.tensor([3, 0, 7, 12, 5])
    labels = dm.labels("train")[index]
    loss = module.training_step((index, labels), 0)
    expected = soft_loss(outputs(module, "train", index), module.b_outputs["train"][index], temperature)
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-5) and expected > 0
    optimizer = module.configure_optimizers()
    loss.backward()
    optimizer.step()
    after = soft_loss(outputs(module, "train", index), module.b_outputs["train"][index], temperature)
    assert after < expected


def test_the_labels_target_trains_on_cross_entropy_through_the_probe(tmp_path):
    module = cut(target="labels", init="default")
    dm = data(tmp_path)
    module.attach(dm)
    index = torch.arange(0, 16, 2)
    labels = dm.labels("train")[index]
    loss = module.training_step((index, labels), 0)
    assert float(loss.detach()) == pytest.approx(float(F.cross_entropy(outputs(module, "train", index), labels)),
                                                 rel=1e-5)
    # The probe's logits over B's own pre-logits features are B's outputs under this target.
    features = dm.cached(module.frozen.b, "pre_logits", -1, "val")
    torch.testing.assert_close(module.b_outputs["val"], module.frozen.probe(features))
    num_classes = int(max(int(dm.labels(s).max()) for s in ("train", "val"))) + 1
    assert module.frozen.probe.out_features == num_classes


def test_the_optimizer_is_adamw_on_the_stitching_layer_only():
    module = cut(lr=0.02, weight_decay=0.25)
    optimizer = module.configure_optimizers()
    assert isinstance(optimizer, torch.optim.AdamW)
    (group,) = optimizer.param_groups
    assert {id(p) for p in group["params"]} == {id(p) for p in module.stitch.parameters()}
    assert group["lr"] == 0.02 and group["weight_decay"] == 0.25


class StepLosses(pl.Callback):
    def __init__(self):
        self.returned, self.logged, self.stitch = [], [], None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.returned.append((float(outputs["loss"]), len(batch[0])))
        self.logged.append(float(trainer.callback_metrics["train/loss_step"]))

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if self.stitch is None:  # the layer as validation ran it (after the hook that recalibrates it)
            self.stitch = {k: v.clone() for k, v in pl_module.stitch.state_dict().items()}


def conv_moments(module, split="train"):
    x = module.stitch.resized(module.cache[split].float())
    z = torch.einsum("oi,bihw->bohw", module.stitch.conv.weight[:, :, 0, 0], x).double()
    return z.mean((0, 2, 3)).float(), z.var((0, 2, 3), unbiased=False).float()


@pytest.mark.parametrize("target", ["soft", "labels"])
def test_validation_logs_the_whole_split_scores_of_the_layer_as_trained(tmp_path, target):
    module, dm, record = cut(target=target, temperature=2.0), data(tmp_path), StepLosses()
    run = trainer([record])
    run.fit(module, datamodule=dm)
    # Training: the step loss as returned, its row-weighted epoch mean (batches of 8 and 8).
    assert record.logged == pytest.approx([loss for loss, _ in record.returned], rel=1e-6)
    epoch = sum(loss * n for loss, n in record.returned) / 16
    assert float(run.callback_metrics["train/loss_epoch"]) == pytest.approx(epoch, rel=1e-6)
    # Validation ran the layer with exact BatchNorm statistics of the training activations (precise BN).
    mean, var = conv_moments(module)
    torch.testing.assert_close(record.stitch["bn.running_mean"], mean, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(record.stitch["bn.running_var"], var, atol=1e-5, rtol=1e-4)
    # What it logged: the whole split's scores (batches of 8 and 4, weighted by rows) of that layer in eval mode.
    module.stitch.load_state_dict(record.stitch)
    module.eval()
    result = module.evaluate("val")
    logged = {k: v for _, m in run.logger.rows for k, v in m.items() if k.startswith("val/")}
    index, labels = torch.arange(12), dm.labels("val")
    out, reference = outputs(module, "val", index), module.b_outputs["val"]
    if target == "soft":
        losses = [soft_loss(out[s], reference[s], 2.0) for s in (slice(0, 8), slice(8, 12))]
        assert set(logged) == {"val/loss", "val/agreement", "val/penalty"}
        assert logged["val/penalty"] == pytest.approx(1.0 - result["agreement"], abs=1e-6)
    else:
        losses = [float(F.cross_entropy(out[s], labels[s])) for s in (slice(0, 8), slice(8, 12))]
        assert set(logged) == {"val/loss", "val/agreement", "val/accuracy", "val/b_accuracy", "val/penalty"}
        assert logged["val/accuracy"] == pytest.approx(result["score"], abs=1e-6)
        assert logged["val/b_accuracy"] == pytest.approx(result["b_score"], abs=1e-6)
        assert logged["val/penalty"] == pytest.approx(result["penalty"], abs=1e-6)
        assert result["score"] == pytest.approx(float((out.argmax(1) == labels).float().mean()))
        assert result["b_score"] == pytest.approx(float((reference.argmax(1) == labels).float().mean()))
    assert logged["val/loss"] == pytest.approx((8 * losses[0] + 4 * losses[1]) / 12, rel=1e-5)
    assert logged["val/agreement"] == pytest.approx(result["agreement"], abs=1e-6)
    assert result["agreement"] == pytest.approx(float((out.argmax(1) == reference.argmax(1)).float().mean()))
    shown = {"train/loss_step", "train/loss_epoch", "val/agreement"} | ({"val/accuracy"} if target == "labels"
                                                                        else set())
    assert set(run.progress_bar_metrics) == shown


def test_training_ends_with_exact_batchnorm_statistics_and_evaluate_keeps_the_mode(tmp_path):
    module, dm = cut(init="default", lr=0.05), data(tmp_path)
    trainer(limit_val_batches=0, max_epochs=2).fit(module, datamodule=dm)
    mean, var = conv_moments(module)
    torch.testing.assert_close(module.stitch.bn.running_mean, mean, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(module.stitch.bn.running_var, var, atol=1e-5, rtol=1e-4)
    for mode in (True, False):
        module.stitch.train(mode)
        before = {k: v.clone() for k, v in module.stitch.state_dict().items()}
        module.evaluate("val")
        assert module.stitch.training is mode
        assert all(torch.equal(v, module.stitch.state_dict()[k]) for k, v in before.items())  # eval mode: no update


def test_attach_measures_shapes_at_the_datas_size_initialises_once_from_the_right_layers(tmp_path):
    dm = data(tmp_path)
    module = cut()
    assert module._shapes_at != 48
    module.attach(dm)
    images = dm.normalised_images(module.frozen.a, "train", torch.arange(1))
    assert module.stitch.in_shape == tuple(run_until(module.frozen.a, "layer1", images).shape[1:])
    assert module.stitch.out_shape == tuple(run_until(module.frozen.b, "layer2", images).shape[1:])
    assert module._shapes_at == 48 and bool(module.initialised)
    # The start is the least-squares map from A's layer1 to B's layer2 activations over the training split.
    reference = StitchLayer(module.stitch.in_shape, module.stitch.out_shape, init="default")
    reference.init_from_data(dm.cached(module.frozen.a, "activations", "layer1", "train"),
                             dm.cached(module.frozen.b, "activations", "layer2", "train"), "lstsq")
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(module.stitch.state_dict()[key], value)
    # A second attach (evaluation after training) never re-initialises the trained weights.
    with torch.no_grad():
        module.stitch.conv.weight.mul_(2.0)
    trained = module.stitch.conv.weight.clone()
    module.attach(dm)
    assert torch.equal(module.stitch.conv.weight, trained)
    torch.testing.assert_close(module.b_outputs["val"], dm.cached(module.frozen.b, "logits", -1, "val"))
    # "default" keeps PyTorch's random start: no data-dependent init, nothing marked as initialised.
    default = cut(init="default")
    start = default.stitch.conv.weight.clone()
    default.attach(dm)
    assert torch.equal(default.stitch.conv.weight, start) and not bool(default.initialised)


def test_setup_refuses_another_data_module():
    module = cut()
    module.trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                                enable_model_summary=False, accelerator="cpu", devices=1)
    with pytest.raises(TypeError, match=r"^LayerStitchingModule needs a LayerStitchDataModule \(data.class_path in "
                                        r"the config\)$"):
        module.setup("fit")


# ---------------------------------------------------------------- the probe

def _independent_probe(features, labels, num_classes, weight_decay):
    """The same objective (mean cross-entropy + weight_decay·|W|² on standardised features), minimised by SciPy."""
    from scipy.optimize import minimize

    x = features.double().numpy()
    mean, std = x.mean(0), np.maximum(x.std(0, ddof=1), 1e-6)
    z = (x - mean) / std
    y = labels.numpy()
    d = z.shape[1]

    def objective(theta):
        w, b = theta[:num_classes * d].reshape(num_classes, d), theta[num_classes * d:]
        logits = z @ w.T + b
        logits -= logits.max(1, keepdims=True)
        log_p = logits - np.log(np.exp(logits).sum(1, keepdims=True))
        p = np.exp(log_p)
        onehot = np.eye(num_classes)[y]
        loss = -(onehot * log_p).sum(1).mean() + weight_decay * (w ** 2).sum()
        grad_logits = (p - onehot) / len(y)
        return loss, np.concatenate([(grad_logits.T @ z + 2 * weight_decay * w).ravel(), grad_logits.sum(0)])

    theta = minimize(objective, np.zeros(num_classes * (d + 1)), jac=True, method="L-BFGS-B",
                     options={"gtol": 1e-10, "ftol": 1e-14, "maxiter": 5000}).x
    w, b = theta[:num_classes * d].reshape(num_classes, d), theta[num_classes * d:]
    return lambda raw: ((raw.double().numpy() - mean) / std) @ w.T + b


def test_the_probe_is_the_regularised_logistic_regression_on_standardised_features_applied_to_raw_ones():
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(60) % 3
    centres = torch.randn(3, 5, generator=g) * 0.8
    scales = torch.tensor([1.0, 10.0, 0.1, 3.0, 0.5])  # unequal scales: standardisation matters
    features = (centres[labels] + torch.randn(60, 5, generator=g)) * scales + torch.tensor([5.0, -2, 0, 1, 30])
    probe = fit_probe(features, labels, 3)
    assert not any(p.requires_grad for p in probe.parameters())
    test = features[:20] + 0.3 * torch.randn(20, 5, generator=g) * scales
    # The biases are not penalised, so the logits are defined up to one shift per row: compare log-probabilities.
    log_softmax = lambda logits: logits - np.log(np.exp(logits).sum(1, keepdims=True))  # noqa: E731
    for weight_decay in (1e-3, 0.1):
        probe = fit_probe(features, labels, 3) if weight_decay == 1e-3 else fit_probe(features, labels, 3, 0.1)
        reference = _independent_probe(features, labels, 3, weight_decay)
        np.testing.assert_allclose(log_softmax(probe(test).double().numpy()), log_softmax(reference(test)),
                                   atol=2e-3, rtol=1e-3)


def test_the_probe_takes_a_constant_feature_and_few_steps():
    labels = torch.tensor([0, 1] * 10)
    features = torch.stack([labels.float() * 2 - 1 + 0.1 * torch.randn(20), torch.full((20,), 4.0)], 1)
    probe = fit_probe(features, labels, 2)
    assert torch.isfinite(probe.weight).all() and (probe(features).argmax(1) == labels).all()
    short = fit_probe(features, labels, 2, steps=1)  # one L-BFGS iteration: not yet the optimum
    assert not torch.allclose(short.weight, probe.weight, atol=1e-3)


# ---------------------------------------------------------------- whole error lines

def test_cuts_of_different_kinds_are_refused_with_the_whole_line():
    with pytest.raises(ValueError) as error:
        StitchLayer((8, 4, 4), (16,))
    assert str(error.value) == ("cannot stitch a map of shape (8, 4, 4) into a vector of shape (16,): both cuts must "
                                "give spatial maps, both token sequences, or both pooled vectors (pick layers of the "
                                "same kind)")


def test_a_network_that_is_not_timm_is_refused_naming_it():
    from prh_stitch.layer_stitch.surgery import require_timm

    class Unnamed:
        def __repr__(self):
            return "<an unnamed network>"

    for encoder, shown in ((Unnamed(), "<an unnamed network>"), (type("Text", (), {"name": "minilm"})(), "'minilm'")):
        with pytest.raises(ValueError) as error:
            require_timm(encoder, "B")
        assert str(error.value) == (f"model B ({shown}) is not a timm vision network; layer-to-layer stitching needs "
                                    "two (e.g. efficientnet_lite0, tiny_resnet, tiny_vit)")


@pytest.mark.parametrize("name, cut", [("tiny_resnet", "layer1"), ("tiny_vit", 0)])
def test_running_a_network_up_to_a_cut_does_not_run_the_layers_after_it(name, cut):
    """``run_until`` stops at the cut (timm's ``stop_early``): the blocks after it never run."""
    from prh_stitch.encoders import build_encoder

    encoder = build_encoder(name, True, None, {})
    later = "layer4" if name == "tiny_resnet" else f"blocks.{len(encoder.model.blocks) - 1}"
    assert later != encoder.layer_names[encoder.resolve_layer(cut)]
    ran = []
    handle = encoder.model.get_submodule(later).register_forward_hook(lambda *args: ran.append(later))
    try:
        size = encoder.data_config["input_size"][-1]
        with torch.no_grad():
            run_until(encoder, cut, torch.zeros(1, 3, size, size))
            assert ran == []
            encoder.model(torch.zeros(1, 3, size, size))  # the hook itself works
        assert ran == [later]
    finally:
        handle.remove()


def test_the_hyperparameters_are_every_constructor_argument():
    module = cut(target="labels", init="default", temperature=3.0, lr=0.02, weight_decay=0.5)
    assert dict(module.hparams) == {"model_a": "tiny_resnet", "model_b": "tiny_resnet", "layer_a": "layer1",
                                    "layer_b": "layer2", "target": "labels", "temperature": 3.0, "init": "default",
                                    "lr": 0.02, "weight_decay": 0.5}
    defaults = LayerStitchingModule("tiny_resnet", "tiny_resnet", "layer1", "layer2").hparams
    assert (defaults["target"], defaults["temperature"], defaults["init"], defaults["lr"], defaults["weight_decay"]) \
        == ("soft", 1.0, "lstsq", 1e-3, 0.0)


def test_a_model_a_that_is_not_timm_is_refused_as_model_a():
    with pytest.raises(ValueError, match=r"^model A \('minilm_l6'\) is not a timm vision network"):
        LayerStitchingModule("minilm_l6", "tiny_resnet", 0, "layer2")


def test_the_default_module_stitches_lite0_block_3_into_lite2_block_3():
    """The defaults (what configs/layer_stitch_lite0_to_lite2.yaml trains) are the documented pair and cut."""
    module = LayerStitchingModule()
    assert (module.hparams["model_a"], module.hparams["model_b"]) == ("efficientnet_lite0", "efficientnet_lite2")
    assert (module.layer_a, module.layer_b) == ("blocks.3", "blocks.3")
    assert (module.frozen.a.name, module.frozen.b.name) == ("efficientnet_lite0", "efficientnet_lite2")
