"""Inputs that used to fail silently, crash late or leave a side effect: each now works or is
refused early with a message that names the argument and the fix. (The mixin's: test_mixin.py.)"""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from helpers import Classifier, PlainClassifier, TinyViTLike, classification_data, first_pass, loader, trainer
from lightning_nusam import SAM, GaussSAM, NuSAM
from lightning_nusam.perturbations import GaussianPerturbation, L2Perturbation, NuclearPerturbation

ROOT = Path(__file__).resolve().parents[1]


# 2. one pattern given as a string ----------------------------------------------------------------
def test_callbacks_take_a_string_as_one_pattern():
    model = TinyViTLike()
    nusam = NuSAM(rho=0.1, include="blocks.*")
    assert nusam.perturbation_options["include"] == ("blocks.*",)
    assert nusam.make_perturbation(model).parameter_names == [
        f"blocks.{b}.{layer}.weight" for b in (0, 1) for layer in ("fc1", "fc2")]
    sam = SAM(rho=0.1, exclude="head.bias")
    names = sam.make_perturbation(model).parameter_names
    assert "head.bias" not in names and "head.weight" in names
    assert len(names) == len(list(model.parameters())) - 1
    with pytest.raises(TypeError, match="`include`"):
        NuSAM(rho=0.1, include=[1, 2])


# 4. start_fraction with an unknown number of steps ---------------------------------------------
class Stream(IterableDataset):
    def __iter__(self):
        inputs, labels = classification_data().tensors
        yield from zip(inputs, labels, strict=True)


@pytest.mark.parametrize("module_cls", [Classifier, PlainClassifier])
def test_start_fraction_without_a_known_total_is_refused_before_training(module_cls):
    module = module_cls()
    with pytest.raises(ValueError, match=r"start_fraction.*start_epoch.*max_steps"):
        trainer(max_epochs=1, callbacks=[NuSAM(rho=0.1, start_fraction=0.5)]).fit(
            module, DataLoader(Stream(), batch_size=8))
    assert module.loss_calls == 0
    with pytest.raises(ValueError, match="start_fraction"):
        trainer(max_epochs=-1, max_time={"seconds": 5}, callbacks=[NuSAM(rho=0.1, start_fraction=0.5)]).fit(
            module_cls(), loader(classification_data()))


def test_start_fraction_with_max_steps_on_a_stream_counts_steps():
    module = Classifier()
    run = trainer(max_steps=4, max_epochs=-1, callbacks=[NuSAM(rho=0.1, start_fraction=0.5)])
    run.fit(module, DataLoader(Stream(), batch_size=8))
    assert run.global_step == 4 and module.loss_calls == 2 + 2 * 2


# 5. exact restore for low-precision weights ----------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", ["nusam", "gauss"])
def test_low_precision_weights_are_restored_bit_exactly_after_many_cycles(dtype, method):
    torch.manual_seed(0)
    model = TinyViTLike().to(dtype)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    perturbation = (NuclearPerturbation(model, rho=0.5) if method == "nusam"
                    else GaussianPerturbation(model, rho=0.5, seed=1))
    assert perturbation.exact_restore
    numel = sum(p.numel() for p in perturbation.parameters)
    most_exceptions = 0
    for step in range(48):  # lr 0: every cycle must give the weights back
        first_pass(model, seed=step)
        perturbation.perturb()
        most_exceptions = max(most_exceptions, perturbation.held_numel())
        perturbation.restore()
    for name, parameter in model.named_parameters():
        assert torch.equal(parameter, before[name]), name
    assert perturbation.held_numel() < most_exceptions  # the exceptions are only held while perturbed
    assert most_exceptions < numel  # far from a copy of the weights


def test_naive_low_precision_restore_drifts_which_is_why_it_is_exact():
    torch.manual_seed(0)
    model = TinyViTLike().to(torch.bfloat16)
    before = [p.detach().clone() for p in model.parameters()]
    perturbation = NuclearPerturbation(model, rho=0.5, exact_restore=False)
    for step in range(48):
        first_pass(model, seed=step)
        perturbation.perturb()
        perturbation.restore()
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))


def test_fp32_exact_restore_on_request():
    torch.manual_seed(0)
    model = TinyViTLike()
    before = [p.detach().clone() for p in model.parameters()]
    perturbation = NuclearPerturbation(model, rho=0.5, exact_restore=True)
    for step in range(10):
        first_pass(model, seed=step)
        perturbation.perturb()
        perturbation.restore()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))


# 6. the global RNG is restored on a resumed fit only -------------------------------------------
def test_test_and_validate_from_a_checkpoint_leave_the_rng_alone(tmp_path):
    class Evaluated(Classifier):
        test_step = Classifier.validation_step

    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    module = Evaluated()
    # a loader with its own generator: creating its iterator draws nothing from the global RNG
    data = DataLoader(classification_data(), batch_size=8, generator=torch.Generator().manual_seed(0))
    trainer(max_steps=2, callbacks=[NuSAM(rho=0.1), checkpoint], enable_checkpointing=True).fit(
        module, data, val_dataloaders=data)
    state = torch.load(tmp_path / "last.ckpt", weights_only=False)
    saved_rng = next(v for k, v in state["callbacks"].items() if k.startswith("NuSAM"))["rng"]
    assert len(saved_rng) == 1 and set(saved_rng[0]) >= {"cpu"}
    for run in ("validate", "test"):
        torch.manual_seed(123)
        expected = torch.rand(3)
        torch.manual_seed(123)
        getattr(trainer(callbacks=[NuSAM(rho=0.1)]), run)(module, data, ckpt_path=str(tmp_path / "last.ckpt"),
                                                          verbose=False)
        assert torch.equal(torch.rand(3), expected), run


# 7. the core imports without Lightning -------------------------------------------------------------
def test_the_core_the_engine_the_policy_and_the_sam_optimizer_do_not_import_lightning():
    code = ("import sys, torch, lightning_nusam.perturbations, lightning_nusam.perturbations.nuclear, "
            "lightning_nusam.engine, lightning_nusam.policy, lightning_nusam.optim; "
            "model = torch.nn.Linear(4, 4); "
            "lightning_nusam.optim.SAMOptimizer(lightning_nusam.perturbations.NuclearPerturbation(model), "
            "torch.optim.SGD(model.parameters(), lr=0.1)); "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning')); "
            "assert not bad, bad; import lightning_nusam; assert lightning_nusam.NuSAM.__name__ == 'NuSAM'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


# 8. closure optimizers, sparse gradients ---------------------------------------------------------


class WithSparseEmbedding(nn.Module):
    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(20, 8, sparse=True)
        self.hidden = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, tokens):
        return self.head(torch.tanh(self.hidden(self.embedding(tokens).mean(1))))


@pytest.mark.parametrize("cls", [NuclearPerturbation, L2Perturbation, GaussianPerturbation])
def test_sparse_gradients_are_left_out_with_a_warning_and_restore_is_complete(cls):
    torch.manual_seed(0)
    model = WithSparseEmbedding()
    options = {"include_embeddings": True} if cls is NuclearPerturbation else {}  # else skipped as a table
    with pytest.warns(UserWarning, match="sparse"):
        perturbation = cls(model, rho=0.5, **options)
    assert "embedding.weight" not in perturbation.parameter_names
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    nn.functional.cross_entropy(model(torch.randint(0, 20, (4, 5))), torch.tensor([0, 1, 2, 0])).backward()
    assert model.embedding.weight.grad.is_sparse
    perturbation.perturb()
    assert torch.equal(model.embedding.weight, before["embedding.weight"])
    assert not torch.equal(model.hidden.weight, before["hidden.weight"])
    perturbation.restore()
    for name, parameter in model.named_parameters():
        assert torch.allclose(parameter, before[name], atol=1e-6), name


def test_an_error_during_perturb_leaves_nothing_perturbed():
    torch.manual_seed(0)
    model = TinyViTLike()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    perturbation = NuclearPerturbation(model, rho=0.5, exact_restore=True)
    first_pass(model)
    calls = {"n": 0}
    original = perturbation._add_rank_one

    def fail_on_the_third(*args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("out of memory (simulated)")
        return original(*args)

    perturbation._add_rank_one = fail_on_the_third
    with pytest.raises(RuntimeError, match="simulated"):
        perturbation.perturb()
    assert not perturbation.is_perturbed
    for name, parameter in model.named_parameters():
        assert torch.equal(parameter, before[name]), name


# 9. arguments and noise ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("factory", "argument"),
    [(lambda: NuSAM(rho=True), "rho"), (lambda: NuSAM(rho="0.1"), "rho"),
     (lambda: NuSAM(rho=0.1, power_iterations=float("nan")), "power_iterations"),
     (lambda: NuSAM(rho=0.1, power_iterations=1.5), "power_iterations"),
     (lambda: NuSAM(rho=0.1, start_fraction="0.1"), "start_fraction"),
     (lambda: SAM(rho=0.1, start_epoch=1.5), "start_epoch"),
     (lambda: GaussSAM(rho=float("inf")), "rho"),
     (lambda: NuSAM(rho=0.1, every_n_steps=0), "every_n_steps"),
     (lambda: NuSAM(rho=0.1, rho_schedule="exp"), "rho_schedule"),
     (lambda: NuSAM(rho=0.1, rho_final=0.0), "rho_final"),
     (lambda: NuSAM(rho=0.1, sync_first_pass="no"), "sync_first_pass"),
     (lambda: NuSAM(rho=0.1, include_conv=1), "include_conv"),
     (lambda: SAM(rho=0.1, adaptive="yes"), "adaptive"),
     (lambda: SAM(rho=0.1, one_pass=True, sync_first_pass=False), "sync_first_pass"),
     (lambda: Classifier(accumulate_grad_batches=0), "accumulate_grad_batches"),
     (lambda: Classifier(gradient_clip_val=True), "gradient_clip_val")],
)
def test_bad_arguments_name_themselves(factory, argument):
    with pytest.raises(ValueError, match=f"`{argument}`"):
        factory()


def test_the_console_command_does_not_warn_about_args_and_argv(tmp_path):
    command = [str(Path(sys.executable).parent / "nusam"), "fit", "-c",
               str(ROOT / "configs" / "quickstart.yaml"), "--trainer.fast_dev_run=1",
               f"--trainer.default_root_dir={tmp_path}"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "args parameter is intended" not in result.stderr + result.stdout


def test_exact_restore_of_a_non_contiguous_low_precision_weight():
    class Transposed(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(12, 7).t().to(torch.bfloat16))  # strides (1, 7)

        def forward(self, x):
            return x @ self.weight.t()

    torch.manual_seed(0)
    model = Transposed()
    assert not model.weight.is_contiguous()
    before = model.weight.detach().clone()
    nusam = NuclearPerturbation(model, rho=2.0)
    for _ in range(20):
        model.zero_grad()
        model(torch.randn(5, 12, dtype=torch.bfloat16)).float().square().sum().backward()
        nusam.perturb()
        nusam.restore()
    assert torch.equal(model.weight, before)
