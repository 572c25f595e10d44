"""The callback alone on an ordinary LightningModule (automatic optimization): the same step as
SAMMixin, Lightning's own clipping, schedulers, checkpoints and logging."""

import copy

import lightning as L
import pytest
import torch
from lightning.pytorch.plugins import MixedPrecision
from torch import nn

from helpers import (
    Classifier,
    PlainClassifier,
    classification_data,
    loader,
    make_net,
    max_weight_difference,
    trainer,
)
from lightning_nusam import SAM, SAMON, GaussSAM, NuSAM, NuSAMNorm

CALLBACKS = {"NuSAM": NuSAM, "NuSAMNorm": NuSAMNorm, "SAM": SAM, "SAMON": SAMON, "GaussSAM": GaussSAM}


def fit_both(callback_factory, precision="32-true", net_factory=make_net, scheduler=None, clip=None,
             **fit_kwargs):
    """The same model, data and seed through the drop-in and through the mixin."""
    data = classification_data(n=48)
    dropin = PlainClassifier(net=net_factory(), scheduler=scheduler)
    run = trainer(callbacks=[callback_factory()], precision=precision, gradient_clip_val=clip, **fit_kwargs)
    run.fit(dropin, loader(data))
    mixin = Classifier(net=net_factory(), scheduler=scheduler, gradient_clip_val=clip)
    reference = trainer(callbacks=[callback_factory()], precision=precision, **fit_kwargs)
    reference.fit(mixin, loader(data))
    return dropin, mixin, run, reference


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
@pytest.mark.parametrize("name", ["NuSAM", "SAM"])
def test_dropin_equals_the_mixin_with_clipping_and_a_step_scheduler(name, precision):
    dropin, mixin, run, reference = fit_both(
        lambda: CALLBACKS[name](rho=0.3), precision, clip=0.5, scheduler={"interval": "step", "frequency": 2})
    assert run.global_step == reference.global_step == 6
    assert dropin.passes == ["first", "second"] * 6  # training_step: twice per step, passes named
    difference = max_weight_difference(dropin.net, mixin.net)
    print(f"{name} {precision}: max |w_dropin - w_mixin| = {difference:.3e}")
    assert difference <= 1e-6
    assert run.lr_scheduler_configs[0].scheduler.last_epoch == 3  # Lightning stepped it, every 2nd step
    for key in ("sam/sharpness_epoch", "sam/loss_perturbed_epoch", "sam/active_epoch"):
        assert torch.allclose(run.callback_metrics[key], reference.callback_metrics[key])


@pytest.mark.parametrize("name", sorted(CALLBACKS))
def test_every_callback_on_the_dropin_equals_the_mixin(name):
    dropin, mixin, run, _ = fit_both(lambda: CALLBACKS[name](rho=0.2), max_steps=4)
    assert run.global_step == 4 and dropin.loss_calls == 8
    assert max_weight_difference(dropin.net, mixin.net) <= 1e-6


def test_start_and_plain_steps_before_it():
    module = PlainClassifier()
    fit = trainer(max_epochs=3, callbacks=[NuSAM(rho=0.1, start_epoch=2)])
    fit.fit(module, loader(classification_data()))
    assert fit.global_step == 18
    assert module.passes == [None] * 12 + ["first", "second"] * 6
    assert fit.callback_metrics["sam/active_step"] == 1.0


def test_trainer_gradient_clipping_clips_the_gradients_the_optimizer_uses():
    module = PlainClassifier(lr=1.0)
    module.configure_optimizers = lambda: torch.optim.SGD(module.parameters(), lr=1.0)
    before = copy.deepcopy(module.net)
    trainer(max_steps=1, callbacks=[SAM(rho=0.05)], gradient_clip_val=1e-3).fit(
        module, loader(classification_data()))
    step = torch.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(module.net.parameters(), before.parameters(),
                                                               strict=True)))
    assert step.item() == pytest.approx(1e-3, rel=1e-3)  # lr × the clipped second-pass gradient


def test_16_mixed_is_refused_before_any_step_and_names_the_mixin():
    module = PlainClassifier()
    before = copy.deepcopy(module.net)
    run = trainer(max_steps=2, callbacks=[NuSAM(rho=0.1)], plugins=[MixedPrecision("16-mixed", "cpu")])
    with pytest.raises(ValueError, match=r"16-mixed.*SAMMixin"):
        run.fit(module, loader(classification_data()))
    assert module.loss_calls == 0 and max_weight_difference(module.net, before) == 0.0


def test_16_mixed_works_through_the_mixin():
    run = trainer(max_steps=3, callbacks=[NuSAM(rho=0.1)], plugins=[MixedPrecision("16-mixed", "cpu")])
    run.fit(Classifier(), loader(classification_data()))
    assert run.global_step == 3 and run.callback_metrics["sam/active_step"] == 1.0


def test_an_exception_in_the_second_pass_leaves_no_perturbation():
    module = PlainClassifier()
    before = copy.deepcopy(module.net)
    original = module.training_step

    def fail_in_second_pass(batch, batch_idx):
        if module.passes and module.passes[-1] == "first":
            raise RuntimeError("boom in the second pass")
        return original(batch, batch_idx)

    module.training_step = fail_in_second_pass
    callback = NuSAM(rho=1.0)
    with pytest.raises(RuntimeError, match="boom"):
        trainer(max_steps=1, callbacks=[callback]).fit(module, loader(classification_data()))
    assert not callback.perturbation.is_perturbed
    assert max_weight_difference(module.net, before) < 1e-6


def test_lbfgs_and_several_optimizers_are_refused_at_fit_start():
    module = PlainClassifier()
    module.configure_optimizers = lambda: torch.optim.LBFGS(module.parameters())
    with pytest.raises(ValueError, match=r"LBFGS.*closure"):
        trainer(max_steps=1, callbacks=[NuSAM(rho=0.1)]).fit(module, loader(classification_data()))

    class TwoOptimizers(PlainClassifier):
        def configure_optimizers(self):
            return [torch.optim.SGD(self.net[:2].parameters(), lr=0.1),
                    torch.optim.SGD(self.net[2:].parameters(), lr=0.1)]

    with pytest.raises(Exception, match="optimizer"):
        trainer(max_steps=1, callbacks=[NuSAM(rho=0.1)]).fit(TwoOptimizers(), loader(classification_data()))


def test_manual_optimization_without_the_mixin_is_refused():
    class Manual(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False
            self.net = nn.Linear(6, 3)

        def training_step(self, batch, batch_idx):
            return None

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    with pytest.raises(ValueError, match="manual optimization without the mixin"):
        trainer(max_steps=1, callbacks=[NuSAM(rho=0.1)]).fit(Manual(), loader(classification_data()))


