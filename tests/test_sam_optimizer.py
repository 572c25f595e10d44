"""lightning_nusam.optim.SAMOptimizer: the SAM-optimizer convention over the package's perturbations."""

import copy
import warnings

import lightning as L
import pytest
import torch
from torch import nn

from helpers import (
    Window,
    classification_data,
    loader,
    make_net,
    max_weight_difference,
    micro_batches,
    reference_loop,
    trainer,
)
from lightning_nusam.optim import SAMOptimizer
from lightning_nusam.perturbations import L2Perturbation, NuclearPerturbation


def batches() -> Window:
    return micro_batches(classification_data())


def sgd(parameters) -> torch.optim.Optimizer:
    return torch.optim.SGD(parameters, lr=0.05, momentum=0.9)


def run(model, optimizer, steps):
    """The SAM-optimizer convention: first_step() after the first backward, second_step() after the second."""
    for x, y in steps:
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.first_step(zero_grad=True)
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.second_step(zero_grad=True)


def test_first_step_and_second_step_give_the_weights_of_the_core_loop():
    """The SAM-optimizer convention (first_step()/second_step()); step(closure) against the
    reference loop is test_ways_in.py's two-pass test [sam-optimizer]."""
    expected = reference_loop(make_net(), lambda net: NuclearPerturbation(net, rho=0.3),
                              [[batch] for batch in batches()])
    net = make_net()
    optimizer = SAMOptimizer(NuclearPerturbation(net, rho=0.3), sgd(net.parameters()))
    run(net, optimizer, batches())
    assert max_weight_difference(net, expected) == 0.0


def test_step_with_a_closure_returns_the_first_pass_loss_at_w():
    net = make_net()
    optimizer = SAMOptimizer(NuclearPerturbation(net, rho=0.3), sgd(net.parameters()))
    for x, y in batches():
        def closure(x=x, y=y):
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(net(x), y)
            loss.backward()
            return loss

        with torch.no_grad():
            clean = nn.functional.cross_entropy(net(x), y)
        loss = optimizer.step(closure)
        assert torch.equal(loss.detach(), clean)  # step() returns the first pass's loss, at w


def test_with_l2_it_follows_pytorch_optimizers_sam_on_the_same_trajectory():
    peer_sam = pytest.importorskip("pytorch_optimizer").SAM
    ours, theirs = make_net(), make_net()
    optimizer = SAMOptimizer(L2Perturbation(ours, rho=0.05), sgd(ours.parameters()))
    peer = peer_sam(theirs.parameters(), torch.optim.SGD, rho=0.05, lr=0.05, momentum=0.9)
    run(ours, optimizer, batches() * 2)
    run(theirs, peer, batches() * 2)
    deviation = max_weight_difference(ours, theirs)
    print(f"SAMOptimizer(L2Perturbation) vs pytorch_optimizer.SAM over 12 steps: {deviation:.2e}")
    assert deviation <= 1e-6
    assert max_weight_difference(ours, make_net()) > 1e-2  # it went somewhere


def test_a_scheduler_on_the_wrapper_moves_the_base_learning_rate():
    net = make_net()
    base = torch.optim.SGD(net.parameters(), lr=0.1)
    optimizer = SAMOptimizer(NuclearPerturbation(net, rho=0.1), base)
    assert optimizer.param_groups is base.param_groups and optimizer.state is base.state
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    x, y = batches()[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "lr_scheduler.step() before optimizer.step()"
        for _ in range(3):
            optimizer.step(lambda: nn.functional.cross_entropy(net(x), y).backward())
            scheduler.step()
    assert base.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**3)
    optimizer.add_param_group({"params": [nn.Parameter(torch.zeros(2))], "lr": 1.0})
    assert len(base.param_groups) == 2


def test_save_and_load_in_the_middle_of_a_run_is_bit_identical():
    def build():
        net = make_net(dropout=0.0)
        return net, SAMOptimizer(NuclearPerturbation(net, rho=0.2),
                                 torch.optim.AdamW(net.parameters(), lr=1e-2))

    steps = batches()
    net, optimizer = build()
    run(net, optimizer, steps[:3])
    saved = copy.deepcopy({"model": net.state_dict(), "optimizer": optimizer.state_dict()})
    assert set(saved["optimizer"]) == {"base_optimizer", "perturbation"}
    run(net, optimizer, steps[3:])
    resumed, resumed_optimizer = build()
    resumed.load_state_dict(saved["model"])
    resumed_optimizer.load_state_dict(saved["optimizer"])
    run(resumed, resumed_optimizer, steps[3:])
    assert max_weight_difference(net, resumed) == 0.0
    for name, (u, _) in optimizer.perturbation.singular_vectors().items():  # the warm start resumed too
        assert torch.equal(u, resumed_optimizer.perturbation.singular_vectors()[name][0])


def test_a_grad_scaler_steps_the_wrapper_and_skips_overflowing_steps():
    net = make_net()
    optimizer = SAMOptimizer(NuclearPerturbation(net, rho=0.1), torch.optim.SGD(net.parameters(), lr=0.1))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    for step, (x, y) in enumerate(batches()):
        scale = float("inf") if step == 2 else 1.0  # an overflow in the first pass of step 2
        scaler.scale(nn.functional.cross_entropy(net(x), y) * scale).backward()
        optimizer.first_step(zero_grad=True)  # non-finite gradients: nothing added, counted
        scaler.scale(nn.functional.cross_entropy(net(x), y) * scale).backward()
        optimizer.restore()
        scaler.step(optimizer)  # skipped where the gradients are not finite
        scaler.update()
        optimizer.zero_grad()
    assert optimizer.perturbation.skipped_steps == 1 and not optimizer.perturbation.is_perturbed
    assert all(torch.isfinite(p).all() for p in net.parameters())
    assert scaler.get_scale() < 2.0**8  # the overflow halved the scale


def test_bad_arguments_are_refused():
    net = make_net()
    with pytest.raises(TypeError, match="instance, not the class"):
        SAMOptimizer(NuclearPerturbation(net), torch.optim.SGD)
    with pytest.raises(ValueError, match="LBFGS"):
        SAMOptimizer(NuclearPerturbation(net), torch.optim.LBFGS(net.parameters()))
    with pytest.raises(TypeError, match="Perturbation"):
        SAMOptimizer(net, torch.optim.SGD(net.parameters(), lr=0.1))


class ManualSAM(L.LightningModule):
    """The README's manual-optimization module: SAMOptimizer from configure_optimizers."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False
        self.net = make_net()

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers()
        inputs, labels = batch

        def closure():
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(self.net(inputs), labels)
            self.manual_backward(loss)
            return loss

        loss = optimizer.step(closure=closure)
        self.log("train_loss", loss)

    def configure_optimizers(self):
        return SAMOptimizer(NuclearPerturbation(self.net, rho=0.3), sgd(self.net.parameters()))


def test_lightning_manual_optimization_with_it_equals_the_core_loop():
    module = ManualSAM()
    trainer(max_epochs=1).fit(module, loader(classification_data(n=48), 8))
    expected = reference_loop(make_net(), lambda net: NuclearPerturbation(net, rho=0.3),
                              [[batch] for batch in batches()])
    assert module.trainer.global_step == 6
    assert max_weight_difference(module.net, expected) == 0.0


def test_a_step_without_closure_or_first_step_is_refused_not_silently_plain():
    net = make_net()
    optimizer = SAMOptimizer(NuclearPerturbation(net, rho=0.1), torch.optim.SGD(net.parameters(), lr=0.1))
    x, y = batches()[0]
    nn.functional.cross_entropy(net(x), y).backward()
    with pytest.raises(RuntimeError, match="first_step"):
        optimizer.step()


def test_gradients_present_when_step_closure_begins_are_reported():
    net = make_net()
    optimizer = SAMOptimizer(NuclearPerturbation(net, rho=0.1), torch.optim.SGD(net.parameters(), lr=0.1))
    x, y = batches()[0]
    nn.functional.cross_entropy(net(x), y).backward()  # e.g. accumulated micro-batches
    with pytest.warns(UserWarning, match="already present"):
        optimizer.step(lambda: nn.functional.cross_entropy(net(x), y).backward())


def test_the_davda54_signature_is_recognised_and_rewritten():
    net = make_net()
    with pytest.raises(TypeError) as refused:
        SAMOptimizer(net.parameters(), torch.optim.SGD, rho=0.1, lr=0.05, momentum=0.9)
    rewritten = ("SAMOptimizer(NuclearPerturbation(model, rho=0.1), "
                 "torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9))")
    assert "davda54/sam" in str(refused.value) and rewritten in str(refused.value)
    with pytest.raises(TypeError, match=r"L2Perturbation\(model, rho=0.05, adaptive=True\)"):
        SAMOptimizer(net.parameters(), torch.optim.SGD, rho=0.05, adaptive=True, lr=0.1)
    # the written call works
    model = net
    optimizer = eval(rewritten, {"SAMOptimizer": SAMOptimizer, "NuclearPerturbation": NuclearPerturbation,
                                 "torch": torch, "model": model})
    assert optimizer.perturbation.rho == 0.1 and optimizer.param_groups[0]["momentum"] == 0.9
