"""What every way in shares, each property tested once over the ways in: the drop-in (the
callback on an unmodified module), the mixin, a plain loop (``StepEngine.step``), ``SAMOptimizer``
and a Fabric loop (``fabric_engine``/``fabric_passes``).

A failure here names the way in (``[drop-in]``, ``[mixin]``, ``[plain-loop]``,
``[sam-optimizer]``, ``[fabric]``); what only one way in does is tested in its own module
(``test_dropin.py``, ``test_mixin.py``, ``test_engine.py``, ``test_sam_optimizer.py``,
``test_fabric.py``), the callback's options, checks and state in ``test_callback.py``.
"""

from __future__ import annotations

import functools
import random
import re
from collections.abc import Callable

import lightning as L
import numpy as np
import pytest
import torch
import torchmetrics
from lightning.fabric import Fabric
from torch import nn

from helpers import (
    Classifier,
    EMATeacher,
    PlainClassifier,
    classification_data,
    loader,
    make_net,
    max_weight_difference,
    micro_batches,
    reference_loop,
    trainer,
    windows,
)
from lightning_nusam import SAM, SAMON, GaussSAM, NuSAM, NuSAMNorm, sam_pass
from lightning_nusam.engine import LossPasses, StepEngine
from lightning_nusam.fabric import fabric_engine, fabric_passes
from lightning_nusam.optim import SAMOptimizer
from lightning_nusam.perturbations import GaussianPerturbation, L2Perturbation, NuclearPerturbation
from lightning_nusam.step_options import StepOptions

WAYS = ["drop-in", "mixin", "plain-loop", "sam-optimizer", "fabric"]
LIGHTNING_WAYS = ["drop-in", "mixin"]
CALLBACKS = {"NuSAM": NuSAM, "SAM": SAM, "GaussSAM": GaussSAM}
PERTURBATIONS = {"NuSAM": NuclearPerturbation, "SAM": L2Perturbation, "GaussSAM": GaussianPerturbation}

Loss = Callable[[nn.Module, tuple[torch.Tensor, torch.Tensor]], torch.Tensor | None]


def cross_entropy(net: nn.Module, batch) -> torch.Tensor:
    return nn.functional.cross_entropy(net(batch[0]), batch[1])


class DropIn(PlainClassifier):
    """An ordinary module whose training_step is ``loss(net, batch)``."""

    def __init__(self, net: nn.Module, loss: Loss) -> None:
        super().__init__(net=net)
        self.loss = loss

    def training_step(self, batch, batch_idx):
        self.passes.append(sam_pass(self))
        return self.loss(self.net, batch)


class Mixin(Classifier):
    """A SAMMixin module whose compute_loss is ``loss(net, batch)``."""

    def __init__(self, net: nn.Module, loss: Loss, **mixin_kwargs) -> None:
        super().__init__(net=net, **mixin_kwargs)
        self.loss = loss

    def compute_loss(self, batch, batch_idx):
        self.loss_calls += 1
        return self.loss(self.net, batch)


def fit(way: str, net: nn.Module, method: str | None, rho: float, data, *, batch_size: int = 8,
        accumulate: int = 1, loss: Loss = cross_entropy, options: dict | None = None) -> nn.Module:
    """One epoch over ``data`` in micro-batches of ``batch_size``, ``accumulate`` per optimizer
    step (SGD, lr 0.05, momentum 0.9), through ``way`` with ``method`` at radius ``rho`` (a plain
    run when ``method`` is None) and the step ``options``; returns ``net``, trained."""
    options = options or {}
    if way in LIGHTNING_WAYS:
        callbacks = [CALLBACKS[method](rho=rho, **options)] if method else []
        if way == "drop-in":
            module = DropIn(net, loss)
            run = trainer(callbacks=callbacks, accumulate_grad_batches=accumulate)
        else:
            module = Mixin(net, loss, accumulate_grad_batches=accumulate)
            run = trainer(callbacks=callbacks)
        run.fit(module, loader(data, batch_size))
        assert run.global_step == len(windows(data, batch_size, accumulate))
        assert module.loss_calls == (2 if method else 1) * len(micro_batches(data, batch_size))
        return net
    perturbation = PERTURBATIONS[method](net, rho=rho) if method else None  # (before Fabric's setup)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    steps = windows(data, batch_size, accumulate)
    if way == "sam-optimizer" or perturbation is None:  # (a plain run: the plain torch loop)
        sam = SAMOptimizer(perturbation, optimizer, **options) if perturbation is not None else optimizer
        for window in steps:
            def closure(window=window):
                sam.zero_grad()
                losses = [loss(net, batch) / accumulate for batch in window]
                for value in losses:
                    value.backward()
                return sum(losses)

            if perturbation is not None:
                sam.step(closure)
            else:
                closure()
                sam.step()
        return net
    if way == "plain-loop":
        engine = StepEngine(net, perturbation, **options)
        passes = LossPasses(lambda batch, _: loss(net, batch), accumulate)
    else:
        fabric = Fabric(accelerator="cpu", devices=1)
        model, optimizer = fabric.setup(net, optimizer)
        engine = fabric_engine(fabric, model, perturbation, **options)
        passes = fabric_passes(fabric, model, lambda batch, _: loss(model, batch), accumulate)
    for window in steps:
        engine.step(passes, [(batch, index) for index, batch in enumerate(window)], optimizer)
    return net


# the step ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("accumulate", [1, 3])
@pytest.mark.parametrize("method", sorted(CALLBACKS))
@pytest.mark.parametrize("way", WAYS)
def test_a_two_pass_step_equals_the_reference_loop(way, method, accumulate):
    """The weights after an epoch are bit for bit those of ``reference_loop`` (perturb() and
    restore() written out by hand), with one micro-batch per step and with three."""
    data, batch_size = classification_data(), 8 if accumulate == 1 else 4
    expected = reference_loop(make_net(), lambda net: PERTURBATIONS[method](net, rho=0.3),
                              windows(data, batch_size, accumulate), divide_by=accumulate)
    net = fit(way, make_net(), method, 0.3, data, batch_size=batch_size, accumulate=accumulate)
    assert max_weight_difference(net, expected) == 0.0


# rho=0 and a radius below the rounding of the weights: exactly the run without sharpness-awareness
class Everything(PlainClassifier):
    """BatchNorm, dropout, a skipped micro-batch, a step scheduler; training_step logs a metric."""

    def __init__(self, **kwargs):
        super().__init__(net=make_net(batchnorm=True, dropout=0.3), scheduler={"interval": "step"}, **kwargs)
        self.accuracy = torchmetrics.classification.MulticlassAccuracy(num_classes=3)

    def training_step(self, batch, batch_idx):
        if batch_idx == 4:
            return None
        self.accuracy(self.net(batch[0]), batch[1])
        return super().training_step(batch, batch_idx)


class MixinEverything(Classifier):
    def __init__(self, **kwargs):
        super().__init__(net=make_net(batchnorm=True, dropout=0.3), scheduler={"interval": "step"}, **kwargs)

    def compute_loss(self, batch, batch_idx):
        return None if batch_idx == 4 else super().compute_loss(batch, batch_idx)


def fit_everything(way: str, callbacks: list, precision: str = "32-true") -> nn.Module:
    """The Lightning program: 7 micro-batches per epoch, windows of 3 (the last one partial),
    clipping, 2 epochs."""
    L.seed_everything(11)
    data = loader(classification_data(n=56))
    if way == "drop-in":
        module = Everything()
        run = trainer(max_epochs=2, callbacks=callbacks, accumulate_grad_batches=3, gradient_clip_val=0.5,
                      precision=precision)
    else:
        module = MixinEverything(accumulate_grad_batches=3, gradient_clip_val=0.5)
        run = trainer(max_epochs=2, callbacks=callbacks, precision=precision)
    run.fit(module, data)
    assert run.global_step == 6
    return module


@functools.cache
def fit_everything_without_callbacks(way: str, precision: str = "32-true") -> nn.Module:
    """The reference run of :func:`fit_everything`, fitted once per way in and precision."""
    return fit_everything(way, [], precision)


def teacher_loss(way: str) -> Loss:
    """The torch program: the EMA-teacher loss (state the step changes besides the gradients),
    which normalises the batch it is given in place where the way in replays the batch (a
    SAMOptimizer closure's batch is its own: not replayed)."""
    def loss(net, batch):
        if way != "sam-optimizer":
            batch[0].sub_(0.5)
        return net.loss(batch)

    return loss


def state_after(way: str, method: str | None, rho: float) -> dict[str, torch.Tensor]:
    """The weights and buffers after the program of ``way``; a plain run when ``method`` is None."""
    if way in LIGHTNING_WAYS:
        if method is None:
            return fit_everything_without_callbacks(way).state_dict()
        return fit_everything(way, [ALL_CALLBACKS[method](rho=rho)]).state_dict()
    torch.manual_seed(0)
    module = EMATeacher()
    return fit(way, module, method, rho, classification_data(n=24), loss=teacher_loss(way)).state_dict()


ALL_CALLBACKS = {
    "NuSAM": NuSAM, "NuSAMNorm": NuSAMNorm, "SAM": SAM, "SAMON": SAMON, "GaussSAM": GaussSAM,
    "ASAM": lambda **kw: SAM(adaptive=True, **kw),
    "NuSAM-one-pass": lambda **kw: NuSAM(one_pass=True, **kw),
    "GaussSAM-one-pass": lambda **kw: GaussSAM(one_pass=True, **kw),
}
NO_RADIUS = (
    [(way, name, 0.0) for way in LIGHTNING_WAYS for name in sorted(ALL_CALLBACKS)]
    + [(way, name, 1e-12) for way in LIGHTNING_WAYS for name in ("GaussSAM", "NuSAM", "NuSAMNorm")]
    + [(way, "NuSAM", rho) for way in ("plain-loop", "sam-optimizer", "fabric") for rho in (0.0, 1e-12)]
)


@pytest.mark.parametrize(("way", "method", "rho"), [
    pytest.param(*case, id=f"{case[0]}-{case[1]}-rho={case[2]:g}") for case in NO_RADIUS])
def test_no_radius_gives_exactly_the_weights_and_buffers_of_the_run_without(way, method, rho):
    """rho=0, and a radius below the rounding of the weights, change nothing: the drop-in and the
    mixin with accumulation, clipping, BatchNorm, dropout and skips; a plain loop, SAMOptimizer and
    Fabric on a program with an EMA teacher updated in the loss and a batch normalised in place."""
    plain, sam = state_after(way, None, rho), state_after(way, method, rho)
    assert plain.keys() == sam.keys()
    for key in plain:
        assert torch.equal(plain[key], sam[key]), key


@pytest.mark.parametrize("way", LIGHTNING_WAYS)
def test_rho_zero_is_a_no_op_in_bf16_mixed(way):
    plain = fit_everything_without_callbacks(way, "bf16-mixed")
    sam = fit_everything(way, [NuSAM(rho=0.0)], precision="bf16-mixed")
    assert max_weight_difference(sam.net, plain.net) == 0.0


# BatchNorm ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("accumulate", [1, 3])
@pytest.mark.parametrize("update", ["first", "second", "both"])
@pytest.mark.parametrize("way", WAYS)
def test_batchnorm_statistics_come_from_the_chosen_pass(way, update, accumulate):
    """Two steps; the weights and BatchNorm buffers are those of the reference loop that puts
    back what the other pass changed (``"first"``: the statistics of plain forward passes at w)."""
    data = classification_data(n=8 * accumulate)  # micro-batches of 4: two steps

    def reference(choice):
        return reference_loop(make_net(batchnorm=True), lambda net: NuclearPerturbation(net, rho=0.5),
                              windows(data, 4, accumulate), divide_by=accumulate, batchnorm_update=choice)

    expected = reference(update).state_dict()
    net = fit(way, make_net(batchnorm=True), "NuSAM", 0.5, data, batch_size=4, accumulate=accumulate,
              options={"batchnorm_update": update})
    bn = net[1]
    assert bn.track_running_stats
    assert int(bn.num_batches_tracked) == 2 * accumulate * (2 if update == "both" else 1)
    for key, value in net.state_dict().items():
        assert torch.equal(value, expected[key]), key
    if update != "first":  # the second pass, at w + ε, contributed
        assert not torch.equal(bn.running_mean, reference("first")[1].running_mean)


# random draws ---------------------------------------------------------------------------------------
def drawing_loss(draws: list) -> Loss:
    """A mixup weight drawn with torch, numpy and random in the loss, on a net with dropout."""
    def loss(net, batch):
        inputs, labels = batch
        drawn = (float(torch.rand(())), float(np.random.rand()), random.random())
        draws.append(drawn)
        lam = drawn[0]
        logits = net(lam * inputs + (1 - lam) * inputs.flip(0))
        return (lam * nn.functional.cross_entropy(logits, labels)
                + (1 - lam) * nn.functional.cross_entropy(logits, labels.flip(0)))

    return loss


def fit_drawing(way: str, method: str | None, rho: float, accumulate: int, **options):
    L.seed_everything(7)
    draws: list = []
    net = fit(way, make_net(dropout=0.5), method, rho, classification_data(n=48), accumulate=accumulate,
              loss=drawing_loss(draws), options=options)
    return net, draws, (float(torch.rand(())), float(np.random.rand()), random.random())


def passes_of(draws: list, accumulate: int) -> tuple[list, list]:
    """The draws of the first passes and of the second passes (each step: its k first passes,
    then its k second passes)."""
    steps = [draws[i:i + 2 * accumulate] for i in range(0, len(draws), 2 * accumulate)]
    return ([d for step in steps for d in step[:accumulate]],
            [d for step in steps for d in step[accumulate:]])


@pytest.mark.parametrize("accumulate", [1, 3])
@pytest.mark.parametrize("way", WAYS)
def test_both_passes_see_the_same_random_draws_and_the_stream_continues_as_a_plain_step(way, accumulate):
    """Dropout masks and torch, numpy and random draws in the loss: the second pass of each
    micro-batch draws what its first pass drew, and with rho=0 the weights and the random streams
    after the run are those of the run without sharpness-awareness."""
    plain, plain_draws, plain_after = fit_drawing(way, None, 0.0, accumulate)
    sam, draws, after = fit_drawing(way, "NuSAM", 0.0, accumulate)
    first, second = passes_of(draws, accumulate)
    assert first == second == plain_draws
    assert after == plain_after
    assert max_weight_difference(sam, plain) == 0.0


@pytest.mark.parametrize("way", WAYS)
def test_independent_draws_per_pass_on_request(way):
    _, draws, _ = fit_drawing(way, "NuSAM", 0.1, 1, same_random_draws=False)
    first, second = passes_of(draws, 1)
    assert all(a[0] != b[0] for a, b in zip(first, second, strict=True))


# the options of the step -------------------------------------------------------------------------------
OPTION_WAYS: dict[str, Callable[..., object]] = {
    "step-options": lambda model, **options: StepOptions(**options),  # (the one object that checks)
    "callback": lambda model, **options: NuSAM(**options),  # (the drop-in's and the mixin's)
    "plain-loop": lambda model, **options: StepEngine(model, NuclearPerturbation(model), **options),
    "sam-optimizer": lambda model, **options: SAMOptimizer(
        NuclearPerturbation(model), torch.optim.SGD(model.parameters(), lr=0.1), **options),
    "fabric": lambda model, **options: fabric_engine(Fabric(accelerator="cpu", devices=1), model,
                                                     NuclearPerturbation(model), **options),
}
BAD_OPTIONS = [
    ({"batchnorm_update": "firts"}, "`batchnorm_update` must be one of 'first', 'second', 'both'"),
    ({"first_pass_reduction": "everything"}, "`first_pass_reduction` must be one of 'auto', 'gradients'"),
    ({"resync_every": -5}, "resync_every"),
    ({"same_random_draws": "yes"}, "same_random_draws"),
]
SAM_OPTIMIZER_OPTIONS = ("batchnorm_update", "same_random_draws")  # (it takes no data-parallel ones)


@pytest.mark.parametrize(("way", "options", "message"), [
    pytest.param(way, options, message, id=f"{way}-{next(iter(options))}")
    for way in OPTION_WAYS for options, message in BAD_OPTIONS
    if way != "sam-optimizer" or next(iter(options)) in SAM_OPTIMIZER_OPTIONS
])
def test_invalid_step_options_are_refused_with_the_same_message(way, options, message):
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    with pytest.raises((ValueError, TypeError), match=re.escape(message)):
        OPTION_WAYS[way](model, **options)
