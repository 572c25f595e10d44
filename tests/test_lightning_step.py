import copy

import pytest
import torch
from lightning.pytorch.plugins import MixedPrecision

from helpers import (
    Classifier,
    classification_data,
    loader,
    max_weight_difference,
    reference_loop,
    trainer,
    windows,
)
from lightning_nusam import SAM, SAMON, NuSAM, NuSAMNorm
from lightning_nusam.perturbations import L2Perturbation, NuclearPerturbation


@pytest.mark.parametrize(
    ("callback", "perturbation_cls"),
    [(NuSAM(rho=0.2), NuclearPerturbation), (SAM(rho=0.1), L2Perturbation), (None, None)],
)
def test_lightning_step_equals_plain_pytorch_loop(callback, perturbation_cls):
    dataset = classification_data()
    module = Classifier()
    batches = windows(dataset)
    make = (lambda net: perturbation_cls(net, rho=callback.rho)) if callback else None
    reference = reference_loop(copy.deepcopy(module.net), make, batches)
    trainer(callbacks=[callback] if callback else []).fit(module, loader(dataset))
    assert module.global_step == 6
    assert module.loss_calls == (12 if callback else 6)
    assert max_weight_difference(module.net, reference) == 0.0


def test_start_epoch_gives_plain_steps_before_and_two_passes_after():
    module = Classifier()
    fit = trainer(max_epochs=3, callbacks=[NuSAM(rho=0.1, start_epoch=2)])
    fit.fit(module, loader(classification_data()))
    assert fit.global_step == 18
    assert module.loss_calls == 6 + 6 + 12


def test_start_fraction_counts_planned_steps():
    module = Classifier()
    callback = SAM(rho=0.1, start_fraction=0.5)
    fit = trainer(max_steps=10, max_epochs=-1, callbacks=[callback])
    fit.fit(module, loader(classification_data()))
    assert fit.global_step == 10
    assert module.loss_calls == 5 + 2 * 5


def test_warns_when_the_start_is_never_reached():
    with pytest.warns(UserWarning, match="never"):
        trainer(max_epochs=1, callbacks=[NuSAM(rho=0.1, start_epoch=3)]).fit(
            Classifier(), loader(classification_data()))


@pytest.mark.parametrize(("interval", "frequency", "expected_steps"), [("step", 2, 3), ("epoch", 1, 2)])
def test_lr_scheduler_and_global_step_advance_once_per_step(interval, frequency, expected_steps):
    module = Classifier(scheduler={"interval": interval, "frequency": frequency})
    fit = trainer(max_epochs=2 if interval == "epoch" else 1, callbacks=[NuSAM(rho=0.1)],
                  limit_train_batches=6)
    fit.fit(module, loader(classification_data()))
    assert fit.global_step == 6 * (2 if interval == "epoch" else 1)
    scheduler = fit.lr_scheduler_configs[0].scheduler
    assert scheduler.last_epoch == expected_steps
    assert fit.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.05 * 0.5**expected_steps)


def test_clipping_happens_on_unscaled_second_pass_gradients():
    dataset = classification_data()
    module = Classifier(lr=1.0, gradient_clip_val=1e-3)
    before = copy.deepcopy(module.net)

    def plain_sgd():
        return torch.optim.SGD(module.parameters(), lr=1.0)

    module.configure_optimizers = plain_sgd
    fit = trainer(max_steps=1, callbacks=[SAM(rho=0.05)],
                  plugins=[MixedPrecision("16-mixed", "cpu")])
    fit.fit(module, loader(dataset))
    step = torch.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(module.net.parameters(),
                                                               before.parameters(), strict=True)))
    # the update is lr × the clipped gradient: its norm is the clip value (not clip/scale)
    assert step.item() == pytest.approx(1e-3, rel=1e-3)


def test_fp16_inf_in_first_pass_skips_the_perturbation_cleanly():
    module = Classifier()
    module.inject_inf_at_step = 2
    callback = NuSAM(rho=0.1)
    fit = trainer(max_steps=5, callbacks=[callback], plugins=[MixedPrecision("16-mixed", "cpu")])
    fit.fit(module, loader(classification_data()))
    assert fit.global_step == 5
    assert callback.perturbation.skipped_steps == 1
    assert all(torch.isfinite(p).all() for p in module.parameters())
    assert all(torch.isfinite(u).all() and torch.isfinite(v).all()
               for u, v in callback.perturbation.singular_vectors().values())


def test_bf16_mixed_trains():
    module = Classifier(optimizer="adamw", lr=1e-2)
    dataset = classification_data(n=96)
    fit = trainer(max_epochs=4, precision="bf16-mixed", callbacks=[NuSAM(rho=0.05)])
    fit.fit(module, loader(dataset))
    assert fit.callback_metrics["train/loss_epoch"] < 0.9  # ln(3) = 1.10 at chance
    assert fit.callback_metrics["sam/active_epoch"] == 1.0
    assert torch.isfinite(fit.callback_metrics["sam/sharpness_epoch"])


@pytest.mark.parametrize("callback_cls", [NuSAM, NuSAMNorm, SAM, SAMON])
def test_every_callback_trains_and_logs(callback_cls):
    module = Classifier()
    fit = trainer(max_steps=3, callbacks=[callback_cls(rho=0.05)])
    fit.fit(module, loader(classification_data()))
    for key in ("train/loss_step", "sam/loss_perturbed_step", "sam/sharpness_step", "sam/active_step",
                "sam/rho_step", "sam/skipped_steps_step", "train/accuracy_step"):
        assert key in fit.callback_metrics, key


def test_exception_in_second_pass_leaves_weights_unperturbed():
    module = Classifier()
    before = copy.deepcopy(module.net)
    original = module.compute_loss

    def first_then_fail(batch, batch_idx):
        if module.loss_calls == 0:
            return original(batch, batch_idx)
        raise RuntimeError("boom in the second pass")

    module.compute_loss = first_then_fail
    callback = NuSAM(rho=1.0)
    with pytest.raises(RuntimeError, match="boom"):
        trainer(max_steps=1, callbacks=[callback]).fit(module, loader(classification_data()))
    assert not callback.perturbation.is_perturbed
    assert max_weight_difference(module.net, before) < 1e-6
