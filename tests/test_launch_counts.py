"""What perturb()/restore() ask of a device, counted exactly: no host synchronisation for any
method, option or precision, a bounded number of kernels for νSAM, autocast kept out, and no
walk over the whole model at each step."""

import contextlib

import pytest
import torch
from torch import nn

from helpers import TinyViTLike, load_script
from lightning_nusam.perturbations import (
    GaussianPerturbation,
    L2Perturbation,
    NormLayerPerturbation,
    NuclearNormalizedPerturbation,
    NuclearPerturbation,
)

counts = load_script("benchmarks/dispatch_counts.py")

METHODS = {
    "nusam": lambda m: NuclearPerturbation(m, rho=0.1),
    "nusam_looped": lambda m: NuclearPerturbation(m, rho=0.1, batched=False),
    "nusam_batched": lambda m: NuclearPerturbation(m, rho=0.1, batched=True),
    "nusam_reference": lambda m: NuclearPerturbation(m, rho=0.1, batched=False, foreach=False),
    "nusam_T3": lambda m: NuclearPerturbation(m, rho=0.1, power_iterations=3, batched=False),
    "nusam_norm": lambda m: NuclearNormalizedPerturbation(m, rho=0.1),
    "sam": lambda m: L2Perturbation(m, rho=0.1),
    "asam": lambda m: L2Perturbation(m, rho=0.5, adaptive=True),
    "sam_on": lambda m: NormLayerPerturbation(m, rho=0.5),
    "gausssam": lambda m: GaussianPerturbation(m, rho=0.1),
}


def model_in(precision: str) -> nn.Module:
    torch.manual_seed(0)
    model = TinyViTLike(dim=16, depth=3)
    return model.to(torch.bfloat16) if precision == "bf16" else model


def give_gradients(model: nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=generator).to(p.dtype)


def context(precision: str) -> contextlib.AbstractContextManager:
    if precision == "bf16-mixed":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def one_step(perturbation, one_pass: bool) -> None:
    if one_pass:
        perturbation.estimate()
        perturbation.apply()
    else:
        perturbation.perturb()
    perturbation.restore()


@pytest.mark.parametrize("precision", ["fp32", "bf16-mixed", "bf16"])
@pytest.mark.parametrize("method", list(METHODS))
def test_no_host_synchronisation(method, precision):
    model = model_in(precision)
    perturbation = METHODS[method](model)
    with context(precision):
        for step in range(2):  # the first step makes what later steps reuse
            give_gradients(model, step)
            one_step(perturbation, one_pass=False)
        give_gradients(model, 2)
        with counts.DispatchCounter() as counter:
            one_step(perturbation, one_pass=False)
    assert counter.syncs == 0, counter.sync_sources
    assert perturbation.steps == 3


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("method", ["nusam", "nusam_norm", "gausssam"])
def test_no_host_synchronisation_in_one_pass_steps(method, precision):
    model = model_in(precision)
    perturbation = METHODS[method](model)
    give_gradients(model, 0)
    one_step(perturbation, one_pass=True)
    give_gradients(model, 1)
    with counts.DispatchCounter() as counter:
        one_step(perturbation, one_pass=True)
    assert counter.syncs == 0, counter.sync_sources


def test_no_host_synchronisation_with_some_matrices_frozen_or_without_gradient():
    model = model_in("fp32")
    nusam = NuclearPerturbation(model, rho=0.1, batched=True)
    model.blocks[1]["fc1"].weight.requires_grad_(False)
    for step in range(2):
        give_gradients(model, step)
        model.blocks[1]["fc1"].weight.grad = None
        with counts.DispatchCounter() as counter:
            nusam.perturb()
            nusam.restore()
    assert counter.syncs == 0, counter.sync_sources


def test_non_finite_gradients_are_skipped_and_counted_without_a_synchronisation():
    for method in ("nusam", "sam", "asam"):
        model = model_in("fp32")
        perturbation = METHODS[method](model)
        give_gradients(model, 0)
        perturbation.perturb()
        perturbation.restore()
        give_gradients(model, 1)
        model.head.weight.grad[0, 0] = float("nan")
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        with counts.DispatchCounter() as counter:
            perturbation.perturb()
        assert counter.syncs == 0, (method, counter.sync_sources)
        assert all(torch.equal(p, before[n]) for n, p in model.named_parameters()), method
        perturbation.restore()
        assert perturbation.skipped_steps == 1, method  # read here: the only synchronisation


def matrices(perturbation) -> tuple[int, int]:
    return len(perturbation.parameters), len(perturbation._groups)


@pytest.mark.parametrize("iterations", [1, 2])
def test_nusam_kernels_are_four_per_matrix_plus_a_few_per_group(iterations):
    # an mv per matrix for Aᵀu and Av per iteration, one add and one removal of ε per matrix;
    # per group of equal shapes: a norm, an add and a division per half-step, and the guards
    # and stores of u and v (gt, and, two where); per step: the finite check (cat, mul, eq,
    # all) and the skip counter (not, add)
    model = model_in("fp32")
    nusam = NuclearPerturbation(model, rho=0.1, power_iterations=iterations, batched=False)
    give_gradients(model, 0)
    nusam.perturb()
    nusam.restore()
    with counts.DispatchCounter() as counter:
        nusam.perturb()
        nusam.restore()
    k, groups = matrices(nusam)
    assert counter.kernels == (2 * iterations + 2) * k + (6 * iterations + 4) * groups + 6, counter.ops
    assert counter.syncs == 0


@pytest.mark.parametrize("cls", [NuclearPerturbation, NuclearNormalizedPerturbation])
@pytest.mark.parametrize("iterations", [1, 3])
def test_grouped_bookkeeping_gives_the_epsilon_of_the_looped_reference(cls, iterations):
    models = [model_in("fp32") for _ in range(2)]
    grouped = cls(models[0], rho=0.2, power_iterations=iterations, batched=False)
    reference = cls(models[1], rho=0.2, power_iterations=iterations, batched=False, foreach=False)
    for step in range(3):
        for model in models:
            give_gradients(model, step)
        before = {n: p.detach().clone() for n, p in models[0].named_parameters()}
        grouped.perturb()
        reference.perturb()
        for (name, p), q in zip(models[0].named_parameters(), models[1].parameters(), strict=True):
            torch.testing.assert_close(p - before[name], q - before[name], rtol=0, atol=1e-6)
        grouped.restore()
        reference.restore()


@pytest.mark.parametrize("method", ["nusam", "nusam_batched", "sam", "gausssam"])
def test_autocast_is_off_inside_perturb_and_restore(method):
    models = [model_in("fp32") for _ in range(2)]
    plain, cast = METHODS[method](models[0]), METHODS[method](models[1])
    for model in models:
        give_gradients(model, 0)
    plain.perturb()
    with counts.DispatchCounter() as without:
        plain.restore()
        give_gradients(models[0], 1)
        plain.perturb()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast.perturb()
        with counts.DispatchCounter() as within:
            cast.restore()
            give_gradients(models[1], 1)
            cast.perturb()
    for p, q in zip(models[0].parameters(), models[1].parameters(), strict=True):
        assert torch.equal(p, q)
    assert within.ops == without.ops  # the same kernels, none in bf16


def test_a_step_checks_the_selected_parameters_only():
    model = model_in("fp32")
    nusam = NuclearPerturbation(model, rho=0.1)
    give_gradients(model, 0)
    nusam.perturb()
    nusam.restore()

    def walked(*args, **kwargs):
        raise AssertionError("the whole model was walked")

    model.parameters = walked
    model.named_parameters = walked
    for p in nusam.parameters:
        p.grad = torch.randn_like(p)
    nusam.perturb()
    nusam.restore()
    del model.parameters, model.named_parameters
    # a change is still followed: a swapped layer, and a cast of a selected matrix
    model.head = nn.Linear(16, 5)
    assert any(p is model.head.weight for p in nusam.parameters)
    model.blocks[0]["fc1"].to(torch.float64)
    assert next(p for p, n in zip(nusam.parameters, nusam.parameter_names, strict=True)
                if n == "blocks.0.fc1.weight").dtype == torch.float64


@pytest.mark.parametrize("method", ["nusam", "nusam_batched", "nusam_norm", "sam_on", "sam"])
def test_no_host_synchronisation_in_the_data_parallel_reduction_besides_its_collective(method, monkeypatch):
    import lightning_nusam.perturbations.l2 as l2
    import lightning_nusam.perturbations.nuclear as nuclear

    collectives = []
    monkeypatch.setattr(nuclear, "average_over", lambda group, tensors: collectives.append(len(tensors)))
    monkeypatch.setattr(l2, "average_over", lambda group, tensors: collectives.append(len(tensors)))
    model = model_in("fp32")
    perturbation = METHODS[method](model)
    replicas = object()  # stands for the process group: the collective itself is not counted
    for step in range(2):
        give_gradients(model, step)
        with counts.DispatchCounter() as counter:
            perturbation.perturb(replicas=replicas)
            perturbation.restore()
    assert counter.syncs == 0, counter.sync_sources
    assert collectives  # the reduction ran
