"""The experimental one-pass νSAM: ε_t = ρ u vᵀ from the previous step's gradient, one
forward/backward per step, on both ways in."""

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins import MixedPrecision

from helpers import (
    Classifier,
    PlainClassifier,
    classification_data,
    loader,
    max_weight_difference,
    resumable_fit,
    same_weights,
    trainer,
)
from lightning_nusam import SAM, SAMON, GaussSAM, NuSAM, NuSAMNorm


class Observer(Callback):
    """Per optimizer step: the gradient the optimizer uses (unclipped here) and the weights after
    the step; the module records the weights its forward pass sees."""

    def __init__(self):
        self.gradients, self.weights_after = [], []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.gradients.append({n: p.grad.detach().clone() for n, p in pl_module.net.named_parameters()
                               if p.grad is not None})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.weights_after.append({n: p.detach().clone() for n, p in pl_module.net.named_parameters()})


def seeing(module_cls):
    class Seeing(module_cls):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.seen = []

        def _record(self):
            self.seen.append({n: p.detach().clone() for n, p in self.net.named_parameters()})

    if module_cls is Classifier:
        def compute_loss(self, batch, batch_idx):
            self._record()
            return Classifier.compute_loss(self, batch, batch_idx)
        Seeing.compute_loss = compute_loss
    else:
        def training_step(self, batch, batch_idx):
            self._record()
            return PlainClassifier.training_step(self, batch, batch_idx)
        Seeing.training_step = training_step
    return Seeing


@pytest.mark.parametrize("module_cls", [Classifier, PlainClassifier], ids=["mixin", "dropin"])
def test_epsilon_at_step_t_is_rho_u_vt_of_the_step_t_minus_1_gradient(module_cls):
    rho = 0.3
    sam = NuSAM(rho=rho, one_pass=True, power_iterations=60)  # enough iterations to converge
    observer = Observer()
    module = seeing(module_cls)()
    initial = {n: p.detach().clone() for n, p in module.net.named_parameters()}
    run = trainer(max_steps=5, callbacks=[sam, observer])
    run.fit(module, loader(classification_data()))
    assert len(module.seen) == 5  # one forward/backward per step
    if module_cls is PlainClassifier:
        assert module.passes == [None] * 5  # training_step: the only pass of each step
    names = [n.removeprefix("net.") for n in sam.perturbation.parameter_names]
    for name, value in initial.items():  # step 0 primes (u, v) with a plain step at w
        assert torch.equal(module.seen[0][name], value)
    for step in range(1, 5):
        for name in names:
            epsilon = module.seen[step][name] - observer.weights_after[step - 1][name]
            gradient = observer.gradients[step - 1][name]
            u, sigma, vh = torch.linalg.svd(gradient.double())
            expected = rho * torch.outer(u[:, 0], vh[0]).float()
            assert torch.allclose(epsilon, expected, atol=2e-4), (step, name)
            # the maximiser of <ε, G> over the nuclear ball of radius ρ: value ρ σ₁, norm ρ
            assert float((epsilon * gradient).sum()) == pytest.approx(rho * float(sigma[0]), rel=1e-5)
            assert float(torch.linalg.matrix_norm(epsilon, ord="nuc")) == pytest.approx(rho, rel=1e-4)
        for name in initial.keys() - set(names):  # biases and norms are not perturbed
            assert torch.equal(module.seen[step][name], observer.weights_after[step - 1][name])


@pytest.mark.parametrize("module_cls", [Classifier, PlainClassifier], ids=["mixin", "dropin"])
def test_one_pass_counts_and_the_same_step_on_both_ways_in(module_cls):
    reference = None
    for cls in (Classifier, PlainClassifier):
        module = cls()
        sam = NuSAM(rho=0.3, one_pass=True, start_fraction=0.25)
        run = trainer(max_epochs=2, callbacks=[sam])
        run.fit(module, loader(classification_data()))
        assert run.global_step == 12 and module.loss_calls == 12
        assert sam.perturbation.steps == 12 - 3 - 1  # started at step 3, which primed
        assert run.callback_metrics["sam/active_epoch"] == 1.0
        if reference is None:
            reference = module.net
        else:
            assert max_weight_difference(module.net, reference) <= 1e-6


@pytest.mark.parametrize("module_cls", [Classifier, PlainClassifier], ids=["mixin", "dropin"])
def test_one_pass_with_accumulation_equals_the_large_batch(module_cls):
    nets = []
    for accumulate, batch in ((4, 2), (1, 8)):
        if module_cls is Classifier:
            module, extra = Classifier(accumulate_grad_batches=accumulate), {}
        else:
            module, extra = PlainClassifier(), {"accumulate_grad_batches": accumulate}
        trainer(max_epochs=1, callbacks=[NuSAM(rho=0.3, one_pass=True)], **extra).fit(
            module, loader(classification_data(), batch))
        assert module.loss_calls == 48 // batch
        nets.append(module.net)
    assert max_weight_difference(*nets) <= 1e-5


def test_one_pass_with_every_n_steps_uses_the_latest_gradient():
    sam = NuSAM(rho=0.3, one_pass=True, every_n_steps=2)
    module = PlainClassifier()
    trainer(max_steps=6, callbacks=[sam]).fit(module, loader(classification_data()))
    assert module.loss_calls == 6
    assert sam.perturbation.steps == 2  # steps 2 and 4 (step 0 primed)


def test_gausssam_one_pass_is_the_same_method_without_the_unused_pass():
    module = PlainClassifier()
    sam = GaussSAM(rho=0.2, one_pass=True)
    trainer(max_steps=4, callbacks=[sam]).fit(module, loader(classification_data()))
    assert module.loss_calls == 4 and sam.perturbation.steps == 3


@pytest.mark.parametrize("factory", [lambda: SAM(rho=0.1, one_pass=True),
                                     lambda: SAMON(rho=0.1, one_pass=True)])
def test_one_pass_is_refused_where_the_direction_is_the_whole_gradient(factory):
    with pytest.raises(ValueError, match="one_pass"):
        trainer(max_steps=1, callbacks=[factory()]).fit(PlainClassifier(), loader(classification_data()))


def test_one_pass_refuses_m_sam_and_batchnorm_choices():
    with pytest.raises(ValueError, match="sync_first_pass"):
        NuSAM(rho=0.1, one_pass=True, sync_first_pass=False)
    with pytest.raises(ValueError, match="batchnorm_update"):
        NuSAMNorm(rho=0.1, one_pass=True, batchnorm_update="second")


def test_one_pass_under_16_mixed_through_the_mixin():
    module = Classifier(gradient_clip_val=1.0)
    sam = NuSAM(rho=0.1, one_pass=True)
    run = trainer(max_steps=4, callbacks=[sam], plugins=[MixedPrecision("16-mixed", "cpu")])
    run.fit(module, loader(classification_data()))
    assert run.global_step == 4 and module.loss_calls == 4 and not sam.perturbation.is_perturbed
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_one_pass_resume_is_bit_identical(tmp_path):
    sam = NuSAM(rho=0.3, one_pass=True, start_fraction=0.1)
    uninterrupted = resumable_fit(PlainClassifier, sam, tmp_path / "a", save_every=4, data_seed=4)
    state = torch.load(tmp_path / "a" / "epoch=0-step=4.ckpt", weights_only=False)
    saved = next(v for k, v in state["callbacks"].items() if k.startswith("NuSAM"))["perturbation"]
    assert set(saved["v"]) == set(saved["u"]) and saved["estimated"]  # the direction for step 5
    torch.manual_seed(7)
    resumed_sam = NuSAM(rho=0.3, one_pass=True, start_fraction=0.1)
    resumed = resumable_fit(PlainClassifier, resumed_sam, tmp_path / "b", data_seed=4,
                            ckpt_path=str(tmp_path / "a" / "epoch=0-step=4.ckpt"))
    assert same_weights(uninterrupted, resumed)
    assert resumed_sam.perturbation.steps == sam.perturbation.steps


class ValidationSeesCleanWeights(Callback):
    """Validation in the middle of an accumulation window must see w, not w + ε."""

    def __init__(self, sam):
        self.sam, self.checked = sam, 0

    def on_validation_start(self, trainer, pl_module):
        assert not self.sam.perturbation.is_perturbed
        self.checked += 1


@pytest.mark.parametrize("module_cls", [Classifier, PlainClassifier], ids=["mixin", "dropin"])
def test_one_pass_epsilon_never_outlives_a_micro_batch(module_cls):
    sam = NuSAM(rho=0.3, one_pass=True)
    guard = ValidationSeesCleanWeights(sam)
    module = Classifier(accumulate_grad_batches=4) if module_cls is Classifier else PlainClassifier()
    run = trainer(max_epochs=1, callbacks=[sam, guard], val_check_interval=3,  # mid-window validation
                  accumulate_grad_batches=1 if module_cls is Classifier else 4)
    data = loader(classification_data(), 2)
    run.fit(module, data, val_dataloaders=data)
    assert guard.checked >= 4 and run.global_step == 6
    assert sam.perturbation.steps == 5  # once per perturbed optimizer step, not per micro-batch


def test_gausssam_one_pass_draws_one_noise_per_step_across_micro_batches():
    nets = []
    for accumulate, batch in ((4, 2), (1, 8)):
        module = PlainClassifier()
        sam = GaussSAM(rho=0.3, one_pass=True)
        trainer(max_epochs=1, callbacks=[sam], accumulate_grad_batches=accumulate).fit(
            module, loader(classification_data(), batch))
        assert sam.perturbation.steps == 5
        nets.append(module.net)
    assert max_weight_difference(*nets) <= 1e-5
