"""The step engine on its own (pure PyTorch): the whole step against the reference loop, and what
the loss code sees (random draws, metrics, BatchNorm statistics, state_dict) as if it ran once."""


import pytest
import torch
import torchmetrics
from torch import nn

from helpers import Window, classification_data, make_net
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


