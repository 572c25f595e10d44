import copy

import pytest
import torch
from torch import nn

from helpers import TinyViTLike, first_pass, matrix_with_gap
from lightning_nusam.perturbations import L2Perturbation, NuclearNormalizedPerturbation, NuclearPerturbation

MATRICES = ["blocks.0.fc1.weight", "blocks.0.fc2.weight", "blocks.1.fc1.weight",
            "blocks.1.fc2.weight", "head.weight"]


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_default_selection_is_the_weight_matrices(vit_like):
    nusam = NuclearPerturbation(vit_like, rho=0.1)
    assert sorted(nusam.parameter_names) == sorted(MATRICES)


@pytest.mark.parametrize("batched", [True, False])
def test_each_perturbation_is_rank_one_with_nuclear_norm_rho_and_ascends(batched):
    torch.manual_seed(0)
    model = TinyViTLike().double()
    rho = 0.3
    nusam = NuclearPerturbation(model, rho=rho, batched=batched)
    first_pass(model)
    before = snapshot(model)
    nusam.perturb()
    after = snapshot(model)
    for name in MATRICES:
        eps = after[name] - before[name]
        singular = torch.linalg.svdvals(eps)
        assert singular[1] < 1e-6 * singular[0], name                      # rank one
        torch.testing.assert_close(singular.sum(), torch.tensor(rho, dtype=torch.float64),
                                   rtol=1e-5, atol=0)                       # ‖ε‖_* = ρ
        grad = dict(model.named_parameters())[name].grad
        assert (eps * grad).sum() > 0, name                                 # ⟨ε, ∇f⟩ > 0
        u, v = nusam.singular_vectors()[name]
        torch.testing.assert_close(eps, rho * torch.outer(u, v).double(), rtol=0, atol=1e-12)


def test_restore_returns_weights_within_1e6_relative_and_leaves_others_bit_identical(vit_like):
    nusam = NuclearPerturbation(vit_like, rho=0.5)
    before = snapshot(vit_like)
    worst = 0.0
    for step in range(5):
        first_pass(vit_like, seed=step)
        nusam.perturb()
        nusam.restore()
        for name, value in snapshot(vit_like).items():
            if name in MATRICES:
                worst = max(worst, float((value - before[name]).abs().max() / before[name].abs().max()))
            else:
                assert torch.equal(value, before[name]), name
    assert worst < 1e-6


def test_parameters_outside_the_selection_are_never_touched(vit_like):
    nusam = NuclearPerturbation(vit_like, rho=0.5)
    first_pass(vit_like)
    before = snapshot(vit_like)
    nusam.perturb()
    after = snapshot(vit_like)
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed == set(MATRICES)


def test_warm_started_steps_converge_to_svd_top_pair():
    model = nn.Linear(9, 20, bias=False)
    grad = matrix_with_gap(20, 9, [3.0, 1.5, 1.0, 0.2], seed=7).float()
    rho = 0.2
    nusam = NuclearPerturbation(model, rho=rho, power_iterations=1)
    for _ in range(40):
        model.weight.grad = grad.clone()
        nusam.perturb()
        nusam.restore()
    before = model.weight.detach().clone()
    nusam.perturb()
    eps = model.weight.detach() - before
    left, _, right_t = torch.linalg.svd(grad.double())
    expected = rho * torch.outer(left[:, 0], right_t[0])
    torch.testing.assert_close(eps.double(), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("variant", [NuclearPerturbation, NuclearNormalizedPerturbation])
def test_batched_and_loop_paths_give_the_same_numbers(variant):
    torch.manual_seed(0)
    model_a = TinyViTLike(depth=4)
    model_b = copy.deepcopy(model_a)
    batched = variant(model_a, rho=0.2, power_iterations=3, batched=True, seed=3)
    looped = variant(model_b, rho=0.2, power_iterations=3, batched=False, seed=3)
    batched_chunked = variant(copy.deepcopy(model_a), rho=0.2, power_iterations=3,
                              batched=True, seed=3, max_stack_numel=300)
    for step in range(3):
        first_pass(model_a, seed=step)
        first_pass(model_b, seed=step)
        for name, p in batched_chunked_model(batched_chunked).items():
            p.grad = dict(model_a.named_parameters())[name].grad.clone()
        for nusam in (batched, looped, batched_chunked):
            nusam.perturb()
        for name in batched.parameter_names:
            u_a, v_a = batched.singular_vectors()[name]
            for other in (looped, batched_chunked):
                u_b, v_b = other.singular_vectors()[name]
                torch.testing.assert_close(u_a, u_b, rtol=1e-5, atol=1e-6)
                torch.testing.assert_close(v_a, v_b, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(dict(model_a.named_parameters()), dict(model_b.named_parameters()),
                                   rtol=0, atol=1e-7)
        for nusam in (batched, looped, batched_chunked):
            nusam.restore()


def batched_chunked_model(nusam: NuclearPerturbation) -> dict[str, nn.Parameter]:
    return dict(zip(nusam.parameter_names, nusam.parameters, strict=True))


def test_state_dict_round_trip_reproduces_the_next_perturbation(vit_like):
    original = NuclearPerturbation(vit_like, rho=0.1, seed=1)
    for step in range(3):
        first_pass(vit_like, seed=step)
        original.perturb()
        original.restore()
    state = original.state_dict()
    clone = copy.deepcopy(vit_like)
    resumed = NuclearPerturbation(clone, rho=0.1, seed=99)  # different random start vectors
    resumed.load_state_dict(state)
    assert resumed.steps == 3 and resumed.skipped_steps == 0
    for model, nusam in ((vit_like, original), (clone, resumed)):
        first_pass(model, seed=10)
        nusam.perturb()
    for name in MATRICES:
        assert torch.equal(dict(vit_like.named_parameters())[name], dict(clone.named_parameters())[name])


def test_load_state_dict_rejects_another_model(vit_like):
    state = NuclearPerturbation(vit_like, rho=0.1).state_dict()
    other = NuclearPerturbation(TinyViTLike(depth=3), rho=0.1)
    with pytest.raises(ValueError, match="missing"):
        other.load_state_dict(state)


def test_parameter_without_grad_is_skipped(vit_like):
    nusam = NuclearPerturbation(vit_like, rho=0.5)
    first_pass(vit_like)
    vit_like.head.weight.grad = None
    head_before = vit_like.head.weight.detach().clone()
    u_head_before = nusam.singular_vectors()["head.weight"][0].clone()
    nusam.perturb()
    assert torch.equal(vit_like.head.weight, head_before)
    assert torch.equal(nusam.singular_vectors()["head.weight"][0], u_head_before)
    nusam.restore()
    assert torch.equal(vit_like.head.weight, head_before)


def test_zero_gradient_gives_no_nan_and_no_perturbation(vit_like):
    nusam = NuclearPerturbation(vit_like, rho=0.5)
    u_before = {k: u.clone() for k, (u, _) in nusam.singular_vectors().items()}
    first_pass(vit_like)
    for p in vit_like.parameters():
        p.grad.zero_()
    before = snapshot(vit_like)
    nusam.perturb()
    assert all(torch.equal(p, before[n]) for n, p in vit_like.named_parameters())
    for name, (u, v) in nusam.singular_vectors().items():
        assert torch.isfinite(u).all() and torch.isfinite(v).all()
        assert torch.equal(u, u_before[name])  # the warm start survives a zero gradient
    nusam.restore()
    assert nusam.skipped_steps == 0


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_non_finite_gradient_skips_the_whole_step_and_keeps_the_state(vit_like, bad):
    nusam = NuclearPerturbation(vit_like, rho=0.5)
    first_pass(vit_like)
    nusam.perturb()
    nusam.restore()
    u_before = {k: u.clone() for k, (u, _) in nusam.singular_vectors().items()}
    first_pass(vit_like, seed=1)
    vit_like.blocks[1].fc1.weight.grad[0, 0] = bad  # one bad entry in one matrix
    before = snapshot(vit_like)
    nusam.perturb()
    assert all(torch.equal(p, before[n]) for n, p in vit_like.named_parameters())
    for name, (u, _) in nusam.singular_vectors().items():
        assert torch.equal(u, u_before[name]), name
    nusam.restore()
    assert all(torch.equal(p, before[n]) for n, p in vit_like.named_parameters())
    assert nusam.skipped_steps == 1 and nusam.steps == 2


def test_perturb_twice_is_an_error_and_restore_without_perturb_does_nothing(vit_like):
    nusam = NuclearPerturbation(vit_like, rho=0.5)
    before = snapshot(vit_like)
    nusam.restore()
    assert all(torch.equal(p, before[n]) for n, p in vit_like.named_parameters())
    first_pass(vit_like)
    nusam.perturb()
    with pytest.raises(RuntimeError, match="twice without restore"):
        nusam.perturb()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_parameters_use_fp32_vectors(dtype):
    torch.manual_seed(0)
    reference = TinyViTLike()
    model = copy.deepcopy(reference).to(dtype)
    nusam = NuclearPerturbation(model, rho=0.5)
    first_pass(model)
    before = snapshot(model)
    nusam.perturb()
    for name, (u, v) in nusam.singular_vectors().items():
        assert u.dtype == v.dtype == torch.float32
        eps = dict(model.named_parameters())[name].detach().float() - before[name].float()
        expected = 0.5 * torch.outer(u, v)
        # one rounding of ε to the weight's precision on top of the weight's own rounding
        tolerance = 2 * torch.finfo(dtype).eps * before[name].float().abs().max() + 1e-3
        assert (eps - expected).abs().max() < tolerance, name
    nusam.restore()
    for name, p in model.named_parameters():
        assert (p.float() - before[name].float()).abs().max() <= 2 * torch.finfo(dtype).eps * 4


def test_convolution_kernels_as_matrices_when_asked():
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.Flatten(), nn.Linear(6 * 16, 2))
    assert NuclearPerturbation(model, rho=0.1).parameter_names == ["2.weight"]
    nusam = NuclearPerturbation(model, rho=0.1, include_conv=True)
    assert nusam.parameter_names == ["0.weight", "2.weight"]
    model(torch.randn(2, 3, 6, 6)).sum().backward()
    before = model[0].weight.detach().clone()
    nusam.perturb()
    eps = (model[0].weight.detach() - before).reshape(6, 27)
    singular = torch.linalg.svdvals(eps)
    assert singular[1] < 1e-4 * singular[0]
    torch.testing.assert_close(singular.sum(), torch.tensor(0.1), rtol=1e-4, atol=0)
    assert nusam.held_numel() == (6 + 27) + (2 + 96)


def test_include_exclude_by_name_and_module_type(vit_like):
    only_fc1 = NuclearPerturbation(vit_like, rho=0.1, include=["*fc1*"])
    assert only_fc1.parameter_names == ["blocks.0.fc1.weight", "blocks.1.fc1.weight"]
    no_head = NuclearPerturbation(vit_like, rho=0.1, exclude=["head.*"])
    assert "head.weight" not in no_head.parameter_names
    class Head(nn.Linear):
        pass
    vit_like.head = Head(12, 5)
    by_type = NuclearPerturbation(vit_like, rho=0.1, exclude_modules=[Head])
    assert "head.weight" not in by_type.parameter_names


def test_frozen_and_tied_parameters(vit_like):
    vit_like.blocks[0].fc1.weight.requires_grad_(False)
    assert "blocks.0.fc1.weight" not in NuclearPerturbation(vit_like, rho=0.1).parameter_names
    tied = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10, bias=False))
    tied[1].weight = tied[0].weight  # the output projection's matrix: perturbed, once
    assert NuclearPerturbation(tied, rho=0.1).parameter_names == ["0.weight"]
    untied = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10, bias=False))  # a lookup table is not
    assert NuclearPerturbation(untied, rho=0.1).parameter_names == ["1.weight"]
    assert NuclearPerturbation(untied, rho=0.1, include_embeddings=True).parameter_names == ["0.weight",
                                                                                              "1.weight"]


def test_held_numel_is_the_vectors_it_keeps(vit_like):
    nusam = NuclearPerturbation(vit_like, rho=0.1)
    expected = sum(sum(p.shape) for n, p in vit_like.named_parameters() if n in MATRICES)
    assert nusam.held_numel() == expected == sum(t.numel() for t in nusam.held_tensors())
    first_pass(vit_like)
    nusam.perturb()
    assert nusam.held_numel() == expected  # nothing is allocated per step
    assert nusam.perturbed_numel() == sum(
        p.numel() for n, p in vit_like.named_parameters() if n in MATRICES)


@pytest.mark.parametrize(
    ("name", "expected"),
    [("vit_base_patch16_224", 149_224), ("vit_large_patch16_224", 395_240)],
)
def test_timm_vit_memory_matches_paper_table_1(name, expected):
    timm = pytest.importorskip("timm")
    with torch.device("meta"):
        model = timm.create_model(name)
    nusam = NuclearPerturbation(model, rho=0.1)
    assert nusam.held_numel() == expected
    assert "patch_embed.proj.weight" not in nusam.parameter_names
    assert not any("pos_embed" in n or "cls_token" in n for n in nusam.parameter_names)


def test_normalized_variant_shares_rho_by_singular_values():
    torch.manual_seed(0)
    model = TinyViTLike().double()
    rho = 0.4
    nusam = NuclearNormalizedPerturbation(model, rho=rho, power_iterations=50)
    first_pass(model)
    before = snapshot(model)
    nusam.perturb()
    params = dict(model.named_parameters())
    eps = {name: params[name].detach() - before[name] for name in MATRICES}
    sigmas = {name: torch.linalg.svdvals(params[name].grad)[0] for name in MATRICES}
    total = torch.sqrt(sum(s**2 for s in sigmas.values()))
    for name in MATRICES:
        values = torch.linalg.svdvals(eps[name])
        assert values[1] < 1e-6 * values[0]
        torch.testing.assert_close(values[0], rho * sigmas[name] / total, rtol=1e-5, atol=0)
    frobenius = torch.sqrt(sum(e.square().sum() for e in eps.values()))
    torch.testing.assert_close(frobenius, torch.tensor(rho, dtype=torch.float64), rtol=1e-5, atol=0)


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [({"rho": -0.1}, "rho"), ({"rho": float("nan")}, "rho"), ({"power_iterations": 0}, "power_iterations"),
     ({"power_iterations": 1.5}, "power_iterations"), ({"tau": 0.0}, "tau")],
)
def test_bad_arguments_raise_value_error_naming_the_argument(vit_like, kwargs, argument):
    with pytest.raises(ValueError, match=f"`{argument}`"):
        NuclearPerturbation(vit_like, **{"rho": 0.1, **kwargs})


def test_model_with_nothing_to_perturb_raises():
    with pytest.raises(ValueError, match=r"`model`.*no parameters to perturb"):
        NuclearPerturbation(nn.Sequential(nn.Conv2d(3, 4, 3), nn.LayerNorm(4)), rho=0.1)
    with pytest.raises(ValueError, match="no parameters to perturb"):
        NuclearPerturbation(TinyViTLike(), rho=0.1, include=["nothing*"])
    with pytest.raises(TypeError, match="`include`"):
        NuclearPerturbation(TinyViTLike(), rho=0.1, include=["*fc1*", 3])


def test_a_single_string_is_one_pattern_not_its_characters():
    one = NuclearPerturbation(TinyViTLike(), rho=0.1, include="*fc1*", exclude="blocks.1.*")
    assert one.parameter_names == ["blocks.0.fc1.weight"]
    assert NuclearPerturbation(TinyViTLike(), rho=0.1, exclude="head.weight").parameter_names == [
        "blocks.0.fc1.weight", "blocks.0.fc2.weight", "blocks.1.fc1.weight", "blocks.1.fc2.weight"]
    sam = L2Perturbation(TinyViTLike(), rho=0.1, include="blocks.*", exclude="*bias")
    assert sam.parameter_names == [f"blocks.{b}.{layer}.weight" for b in (0, 1)
                                   for layer in ("norm", "fc1", "fc2")]


def largest_allocation_bytes(nusam: NuclearPerturbation) -> int:
    """Largest single CPU allocation made by one perturb()/restore() round (torch profiler)."""
    from torch.profiler import ProfilerActivity, profile

    nusam.perturb()
    nusam.restore()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        nusam.perturb()
        nusam.restore()
    return max((event.cpu_memory_usage for event in prof.events()), default=0)


def test_no_gradient_sized_temporary_for_large_matrices():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 512))
    model(torch.randn(4, 256)).sum().backward()
    matrix_bytes = 512 * 512 * 4
    assert largest_allocation_bytes(NuclearPerturbation(model, rho=0.1, batched="auto")) < matrix_bytes // 64
    assert largest_allocation_bytes(NuclearPerturbation(model, rho=0.1, batched=False)) < matrix_bytes // 64
    # the measurement does see a stacked copy when batching is forced on the two 512x512 matrices
    assert largest_allocation_bytes(NuclearPerturbation(model, rho=0.1, batched=True)) >= 2 * matrix_bytes


def test_auto_batches_only_small_repeated_shapes():
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(16, 16) for _ in range(6)], nn.Linear(16, 300), nn.Linear(300, 300),
                          nn.Linear(300, 300))
    model(torch.randn(2, 16)).sum().backward()
    auto = NuclearPerturbation(model, rho=0.1, batched="auto")
    loop = NuclearPerturbation(copy.deepcopy(model), rho=0.1, batched=False)
    for name, p in zip(loop.parameter_names, loop.parameters, strict=True):
        p.grad = dict(model.named_parameters())[name].grad.clone()
    auto.perturb()
    loop.perturb()
    for name in auto.parameter_names:
        torch.testing.assert_close(auto.singular_vectors()[name][0], loop.singular_vectors()[name][0],
                                   rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="`batched`"):
        NuclearPerturbation(model, rho=0.1, batched="sometimes")


@pytest.fixture
def one_replica():
    """A data-parallel group of this one process (gloo): ``perturb(replicas=...)`` on it must give
    the ε of the single-process path. (A default group left by an earlier one-process fit is
    reused; otherwise one with an in-memory store is made for the test.)"""
    import torch.distributed as dist

    made_default = not dist.is_initialized()
    if made_default:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    assert dist.get_world_size() == 1
    group = dist.new_group([0], backend="gloo")
    yield group
    dist.destroy_process_group(group)
    if made_default:
        dist.destroy_process_group()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batched", ["auto", True, False])
def test_the_replicated_power_iteration_on_one_replica_gives_the_local_epsilon(one_replica, batched, dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16),
                          nn.Tanh(), nn.Linear(16, 3)).to(dtype)
    model(torch.randn(8, 12, dtype=dtype)).sum().backward()
    model[4].weight.grad = None  # a missing gradient counts as zero: that matrix gets no ε
    results = []
    for replicas in (None, one_replica):
        nusam = NuclearPerturbation(model, rho=0.2, power_iterations=3, batched=batched)
        before = snapshot(model)
        nusam.perturb(replicas=replicas)
        after = snapshot(model)
        results.append({name: after[name].float() - before[name].float() for name in after})
        nusam.restore()
    for name, epsilon in results[0].items():
        torch.testing.assert_close(results[1][name], epsilon, rtol=0, atol=1e-6, msg=name)
    assert float(results[1]["4.weight"].abs().max()) == 0.0


def test_the_replicated_power_iteration_stacks_at_most_max_stack_numel(one_replica, monkeypatch):
    from lightning_nusam.perturbations import nuclear

    stacked = []
    original = nuclear.stacked_products
    monkeypatch.setattr(nuclear, "stacked_products", lambda m: stacked.append(m.numel()) or original(m))
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(32, 32) for _ in range(6)])  # one group of 6 matrices of 1,024
    model(torch.randn(4, 32)).sum().backward()
    local = NuclearPerturbation(model, rho=0.1, batched=False)
    local.perturb()
    expected = {name: p.detach().clone() for name, p in model.named_parameters()}
    local.restore()
    nusam = NuclearPerturbation(model, rho=0.1, batched=True, max_stack_numel=2 * 1024)
    nusam.perturb(replicas=one_replica)
    assert stacked == [2 * 1024]  # the first chunk of 2 is stacked; the other chunks are read in place
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), expected[name], rtol=0, atol=1e-6)
    nusam.restore()


def random_gradients(model: nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=generator).to(p.dtype)


@pytest.mark.parametrize("cls", [NuclearPerturbation, NuclearNormalizedPerturbation])
def test_exact_restore_is_chosen_per_matrix_in_a_bf16_body_with_an_fp32_head(cls):
    # a bf16 body with an fp32 head (a model kept partly in fp32): the bf16 matrices keep their
    # exact restore, the fp32 head is restored by subtraction (a last-bit rounding at most)
    torch.manual_seed(0)
    model = TinyViTLike(dim=32).to(torch.bfloat16)
    model.head.float()
    before = snapshot(model)
    nusam = cls(model, rho=0.5)
    assert not nusam.exact_restore  # not every matrix: the head is fp32
    perturbed = 0
    for step in range(64):  # lr 0: each cycle must give the weights back
        random_gradients(model, step)
        nusam.perturb()
        # ε is added (the first step of a matrix whose rounding exceptions outgrow their first
        # budget leaves it unperturbed, and the budget grows)
        perturbed += not torch.equal(model.blocks[0]["fc1"].weight, before["blocks.0.fc1.weight"])
        nusam.restore()
    assert perturbed >= 62
    for name, parameter in model.named_parameters():
        if parameter.dtype == torch.bfloat16:
            assert torch.equal(parameter, before[name]), name
        else:
            torch.testing.assert_close(parameter, before[name], rtol=0, atol=1e-6)
