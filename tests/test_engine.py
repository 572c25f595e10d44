"""The step engine on its own (pure PyTorch): the whole step against the reference loop, and what
the loss code sees (random draws, metrics, BatchNorm statistics, state_dict) as if it ran once."""

import re

import pytest
import torch
import torchmetrics
from torch import nn

from helpers import Window, classification_data, make_net, max_weight_difference, reference_loop
from helpers import windows as windows_of
from lightning_nusam.engine import LossPasses, StepEngine, StepPlan
from lightning_nusam.perturbations import GaussianPerturbation, L2Perturbation, NuclearPerturbation


def windows() -> list[Window]:
    """The tests' data in steps of three micro-batches of 4."""
    return windows_of(classification_data(), batch_size=4, per_step=3)


def engine_loop(net: nn.Module, engine: StepEngine, steps, optimizer, per_step: int, plan=None) -> nn.Module:
    passes = LossPasses(lambda batch, _: nn.functional.cross_entropy(net(batch[0]), batch[1]), per_step)
    for window in steps:
        engine.step(passes, [(batch, i) for i, batch in enumerate(window)], optimizer, plan)
    return net


@pytest.mark.parametrize("cls", [NuclearPerturbation, L2Perturbation, GaussianPerturbation])
def test_the_engines_step_equals_the_reference_loop(cls):
    steps = windows()
    expected = reference_loop(make_net(), lambda net: cls(net, rho=0.3), steps, divide_by=3)
    net = make_net()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    engine = StepEngine(net, cls(net, rho=0.3))
    engine_loop(net, engine, steps, optimizer, per_step=3)
    assert max_weight_difference(net, expected) == 0.0
    assert engine.perturbation.steps == len(steps)


def test_rho_zero_with_dropout_is_a_plain_step_and_the_random_stream_continues_as_one():
    steps = windows()
    torch.manual_seed(0)
    expected = reference_loop(make_net(dropout=0.5), None, steps, divide_by=3)
    after_plain = torch.rand(3)
    torch.manual_seed(0)
    net = make_net(dropout=0.5)
    engine = StepEngine(net, NuclearPerturbation(net, rho=0.0))
    engine_loop(net, engine, steps, torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9), per_step=3)
    assert max_weight_difference(net, expected) == 0.0
    assert torch.equal(torch.rand(3), after_plain)


def test_without_same_random_draws_the_second_pass_draws_anew():
    net = make_net(dropout=0.5)
    masks = []

    def loss(batch, _):
        masks.append(torch.rand(4))  # what a dropout layer or an augmentation would draw
        return nn.functional.cross_entropy(net(batch[0]), batch[1])

    for same in (True, False):
        masks.clear()
        engine = StepEngine(net, NuclearPerturbation(net, rho=0.1), same_random_draws=same)
        engine.step(LossPasses(loss), [(windows()[0][0], 0)], torch.optim.SGD(net.parameters(), lr=0.0))
        assert torch.equal(masks[0], masks[1]) == same


def test_metrics_in_the_loss_keep_what_the_first_pass_added():
    net = make_net()
    counted = torchmetrics.SumMetric()
    holder = nn.ModuleDict({"net": net, "counted": counted})

    def loss(batch, _):
        counted.update(torch.tensor(float(len(batch[1]))))
        return nn.functional.cross_entropy(net(batch[0]), batch[1])

    engine = StepEngine(holder, NuclearPerturbation(net, rho=0.5))
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    for window in windows():
        engine.step(LossPasses(loss, 3), [(b, i) for i, b in enumerate(window)], optimizer)
    assert float(counted.compute()) == 48.0


@pytest.mark.parametrize(("update", "tracked"), [("first", 3), ("second", 3), ("both", 6)])
def test_batchnorm_statistics_come_from_the_chosen_pass(update, tracked):
    net = make_net(batchnorm=True)
    window = windows()[0]
    engine = StepEngine(net, NuclearPerturbation(net, rho=0.5), batchnorm_update=update)
    engine_loop(net, engine, [window], torch.optim.SGD(net.parameters(), lr=0.0), per_step=3)
    assert int(net[1].num_batches_tracked) == tracked
    reference = make_net(batchnorm=True).train()
    for x, _ in window:
        reference(x)
    if update == "first":  # the same statistics as three plain forward passes at w
        assert torch.equal(net[1].running_mean, reference[1].running_mean)
    else:  # the second pass, at w + ε, contributed
        assert not torch.equal(net[1].running_mean, reference[1].running_mean)


@pytest.mark.parametrize("cls", [NuclearPerturbation, L2Perturbation, GaussianPerturbation])
def test_state_dict_while_perturbed_holds_the_weights_restore_gives_back(cls):
    net = make_net()
    perturbation = cls(net, rho=0.5)
    nn.functional.cross_entropy(net(windows()[0][0][0]), windows()[0][0][1]).backward()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    perturbation.perturb()
    during = {k: v.clone() for k, v in net.state_dict().items()}
    assert any(not torch.equal(p, before[n]) for n, p in net.named_parameters())  # ε is applied
    perturbation.restore()
    after = net.state_dict()
    for key in before:
        assert torch.equal(during[key], after[key]), key  # what restore() gives back, bit for bit
        assert torch.allclose(during[key], before[key], rtol=0, atol=1e-6), key


def test_a_plain_plan_or_no_perturbation_is_one_pass():
    net = make_net()
    calls = []
    def loss(batch, _):
        calls.append(1)
        return nn.functional.cross_entropy(net(batch[0]), batch[1])

    passes, optimizer = LossPasses(loss), torch.optim.SGD(net.parameters(), lr=0.1)
    result = StepEngine(net, None).step(passes, [(windows()[0][0], 0)], optimizer)
    assert len(calls) == 1 and not result.perturbed and result.second_loss is None
    engine = StepEngine(net, NuclearPerturbation(net, rho=0.1))
    engine.step(passes, [(windows()[0][0], 0)], torch.optim.SGD(net.parameters(), lr=0.1), StepPlan())
    assert len(calls) == 2


def test_m_sam_resynchronises_every_resync_every_steps_whatever_every_n_steps(monkeypatch):
    import torch.distributed as dist

    broadcasts = []
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "broadcast", lambda tensor, src: broadcasts.append(src))
    net = make_net()
    engine = StepEngine(net, NuclearPerturbation(net, rho=0.1), sync_first_pass=False, resync_every=4)
    perturbed = [t for t in range(1, 25) if t % 2 == 1]  # every_n_steps=2: the steps after t = 0, 2, ...
    done = [t for t in perturbed if engine.resynchronize(t)]
    assert done == [5, 9, 13, 17, 21] and engine.resyncs == 5  # at least 4 steps apart, never starved
    assert len(broadcasts) == 5 * len(list(net.parameters()))


def test_random_states_round_trip_through_a_weights_only_checkpoint(tmp_path):
    import random

    import numpy as np

    from lightning_nusam.engine import RandomState

    torch.manual_seed(3), np.random.seed(4), random.seed(5)
    torch.save(RandomState.capture_all().as_dict(), tmp_path / "rng.pt")
    expected = (torch.rand(2), np.random.rand(2), random.random())
    RandomState.from_dict(torch.load(tmp_path / "rng.pt", weights_only=True)).restore()
    drawn = (torch.rand(2), np.random.rand(2), random.random())
    assert torch.equal(drawn[0], expected[0]) and (drawn[1] == expected[1]).all() and drawn[2] == expected[2]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"batchnorm_update": "firts"}, "`batchnorm_update` must be one of 'first', 'second', 'both'"),
        ({"first_pass_reduction": "everything"}, "`first_pass_reduction` must be one of 'auto', 'gradients'"),
        ({"resync_every": -5}, "resync_every"),
        ({"same_random_draws": "yes"}, "same_random_draws"),
    ],
)
def test_every_way_in_checks_the_step_options_as_the_callbacks_do(options: dict, message: str) -> None:
    """One options object (StepOptions) checks them for every way in, so the engine, SAMOptimizer
    and the Fabric helpers refuse what the callbacks refuse, with the same message."""
    from lightning.fabric import Fabric

    from lightning_nusam import NuSAM
    from lightning_nusam.fabric import fabric_engine
    from lightning_nusam.optim import SAMOptimizer
    from lightning_nusam.step_options import StepOptions

    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    with pytest.raises((ValueError, TypeError), match=re.escape(message)):
        NuSAM(**options)
    with pytest.raises((ValueError, TypeError), match=re.escape(message)):
        StepOptions(**options)
    with pytest.raises((ValueError, TypeError), match=re.escape(message)):
        StepEngine(model, NuclearPerturbation(model), **options)
    with pytest.raises((ValueError, TypeError), match=re.escape(message)):
        fabric_engine(Fabric(accelerator="cpu", devices=1), model, NuclearPerturbation(model), **options)
    optimizer_options = {k: v for k, v in options.items() if k in ("batchnorm_update", "same_random_draws")}
    if optimizer_options:
        with pytest.raises((ValueError, TypeError), match=re.escape(message)):
            SAMOptimizer(NuclearPerturbation(model), torch.optim.SGD(model.parameters(), lr=0.1),
                         **optimizer_options)
