"""every_n_steps, ρ schedules (measured from the weights) and ASAM against pytorch_optimizer."""

import copy
import math

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from helpers import (
    Classifier,
    PlainClassifier,
    classification_data,
    loader,
    make_net,
    max_weight_difference,
    reference_loop,
    trainer,
    windows,
)
from lightning_nusam import SAM, NuSAM
from lightning_nusam.perturbations import L2Perturbation


class AppliedRadius(Callback):
    """For each perturbed step, the largest nuclear norm of ε measured on the weights:
    (weights after perturb() − weights before) per perturbed matrix."""

    def __init__(self, sam):
        self.sam, self.radii, self.steps = sam, [], []

    def on_train_start(self, trainer, pl_module):
        perturbation = self.sam.perturbation
        perturb = perturbation.perturb

        def measuring_perturb(*args, **kwargs):
            before = [p.detach().clone() for p in perturbation.parameters]
            perturb(*args, **kwargs)
            norms = [torch.linalg.matrix_norm(p.detach() - b, ord="nuc")
                     for p, b in zip(perturbation.parameters, before, strict=True)]
            self.radii.append(float(max(norms)))
            self.steps.append(trainer.global_step)

        perturbation.perturb = measuring_perturb


@pytest.mark.parametrize("path", ["mixin", "dropin"])
def test_every_n_steps_perturbs_every_nth_step_and_keeps_the_warm_start(path):
    module = Classifier() if path == "mixin" else PlainClassifier()
    sam = NuSAM(rho=0.2, every_n_steps=3, start_fraction=0.25)  # 12 steps: start at step 3
    radius = AppliedRadius(sam)
    run = trainer(max_epochs=2, callbacks=[sam, radius])
    run.fit(module, loader(classification_data()))
    assert run.global_step == 12
    assert radius.steps == [3, 6, 9]
    assert module.loss_calls == 12 + 3  # one pass per step, a second on the perturbed ones
    assert sam.perturbation.steps == 3
    assert run.callback_metrics["sam/active_epoch"] == pytest.approx(2 / 6)  # steps 6, 9 of epoch 1


def linear(rho, final, step, first, last):
    return rho + (final - rho) * (step - first) / (last - first)


@pytest.mark.parametrize(("schedule", "expected"), [
    ("linear", lambda t: linear(0.4, 0.1, t, 2, 11)),
    ("cosine", lambda t: 0.1 + 0.3 * (1 + math.cos(math.pi * (t - 2) / 9)) / 2),
])
def test_linear_and_cosine_radius_measured_on_the_weights(schedule, expected):
    sam = NuSAM(rho=0.4, rho_schedule=schedule, rho_final=0.1, start_fraction=2 / 12)
    radius = AppliedRadius(sam)
    run = trainer(max_epochs=2, callbacks=[sam, radius])
    run.fit(PlainClassifier(), loader(classification_data()))
    assert radius.steps == list(range(2, 12))
    for step, measured in zip(radius.steps, radius.radii, strict=True):
        assert measured == pytest.approx(expected(step), rel=1e-4), step
    assert radius.radii[0] == pytest.approx(0.4, rel=1e-4)
    assert radius.radii[-1] == pytest.approx(0.1, rel=1e-4)


def test_lr_schedule_follows_the_learning_rate():
    sam = NuSAM(rho=0.4, rho_schedule="lr", start_fraction=2 / 6)
    radius = AppliedRadius(sam)
    module = Classifier(scheduler={"interval": "step", "frequency": 1})  # StepLR: lr halves every step
    trainer(max_epochs=1, callbacks=[sam, radius]).fit(module, loader(classification_data()))
    assert radius.steps == [2, 3, 4, 5]
    for step, measured in zip(radius.steps, radius.radii, strict=True):
        # relative to the base learning rate (StepLR's initial_lr), not to the lr at the start
        assert measured == pytest.approx(0.4 * 0.5 ** step, rel=1e-4)


# ASAM ------------------------------------------------------------------------------------------------
def asam_reference(net, dataset, steps, rho, lr=0.1):
    from pytorch_optimizer import SAM as PeerSAM

    optimizer = PeerSAM(net.parameters(), torch.optim.SGD, rho=rho, adaptive=True, lr=lr)
    inputs, labels = dataset.tensors
    for step in range(steps):
        x, y = inputs[step * 8:(step + 1) * 8], labels[step * 8:(step + 1) * 8]

        def closure(x=x, y=y):
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(net(x), y)
            loss.backward()
            return loss

        closure()
        optimizer.step(closure)
        optimizer.zero_grad()
    return net


def test_asam_equals_pytorch_optimizer_sam_adaptive_on_the_same_trajectory():
    dataset = classification_data()
    torch.manual_seed(0)
    net = make_net()
    reference = asam_reference(copy.deepcopy(net), dataset, steps=6, rho=0.5)
    # the perturbation in the reference loop
    loop_net = reference_loop(copy.deepcopy(net), lambda n: L2Perturbation(n, rho=0.5, adaptive=True),
                              windows(dataset),
                              make_optimizer=lambda parameters: torch.optim.SGD(parameters, lr=0.1))
    loop_difference = max_weight_difference(loop_net, reference)
    # the callback on the drop-in
    module = PlainClassifier(net=copy.deepcopy(net), lr=0.1)
    module.configure_optimizers = lambda: torch.optim.SGD(module.parameters(), lr=0.1)
    trainer(max_steps=6, callbacks=[SAM(rho=0.5, adaptive=True)]).fit(module, loader(dataset))
    callback_difference = max_weight_difference(module.net, reference)
    print(f"ASAM vs pytorch_optimizer.SAM(adaptive=True): loop {loop_difference:.2e}, "
          f"callback {callback_difference:.2e}")
    assert loop_difference <= 1e-5 and callback_difference <= 1e-5
    assert max_weight_difference(net, reference) > 1e-2  # the comparison is not trivial


def test_asam_is_scale_invariant_per_weight():
    """Doubling a weight tensor and halving the next one's input scale leaves ASAM's relative
    perturbation of it unchanged (T = |w| rescales with it), SAM's not."""
    torch.manual_seed(0)
    layer = nn.Linear(4, 3, bias=False)
    x = torch.randn(8, 4)
    relative = {}
    for scale in (1.0, 2.0):
        model = copy.deepcopy(layer)
        with torch.no_grad():
            model.weight.mul_(scale)
        (model(x / scale).square().sum()).backward()
        asam = L2Perturbation(model, rho=0.5, adaptive=True)
        before = model.weight.detach().clone()
        asam.perturb()
        relative[scale] = (model.weight.detach() - before) / before
        asam.restore()
    assert torch.allclose(relative[1.0], relative[2.0], atol=1e-6)
