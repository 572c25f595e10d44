"""``execution="compiled"``: νSAM's perturb()/restore() as ``torch.compile``'d programs.

They give what the looped reference (``foreach=False, batched=False``) gives, step after step
with a changing radius (T = 1 and T > 1, νSAM-Norm, the zero-gradient and non-finite guards, a
frozen matrix, the one-pass halves); bf16 weights come back bit-exactly; the programs compile
once per selection, never again for a new ρ, and without a graph break. Compiling costs seconds,
so the models are tiny and the T = 1 perturbation is built once for the module (its state is
reset between tests). The CUDA versions of these checks are in ``test_cuda.py``.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo.utils
from torch import nn

from helpers import TinyViTLike
from lightning_nusam import NuSAM
from lightning_nusam.perturbations import NuclearNormalizedPerturbation, NuclearPerturbation
from lightning_nusam.perturbations import compiled as compiled_module
from lightning_nusam.perturbations.compiled import device_problem, torch_compile_problem

_problem = torch_compile_problem() or device_problem(torch.device("cpu"))
needs_compile = pytest.mark.skipif(_problem is not None, reason=f"no torch.compile here: {_problem}")

RHO = 0.1


def tiny_model(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return TinyViTLike(dim=8, depth=1).to(dtype)  # three matrices, three shapes


def give_gradients(models: list[nn.Module], seed: int) -> None:
    """The same random gradient for every parameter of each of ``models``."""
    for model in models:
        generator = torch.Generator().manual_seed(seed)
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=generator).to(p.dtype)


def reference_of(model: nn.Module, cls: type = NuclearPerturbation, **options) -> tuple[nn.Module, object]:
    """A copy of ``model`` with the looped reference perturbation on it."""
    twin = copy.deepcopy(model)
    return twin, cls(twin, rho=RHO, foreach=False, batched=False, **options)


def assert_weights_close(model: nn.Module, twin: nn.Module, exact: bool = False) -> None:
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        if exact:
            assert torch.equal(p, q), name
        else:
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=name)


def assert_vectors_close(compiled, reference) -> None:
    for name, (u, v) in reference.singular_vectors().items():
        cu, cv = compiled.singular_vectors()[name]
        torch.testing.assert_close(cu, u, rtol=1e-5, atol=1e-6, msg=name)
        torch.testing.assert_close(cv, v, rtol=1e-5, atol=1e-6, msg=name)


def graphs() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


@pytest.fixture(scope="module")
def compiled_nusam():
    """One compiled νSAM (T = 1) on a tiny model, shared by the module (compiled once)."""
    model = tiny_model()
    return model, NuclearPerturbation(model, rho=RHO, execution="compiled"), copy.deepcopy(model.state_dict())


@pytest.fixture
def nusam(compiled_nusam):
    """The shared compiled νSAM back at its start (weights, vectors, counters), and a reference."""
    model, compiled, initial = compiled_nusam
    model.load_state_dict(initial)
    for p in model.parameters():
        p.requires_grad_(True)
    twin, reference = reference_of(model)
    compiled.load_state_dict(reference.state_dict())
    return model, compiled, twin, reference


@needs_compile
def test_compiled_equals_the_looped_reference_with_a_changing_rho_without_recompiling(nusam):
    model, compiled, twin, reference = nusam
    breaks = dict(torch._dynamo.utils.counters["graph_break"])
    compiles_after_first_step = None
    for step, rho in enumerate([0.05, 0.1, 0.3, 0.2, 0.2]):  # a radius schedule
        give_gradients([model, twin], seed=step)
        before = [p.detach().clone() for p in model.parameters()]
        compiled.perturb(rho)
        reference.perturb(rho)
        assert compiled.is_perturbed and compiled.applied_rho == rho
        assert_weights_close(model, twin)
        assert_vectors_close(compiled, reference)
        compiled.restore()
        reference.restore()
        assert_weights_close(model, twin)
        for p, b in zip(model.parameters(), before, strict=True):  # w + ε − ε: a last-bit rounding
            torch.testing.assert_close(p, b, rtol=0, atol=1e-7)
        if step == 0:
            compiles_after_first_step = (compiled._programs.compiles, graphs())
    assert compiled._programs.compiles == 2  # perturb (estimate + add ε) and restore
    assert (compiled._programs.compiles, graphs()) == compiles_after_first_step  # no recompilation
    assert dict(torch._dynamo.utils.counters["graph_break"]) == breaks  # fullgraph: none
    assert compiled.steps == reference.steps == 5 and compiled.skipped_steps == 0


CLASSES_AND_ITERATIONS = [(NuclearPerturbation, 3), (NuclearNormalizedPerturbation, 2)]


@needs_compile
@pytest.mark.parametrize(("cls", "iterations"), CLASSES_AND_ITERATIONS,
                         ids=["nusam_T3", "nusam_norm_T2"])
def test_more_power_iterations_and_nusam_norm_equal_the_reference(cls, iterations):
    model = tiny_model()
    compiled = cls(model, rho=RHO, power_iterations=iterations, execution="compiled")
    twin, reference = reference_of(model, cls, power_iterations=iterations)
    for step in range(3):
        give_gradients([model, twin], seed=step)
        compiled.perturb()
        reference.perturb()
        assert_weights_close(model, twin)
        assert_vectors_close(compiled, reference)
        compiled.restore()
        reference.restore()
        assert_weights_close(model, twin)


@needs_compile
def test_a_zero_gradient_adds_nothing_and_keeps_the_warm_start(nusam):
    model, compiled, twin, reference = nusam
    give_gradients([model, twin], seed=0)
    for m in (model, twin):
        m.head.weight.grad.zero_()
    u_before = compiled.singular_vectors()["head.weight"][0].clone()
    head_before = model.head.weight.detach().clone()
    compiled.perturb()
    reference.perturb()
    assert torch.equal(model.head.weight, head_before)  # ε = ρ u · 0ᵀ
    u, v = compiled.singular_vectors()["head.weight"]
    assert torch.equal(u, u_before) and not v.any()
    assert_weights_close(model, twin)
    compiled.restore()
    reference.restore()
    assert compiled.skipped_steps == 0


@needs_compile
def test_a_non_finite_gradient_skips_the_step_and_counts_it(nusam):
    model, compiled, twin, reference = nusam
    give_gradients([model, twin], seed=0)
    for m in (model, twin):
        m.blocks[0]["fc1"].weight.grad[0, 0] = float("inf")
    before = [p.detach().clone() for p in model.parameters()]
    vectors = {name: u.clone() for name, (u, _) in compiled.singular_vectors().items()}
    compiled.perturb()
    reference.perturb()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))  # nothing added
    for name, (u, v) in compiled.singular_vectors().items():  # the warm start kept, no direction
        assert torch.equal(u, vectors[name]) and not v.any(), name
    compiled.restore()
    reference.restore()
    assert compiled.skipped_steps == reference.skipped_steps == 1
    give_gradients([model, twin], seed=1)  # the next finite step perturbs again
    compiled.perturb()
    reference.perturb()
    assert_weights_close(model, twin)
    compiled.restore()
    reference.restore()
    assert compiled.skipped_steps == 1 and compiled.steps == 2


@needs_compile
def test_the_one_pass_halves_equal_the_reference(nusam):
    model, compiled, twin, reference = nusam
    for step in range(2):
        give_gradients([model, twin], seed=step)
        compiled.estimate()
        reference.estimate()
        assert_vectors_close(compiled, reference)
        compiled.apply(0.2)
        reference.apply(0.2)
        assert_weights_close(model, twin)
        compiled.restore()
        reference.restore()
        compiled.apply(0.2, repeat=True)  # the next micro-batch: the same ε again
        compiled.restore()
    assert compiled.steps == 2


@needs_compile
def test_a_checkpoint_while_perturbed_holds_what_restore_gives_back(nusam):
    model, compiled, _, _ = nusam
    give_gradients([model], seed=0)
    compiled.perturb()
    saved = model.state_dict()
    compiled.restore()
    assert all(torch.equal(saved[name], p) for name, p in model.named_parameters())


@needs_compile
def test_a_frozen_matrix_compiles_its_plan_once_and_an_earlier_plan_is_reused(nusam):
    model, compiled, twin, reference = nusam
    give_gradients([model, twin], seed=0)
    compiled.perturb()  # the plan of every matrix (compiled by an earlier test, or now)
    compiled.restore()
    reference.perturb()
    reference.restore()
    compiles = compiled._programs.compiles
    for m in (model, twin):
        m.blocks[0]["fc2"].weight.requires_grad_(False)
    for step in range(2):
        give_gradients([model, twin], seed=step + 1)
        frozen = model.blocks[0]["fc2"].weight.detach().clone()
        compiled.perturb()
        reference.perturb()
        assert torch.equal(model.blocks[0]["fc2"].weight, frozen)
        assert_weights_close(model, twin)
        compiled.restore()
        reference.restore()
    assert compiled._programs.compiles == compiles + 2  # the new plan: perturb and restore, once
    for m in (model, twin):
        m.blocks[0]["fc2"].weight.requires_grad_(True)
    give_gradients([model, twin], seed=3)
    compiled.perturb()
    reference.perturb()
    assert_weights_close(model, twin)
    compiled.restore()
    reference.restore()
    assert compiled._programs.compiles == compiles + 2  # the first plan again: kept


@needs_compile
def test_bf16_weights_are_restored_bit_exactly_and_perturbed_as_the_reference_does():
    """ρ = 30 overflows the exception budgets of two matrices at first: they are left unperturbed
    for that step (still exact), and the grown budgets compile one new plan."""
    model = tiny_model(torch.bfloat16)
    compiled = NuclearPerturbation(model, rho=0.5, execution="compiled")
    twin, reference = reference_of(model)
    initial = [p.detach().clone() for p in model.parameters()]
    assert compiled.exact_restore
    for step, rho in enumerate([0.5, 30.0, 30.0]):
        give_gradients([model, twin], seed=step)
        compiled.perturb(rho)
        reference.perturb(rho)
        for p, q in zip(model.parameters(), twin.parameters(), strict=True):  # to a bf16 rounding
            torch.testing.assert_close(p, q, rtol=2**-7, atol=1e-6)
        added = [bool(e.added) for group in compiled._groups for e in group.exceptions.values()]
        assert sorted(added) == ([False, False, True] if step == 1 else [True, True, True])
        compiled.restore()
        reference.restore()
        assert all(torch.equal(p, b) for p, b in zip(model.parameters(), initial, strict=True))
    assert compiled._programs.compiles == 4  # perturb and restore, then both again for the grown budgets
    assert compiled.held_numel() == reference.held_numel()  # the same vectors, no exceptions held now


@needs_compile
def test_the_option_is_checked_and_refuses_what_cannot_run_compiled():
    with pytest.raises(ValueError, match="`execution` must be one of 'eager', 'compiled'"):
        NuclearPerturbation(tiny_model(), execution="jit")
    assert NuclearPerturbation.check_options({"execution": "compiled"}) == {"execution": "compiled"}
    assert NuSAM(rho=0.1, execution="compiled").perturbation_options["execution"] == "compiled"
    with pytest.raises(ValueError, match="execution"):
        NuSAM(rho=0.1, execution=True)
    compiled = NuclearPerturbation(tiny_model(), execution="compiled")
    assert compiled.replica_reduction == "gradient"  # the first pass all-reduces the gradient
    assert NuclearPerturbation(tiny_model()).replica_reduction == "vectors"
    give_gradients([compiled.model], seed=0)
    with pytest.raises(RuntimeError, match=r"replicas.*execution='eager'"):
        compiled.perturb(replicas=object())
    assert not compiled.is_perturbed
    assert "runs on cpu and cuda tensors, not meta" in device_problem(torch.device("meta"))


@needs_compile
def test_a_program_that_fails_to_compile_names_the_fix_and_changes_nothing():
    model = tiny_model()
    compiled = NuclearPerturbation(model, execution="compiled")
    compiled._programs.functions["perturb"] = lambda *args: torch._dynamo.graph_break()  # fullgraph: fails
    give_gradients([model], seed=0)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match=r"failed to compile or run .*`execution='eager'`"):
        compiled.perturb()
    assert not compiled.is_perturbed and not compiled.has_direction and compiled.steps == 0
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))


def test_a_torch_without_the_compiler_refuses_compiled_at_construction(monkeypatch):
    monkeypatch.setattr(compiled_module, "torch_compile_problem", lambda: "torch 2.3 is too old")
    with pytest.raises(ValueError, match=r"`execution='compiled'` is not available: torch 2.3 is too old; "
                                         r"use `execution='eager'`"):
        NuclearPerturbation(tiny_model(), execution="compiled")
    NuclearPerturbation(tiny_model())  # eager needs no compiler
