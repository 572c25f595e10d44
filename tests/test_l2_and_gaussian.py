import copy

import pytest
import torch
from torch import nn

from helpers import TinyViTLike, first_pass, make_batch, max_weight_difference, reference_loop
from lightning_nusam.perturbations import (
    GaussianPerturbation,
    L2Perturbation,
    NormLayerPerturbation,
)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_sam_perturbation_is_rho_times_normalised_gradient_and_restore_is_exact(vit_like):
    sam = L2Perturbation(vit_like, rho=0.05)
    first_pass(vit_like)
    before = snapshot(vit_like)
    grads = {n: p.grad.clone() for n, p in vit_like.named_parameters()}
    norm = torch.sqrt(sum(g.double().square().sum() for g in grads.values()))
    sam.perturb()
    for name, p in vit_like.named_parameters():
        expected = (0.05 * grads[name].double() / norm).float()
        torch.testing.assert_close(p.detach() - before[name], expected, rtol=1e-4, atol=1e-7)
    sam.restore()
    assert all(torch.equal(p, before[n]) for n, p in vit_like.named_parameters())
    assert sam.held_numel() == sum(p.numel() for p in vit_like.parameters())


def test_sam_skips_non_finite_gradients(vit_like):
    sam = L2Perturbation(vit_like, rho=0.05)
    first_pass(vit_like)
    vit_like.head.weight.grad[0, 0] = float("inf")
    before = snapshot(vit_like)
    sam.perturb()
    assert all(torch.equal(p, before[n]) for n, p in vit_like.named_parameters())
    sam.restore()
    assert sam.skipped_steps == 1


def run_peer_sam(model, optimizer, steps):
    for step in range(steps):
        images, labels = make_batch(step)

        def closure(images=images, labels=labels):
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(images), labels)
            loss.backward()
            return loss

        closure()
        optimizer.step(closure)
        optimizer.zero_grad()


@pytest.mark.parametrize(
    ("base", "kwargs", "tolerance"),
    [(torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}, 1e-5), (torch.optim.Adam, {"lr": 1e-2}, 1e-4)],
)
def test_sam_trajectory_equals_pytorch_optimizer_sam(base, kwargs, tolerance):
    peer_sam = pytest.importorskip("pytorch_optimizer").SAM
    torch.manual_seed(0)
    ours = TinyViTLike()
    theirs, initial = copy.deepcopy(ours), copy.deepcopy(ours)
    reference_loop(ours, lambda net: L2Perturbation(net, rho=0.05), [[make_batch(step)] for step in range(8)],
                   make_optimizer=lambda parameters: base(parameters, **kwargs))
    run_peer_sam(theirs, peer_sam(theirs.parameters(), base, rho=0.05, **kwargs), steps=8)
    deviation = max_weight_difference(ours, theirs)
    moved = max_weight_difference(ours, initial)
    assert moved > 1e-3  # the trajectories did go somewhere
    assert deviation <= tolerance


def test_sam_on_selects_normalisation_layers_by_type_not_name():
    class MyNorm(nn.LayerNorm):
        pass

    model = nn.Sequential()
    model.add_module("norm", nn.Linear(4, 4))         # called "norm", but not a norm layer
    model.add_module("features", MyNorm(4))           # a LayerNorm subclass with another name
    model.add_module("bn", nn.BatchNorm1d(4))
    model.add_module("gn", nn.GroupNorm(2, 4))
    if hasattr(nn, "RMSNorm"):
        model.add_module("rms", nn.RMSNorm(4))
    samon = NormLayerPerturbation(model, rho=0.5)
    assert "norm.weight" not in samon.parameter_names
    assert {"features.weight", "features.bias", "bn.weight", "bn.bias", "gn.weight"} <= set(
        samon.parameter_names)
    if hasattr(nn, "RMSNorm"):
        assert "rms.weight" in samon.parameter_names
    model(torch.randn(3, 4)).sum().backward()
    before = snapshot(model)
    samon.perturb()
    assert torch.equal(model.norm.weight, before["norm.weight"])
    eps = torch.cat([(dict(model.named_parameters())[n] - before[n]).flatten()
                     for n in samon.parameter_names])
    torch.testing.assert_close(eps.norm(), torch.tensor(0.5), rtol=1e-5, atol=0)
    samon.restore()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_sam_on_without_norm_layers_raises():
    with pytest.raises(ValueError, match=r"`model`.*normalisation"):
        NormLayerPerturbation(nn.Linear(3, 3), rho=0.1)


def test_gaussian_has_norm_rho_restores_and_keeps_no_copy(vit_like):
    gauss = GaussianPerturbation(vit_like, rho=0.2, seed=1)
    first_pass(vit_like)
    before = snapshot(vit_like)
    gauss.perturb()
    eps = torch.cat([(p.detach() - before[n]).flatten() for n, p in vit_like.named_parameters()])
    torch.testing.assert_close(eps.norm(), torch.tensor(0.2), rtol=1e-4, atol=0)
    grad = torch.cat([p.grad.flatten() for p in vit_like.parameters()])
    assert abs(float(torch.nn.functional.cosine_similarity(eps, grad, dim=0))) < 0.3  # not the gradient
    gauss.restore()
    worst = max(float((p.detach() - before[n]).abs().max()) for n, p in vit_like.named_parameters())
    assert worst < 1e-6
    assert gauss.held_numel() == 1


def test_gaussian_directions_are_seeded_and_change_every_step():
    def directions(seed):
        torch.manual_seed(0)
        model = nn.Linear(6, 3)
        gauss = GaussianPerturbation(model, rho=1.0, seed=seed)
        result = []
        for _ in range(2):
            model(torch.ones(1, 6)).sum().backward()
            before = model.weight.detach().clone()
            gauss.perturb()
            result.append(model.weight.detach() - before)
            gauss.restore()
        return result

    first, again, other = directions(0), directions(0), directions(1)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.allclose(first[0], first[1])
    assert not torch.allclose(first[0], other[0])


@pytest.mark.parametrize("cls", [L2Perturbation, NormLayerPerturbation, GaussianPerturbation])
def test_negative_rho_raises(cls, vit_like):
    with pytest.raises(ValueError, match="`rho`"):
        cls(vit_like, rho=-1.0)
