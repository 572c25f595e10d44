"""What the perturbation covers, and Lightning programs that must run with a callback added.

The perturbation covers what the optimizer updates (its groups' parameters that train, followed
when Lightning's optimizer is replaced during fit), whichever way in: the drop-in, the mixin and
``SAMOptimizer``. Valid Lightning programs run: ``training_step(self, batch)``, lazy modules,
layers built in ``configure_model``. ``exclude_modules`` excludes everything inside a matching
module; weight_norm's magnitude ``g`` is a scale, not a weight matrix; the first-pass gradient is
never clipped before ε. Each case is checked against an independent loop, and ``rho=0`` (and a
radius below the weights' rounding) against the run without the callback.
"""

from __future__ import annotations

import copy

import lightning as L
import pytest
import pytorch_optimizer
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
    micro_batches,
    trainer,
)
from lightning_nusam import SAM, NuSAM, SAMMixin, sam_pass
from lightning_nusam.optim import SAMOptimizer
from lightning_nusam.perturbations import L2Perturbation, NuclearPerturbation

CE = nn.functional.cross_entropy
CONVERGED = 30  # power iterations: the top singular pair to fp32 rounding, whatever the start vector


def probe_net() -> nn.Module:
    """A backbone (trained by nobody: omitted from the optimizer) and a linear head."""
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh())
    return nn.ModuleDict({"backbone": backbone, "head": nn.Linear(16, 3)})


def forward(net: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    return net["head"](net["backbone"](inputs))


# 1. an optimizer over a subset of the parameters (linear probing) -----------------------------------
class LinearProbe(L.LightningModule):
    """The backbone requires grad but is not in the optimizer (frozen by omission)."""

    def __init__(self):
        super().__init__()
        self.net = probe_net()

    def training_step(self, batch, batch_idx):
        return CE(forward(self.net, batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.net["head"].parameters(), lr=0.05, momentum=0.9)


class MixinLinearProbe(SAMMixin, LinearProbe):
    def compute_loss(self, batch, batch_idx):
        return CE(forward(self.net, batch[0]), batch[1])


def pytorch_optimizer_sam(rho: float) -> nn.Module:
    """pytorch_optimizer.SAM over the head only: ε normalised over the optimizer's parameters."""
    net = probe_net()
    optimizer = pytorch_optimizer.SAM(net["head"].parameters(), torch.optim.SGD, rho=rho, perturb_eps=1e-12,
                                      lr=0.05, momentum=0.9)
    for inputs, labels in micro_batches(classification_data()):
        CE(forward(net, inputs), labels).backward()
        optimizer.first_step(zero_grad=True)
        CE(forward(net, inputs), labels).backward()
        optimizer.second_step(zero_grad=True)
    return net


def nusam_on_the_head(rho: float) -> nn.Module:
    """The hand-written νSAM loop with the optimized matrix as the only perturbed one (power
    iterations enough to reach the top singular pair whatever the start vector)."""
    net = probe_net()
    optimizer = torch.optim.SGD(net["head"].parameters(), lr=0.05, momentum=0.9)
    perturbation = NuclearPerturbation(net, rho=rho, power_iterations=CONVERGED, include="head.weight")
    for inputs, labels in micro_batches(classification_data()):
        net.zero_grad(set_to_none=True)
        CE(forward(net, inputs), labels).backward()
        perturbation.perturb()
        net.zero_grad(set_to_none=True)
        CE(forward(net, inputs), labels).backward()
        perturbation.restore()
        optimizer.step()
    return net


@pytest.mark.parametrize("way", ["dropin", "mixin"])
@pytest.mark.parametrize("method", ["SAM", "NuSAM"])
def test_a_subset_optimizer_is_what_the_perturbation_covers(way, method):
    module = LinearProbe() if way == "dropin" else MixinLinearProbe()
    sam = SAM(rho=0.5) if method == "SAM" else NuSAM(rho=0.5, power_iterations=CONVERGED)
    trainer(callbacks=[sam]).fit(module, loader(classification_data()))
    reference = pytorch_optimizer_sam(0.5) if method == "SAM" else nusam_on_the_head(0.5)
    assert max_weight_difference(module.net, reference) <= 1e-6
    assert sam.perturbation.parameter_names == (["net.head.weight", "net.head.bias"] if method == "SAM"
                                                else ["net.head.weight"])


def test_a_sam_optimizer_perturbs_the_parameters_of_its_own_groups():
    net = probe_net()
    optimizer = SAMOptimizer(L2Perturbation(net, rho=0.5),
                             torch.optim.SGD(net["head"].parameters(), lr=0.05, momentum=0.9))
    for inputs, labels in micro_batches(classification_data()):
        def closure(inputs=inputs, labels=labels):
            optimizer.zero_grad()
            loss = CE(forward(net, inputs), labels)
            loss.backward()
            return loss

        optimizer.step(closure)
    assert max_weight_difference(net, pytorch_optimizer_sam(0.5)) <= 1e-6


def test_first_step_of_a_sam_optimizer_perturbs_its_own_groups():
    net = probe_net()
    optimizer = SAMOptimizer(L2Perturbation(net, rho=0.5),
                             torch.optim.SGD(net["head"].parameters(), lr=0.05, momentum=0.9))
    for inputs, labels in micro_batches(classification_data()):
        net.zero_grad(set_to_none=True)
        CE(forward(net, inputs), labels).backward()
        optimizer.first_step(zero_grad=True)
        CE(forward(net, inputs), labels).backward()
        optimizer.second_step(zero_grad=True)
    assert max_weight_difference(net, pytorch_optimizer_sam(0.5)) <= 1e-6


def test_a_fabric_loop_perturbs_the_parameters_of_its_optimizer():
    from lightning.fabric import Fabric

    from lightning_nusam.fabric import fabric_engine, fabric_passes

    fabric = Fabric(accelerator="cpu", devices=1)
    net = probe_net()
    model, optimizer = fabric.setup(net, torch.optim.SGD(net["head"].parameters(), lr=0.05, momentum=0.9))
    engine = fabric_engine(fabric, model, L2Perturbation(model, rho=0.5))
    # (the loss through `net`, the module Fabric set up: its wrapper is not subscriptable)
    passes = fabric_passes(fabric, model, lambda batch, _: CE(forward(net, batch[0]), batch[1]))
    for index, batch in enumerate(micro_batches(classification_data())):
        engine.step(passes, [(batch, index)], optimizer)
    assert max_weight_difference(net, pytorch_optimizer_sam(0.5)) <= 1e-6


# 2. an optimizer replaced during fit ------------------------------------------------------------------
class ReplaceOptimizer(Callback):
    """At the start of epoch 1, a new configure_optimizers result (a fine-tuning schedule's way)."""

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == 1:
            pl_module.lr = 0.01
            trainer.strategy.setup_optimizers(trainer)


@pytest.mark.parametrize("rho", [0.5, 0.0])
def test_an_optimizer_replaced_during_fit_is_followed(rho):
    def run(callbacks):
        module = PlainClassifier()
        trainer(max_epochs=2, callbacks=[ReplaceOptimizer(), *callbacks]).fit(
            module, loader(classification_data(n=64)))
        return module

    sam = NuSAM(rho=rho)
    module = run([sam])
    if rho == 0.0:
        assert max_weight_difference(module.net, run([]).net) == 0.0
        return
    assert sam.perturbation.steps == 16
    assert module.passes == ["first", "second"] * 16
    assert max_weight_difference(module.net, replaced_optimizer_reference(rho)) <= 1e-6


def replaced_optimizer_reference(rho: float) -> nn.Module:
    """νSAM with SGD(lr 0.05) for the 8 steps of epoch 0, then a new SGD(lr 0.01) for 8 (what
    ReplaceOptimizer installs), written out as a plain loop."""
    net = make_net()
    perturbation = NuclearPerturbation(net, rho=rho)  # one, its vectors carried over the swap
    for lr in (0.05, 0.01):
        nusam_loop(net, rho, micro_batches(classification_data(n=64)), lr, perturbation)
    return net


class MixinReplaced(Classifier):
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def test_an_optimizer_replaced_during_fit_is_followed_by_the_mixin():
    module, sam = MixinReplaced(), NuSAM(rho=0.5)
    trainer(max_epochs=2, callbacks=[ReplaceOptimizer(), sam]).fit(module, loader(classification_data(n=64)))
    assert sam.perturbation.steps == 16
    assert max_weight_difference(module.net, replaced_optimizer_reference(0.5)) <= 1e-6


# 3. training_step without batch_idx --------------------------------------------------------------
class NoBatchIndex(PlainClassifier):
    def training_step(self, batch):
        self.passes.append(sam_pass(self))
        return CE(self.net(batch[0]), batch[1])


@pytest.mark.parametrize("rho", [0.5, 0.0])
def test_training_step_without_batch_idx(rho):
    with_index, without = PlainClassifier(), NoBatchIndex()
    trainer(callbacks=[NuSAM(rho=rho)]).fit(with_index, loader(classification_data()))
    trainer(callbacks=[NuSAM(rho=rho)]).fit(without, loader(classification_data()))
    assert without.passes == ["first", "second"] * 6
    assert max_weight_difference(with_index.net, without.net) == 0.0


# 4. lazy modules and layers built in configure_model ---------------------------------------------
class Lazy(L.LightningModule):
    """LazyLinear layers, initialised by the first forward (or example_input_array's)."""

    def __init__(self, example: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.LazyLinear(16), nn.Tanh(), nn.LazyLinear(3))
        if example:
            self.example_input_array = torch.zeros(2, 6)
        self.initial: list[nn.Module] = []  # (a list: not a submodule of this module)

    def forward(self, inputs):
        return self.net(inputs)

    def training_step(self, batch, batch_idx):
        logits = self.net(batch[0])
        if not self.initial:  # the first pass of the first step: the weights w
            self.initial.append(copy.deepcopy(self.net))
        return CE(logits, batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def nusam_loop(net: nn.Module, rho: float, batches, lr: float = 0.05,
               perturbation: NuclearPerturbation | None = None) -> nn.Module:
    optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    perturbation = perturbation if perturbation is not None else NuclearPerturbation(net, rho=rho)
    for inputs, labels in batches:
        CE(net(inputs), labels).backward()
        perturbation.perturb()
        net.zero_grad(set_to_none=True)
        CE(net(inputs), labels).backward()
        perturbation.restore()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return net


@pytest.mark.parametrize("example", [False, True])
def test_lazy_modules_are_selected_once_initialised(example):
    module, sam = Lazy(example), NuSAM(rho=0.5)
    trainer(callbacks=[sam], enable_model_summary=example).fit(module, loader(classification_data()))
    reference = nusam_loop(module.initial[0], 0.5, micro_batches(classification_data()))
    assert max_weight_difference(module.net, reference) <= 1e-6
    assert sam.perturbation.parameter_names == ["net.0.weight", "net.2.weight"]
    assert sam.perturbation.steps == 6


def test_lazy_modules_with_rho_zero_train_as_without_the_callback():
    plain = Lazy()  # (initialised from the global stream at the first forward: built just before)
    trainer().fit(plain, loader(classification_data()))
    zero = Lazy()
    trainer(callbacks=[NuSAM(rho=0.0)]).fit(zero, loader(classification_data()))
    assert max_weight_difference(plain.net, zero.net) == 0.0


class BuiltInConfigureModel(PlainClassifier):
    def __init__(self):
        super().__init__(net=nn.Identity())
        self.net = None

    def configure_model(self):
        if self.net is None:
            self.net = make_net()


def test_layers_built_in_configure_model_are_selected():
    module, sam = BuiltInConfigureModel(), NuSAM(rho=0.5)
    trainer(callbacks=[sam]).fit(module, loader(classification_data()))
    reference = nusam_loop(make_net(), 0.5, micro_batches(classification_data()))
    assert max_weight_difference(module.net, reference) <= 1e-6
    assert sam.perturbation.parameter_names == ["net.0.weight", "net.3.weight", "net.6.weight"]


class OnlyBiases(PlainClassifier):
    def __init__(self):
        super().__init__(net=nn.Sequential(nn.LayerNorm(6), nn.Linear(6, 3)))
        self.net[1].weight.requires_grad_(False)
        del self.net[1].weight
        self.net[1].weight = torch.ones(3, 6)  # a constant, not a parameter


def test_a_model_with_nothing_to_perturb_is_refused_before_the_first_step():
    module = OnlyBiases()
    with pytest.raises(ValueError, match="no parameters to perturb"):
        trainer(callbacks=[NuSAM(rho=0.5)]).fit(module, loader(classification_data()))
    assert module.passes == []


# 5. exclude_modules, weight_norm's magnitude ----------------------------------------------------
class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(6, 8)
        self.layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, batch_first=True)
        self.attention = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)


@pytest.mark.parametrize(("excluded", "left"), [
    ([nn.TransformerEncoderLayer], ["embed.weight", "attention.in_proj_weight", "attention.out_proj.weight",
                                    "head.weight"]),
    ([nn.MultiheadAttention], ["embed.weight", "layer.linear1.weight", "layer.linear2.weight",
                               "head.weight"]),
])
def test_exclude_modules_excludes_everything_inside_a_matching_module(excluded, left):
    assert NuclearPerturbation(Encoder(), exclude_modules=excluded).parameter_names == left


def test_weight_norms_magnitude_is_a_scale_not_a_matrix_unless_included():
    from torch.nn.utils.parametrizations import weight_norm

    torch.manual_seed(0)
    net = nn.Sequential(weight_norm(nn.Linear(6, 16)), nn.Tanh(), nn.Linear(16, 1))
    old = nn.Sequential(nn.utils.weight_norm(nn.Linear(6, 16)), nn.Tanh(), nn.Linear(16, 1))
    assert NuclearPerturbation(net).parameter_names == ["0.parametrizations.weight.original1", "2.weight"]
    assert NuclearPerturbation(old).parameter_names == ["0.weight_v", "2.weight"]
    assert NuclearPerturbation(net, include="*original0").parameter_names == [
        "0.parametrizations.weight.original0"]
    assert NuclearPerturbation(old, include=["*weight_g", "*weight_v"]).parameter_names == [
        "0.weight_g", "0.weight_v"]


# 6. a SAMOptimizer from configure_optimizers with clipping by value ------------------------------
class WithSAMOptimizer(PlainClassifier):
    def configure_optimizers(self):
        return SAMOptimizer(NuclearPerturbation(self.net, rho=self.rho),
                            torch.optim.SGD(self.net.parameters(), lr=0.05, momentum=0.9))


@pytest.mark.parametrize("algorithm", ["value", "norm"])
def test_a_sam_optimizer_under_lightnings_clipping_computes_eps_from_the_unclipped_gradient(algorithm):
    module = WithSAMOptimizer()
    module.rho = 0.5
    trainer(gradient_clip_val=0.02, gradient_clip_algorithm=algorithm).fit(
        module, loader(classification_data()))
    net = make_net()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    perturbation = NuclearPerturbation(net, rho=0.5)
    clip = clip_by_value if algorithm == "value" else clip_by_norm
    for inputs, labels in micro_batches(classification_data()):
        CE(net(inputs), labels).backward()
        perturbation.perturb()  # from the unclipped first-pass gradient
        net.zero_grad(set_to_none=True)
        CE(net(inputs), labels).backward()
        perturbation.restore()
        clip(net.parameters())  # the second pass's gradient is clipped, as Lightning does
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    assert max_weight_difference(module.net, net) <= 1e-6


def clip_by_value(parameters):
    torch.nn.utils.clip_grad_value_(parameters, 0.02)


def clip_by_norm(parameters):
    torch.nn.utils.clip_grad_norm_(parameters, 0.02)


# 7. DDP options users turn on (2 gloo processes against one process on the joined batch) ---------
DDP_STEPS = 6
STATIC = [f"method={m}" for m in ("NuSAM", "NuSAMNorm", "SAM", "SAMON", "GaussSAM")] + [
    "method=NuSAM,rho=0", "method=none"]
UNUSED = [f"ddp=unused,method={m}" for m in ("GaussSAM", "NuSAM", "NuSAMNorm", "SAMON", "SAM")]
REFUSED = ["method=NuSAM,msam=1"]  # last: the fit stops there


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory) -> dict[str, list[dict]]:
    """All DDP modes in one two-process job: {mode: [rank 0's record, rank 1's]}."""
    import subprocess
    import sys
    from pathlib import Path

    from helpers import subprocess_env

    here, out = Path(__file__).resolve().parent, tmp_path_factory.mktemp("ddp_options")
    modes = STATIC + UNUSED + REFUSED
    result = subprocess.run([sys.executable, str(here / "coverage_ddp_script.py"), str(out), str(DDP_STEPS),
                             *modes], env=subprocess_env(str(here)), capture_output=True, text=True,
                            timeout=900, cwd=out)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return {mode: [torch.load(out / f"{mode}_rank{r}.pt", weights_only=False) for r in range(2)]
            for mode in modes}


def one_process(mode: str) -> list[list[torch.Tensor]]:
    """The run of ``mode`` in one process with the joined batch of 8."""
    from coverage_ddp_script import Weights, make_callback, module_for, parse

    options, weights = parse(mode), Weights()
    sam = make_callback(options)
    trainer(max_steps=DDP_STEPS, callbacks=[cb for cb in (sam, weights) if cb is not None]).fit(
        module_for(options), loader(classification_data(), 8))
    return weights.weights


@pytest.mark.parametrize("mode", STATIC + UNUSED)
def test_ddp_static_graph_and_unused_parameters_equal_one_process_on_the_joined_batch(ddp_runs, mode):
    rank0, rank1 = ddp_runs[mode]
    assert rank0["error"] is None and len(rank0["weights"]) == DDP_STEPS
    reference = one_process(mode)
    for step in range(DDP_STEPS):
        assert max_weight_difference(rank0["weights"][step], rank1["weights"][step]) == 0.0
        assert max_weight_difference(rank0["weights"][step], reference[step]) <= 1e-5, step


def test_rho_zero_is_a_no_op_under_a_static_graph(ddp_runs):
    for rank in (0, 1):
        for zero, plain in zip(ddp_runs["method=NuSAM,rho=0"][rank]["weights"],
                               ddp_runs["method=none"][rank]["weights"], strict=True):
            assert max_weight_difference(zero, plain) == 0.0


def test_m_sam_under_a_static_graph_is_refused_before_the_first_step(ddp_runs):
    for record in ddp_runs["method=NuSAM,msam=1"]:
        assert "static_graph" in record["error"] and record["weights"] == []


# 8. rho=0 and a radius below the weights' rounding change nothing, in every program above --------
class WeightNormed(PlainClassifier):
    def __init__(self):
        torch.manual_seed(0)
        normed = nn.utils.parametrizations.weight_norm(nn.Linear(6, 16))
        super().__init__(net=nn.Sequential(normed, nn.Tanh(), nn.Linear(16, 3)))


PROGRAMS = {
    "linear-probe": (LinearProbe, {}),
    "no-batch-idx": (NoBatchIndex, {}),
    "lazy": (Lazy, {}),
    "configure-model": (BuiltInConfigureModel, {}),
    "weight-norm": (WeightNormed, {}),
    "replaced-optimizer": (PlainClassifier, {"max_epochs": 2, "callbacks": [ReplaceOptimizer()]}),
}


@pytest.mark.parametrize("rho", [0.0, 1e-12])
@pytest.mark.parametrize("method", [NuSAM, SAM])
@pytest.mark.parametrize("program", PROGRAMS)
def test_no_radius_is_a_no_op_in_these_programs(program, method, rho):
    def state(callbacks):
        make, options = PROGRAMS[program]
        module = make()  # built just before its fit (lazy layers draw from the global stream)
        options = {**options, "callbacks": options.get("callbacks", []) + callbacks}
        trainer(**options).fit(module, loader(classification_data()))
        return module.state_dict()

    plain, sam = state([]), state([method(rho=rho)])
    assert plain.keys() == sam.keys()
    assert all(torch.equal(plain[key], sam[key]) for key in plain)


@pytest.mark.parametrize("rho", [0.0, 1e-12])
def test_a_sam_optimizer_without_a_radius_under_clipping_by_value_is_its_base_optimizer(rho):
    plain, sam = PlainClassifier(), WithSAMOptimizer()
    sam.rho = rho
    for module in (plain, sam):
        trainer(gradient_clip_val=0.02, gradient_clip_algorithm="value").fit(
            module, loader(classification_data()))
    assert max_weight_difference(plain.net, sam.net) == 0.0
