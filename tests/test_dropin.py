"""The drop-in (lightning_nusam.lightning.dropin): the callback alone on an ordinary
LightningModule (automatic optimization). Lightning's closure, clipping and schedulers, the same
step as SAMMixin, hooks and optimizer_step overrides, accumulation windows and what the drop-in
refuses. (What every way in shares: test_ways_in.py; the callback's options, checks and state:
test_callback.py.)"""

import copy
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import (
    EarlyStopping,
    GradientAccumulationScheduler,
    LearningRateMonitor,
    ModelCheckpoint,
)
from lightning.pytorch.plugins import MixedPrecision
from torch import nn

from helpers import (
    Classifier,
    PlainClassifier,
    classification_data,
    loader,
    make_net,
    max_weight_difference,
    trainer,
)
from lightning_nusam import SAM, SAMON, GaussSAM, NuSAM, NuSAMNorm, sam_pass
from lightning_nusam.perturbations import NuclearPerturbation

CALLBACKS = {"NuSAM": NuSAM, "NuSAMNorm": NuSAMNorm, "SAM": SAM, "SAMON": SAMON, "GaussSAM": GaussSAM}


def fit_both(callback_factory, precision="32-true", net_factory=make_net, scheduler=None, clip=None,
             **fit_kwargs):
    """The same model, data and seed through the drop-in and through the mixin."""
    data = classification_data(n=48)
    dropin = PlainClassifier(net=net_factory(), scheduler=scheduler)
    run = trainer(callbacks=[callback_factory()], precision=precision, gradient_clip_val=clip, **fit_kwargs)
    run.fit(dropin, loader(data))
    mixin = Classifier(net=net_factory(), scheduler=scheduler, gradient_clip_val=clip)
    reference = trainer(callbacks=[callback_factory()], precision=precision, **fit_kwargs)
    reference.fit(mixin, loader(data))
    return dropin, mixin, run, reference


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
@pytest.mark.parametrize("name", ["NuSAM", "SAM"])
def test_dropin_equals_the_mixin_with_clipping_and_a_step_scheduler(name, precision):
    dropin, mixin, run, reference = fit_both(
        lambda: CALLBACKS[name](rho=0.3), precision, clip=0.5, scheduler={"interval": "step", "frequency": 2})
    assert run.global_step == reference.global_step == 6
    assert dropin.passes == ["first", "second"] * 6  # training_step: twice per step, passes named
    difference = max_weight_difference(dropin.net, mixin.net)
    print(f"{name} {precision}: max |w_dropin - w_mixin| = {difference:.3e}")
    assert difference <= 1e-6
    assert run.lr_scheduler_configs[0].scheduler.last_epoch == 3  # Lightning stepped it, every 2nd step
    for key in ("sam/sharpness_epoch", "sam/loss_perturbed_epoch", "sam/active_epoch"):
        assert torch.allclose(run.callback_metrics[key], reference.callback_metrics[key])


@pytest.mark.parametrize("name", sorted(CALLBACKS))
def test_every_callback_on_the_dropin_equals_the_mixin(name):
    dropin, mixin, run, _ = fit_both(lambda: CALLBACKS[name](rho=0.2), max_steps=4)
    assert run.global_step == 4 and dropin.loss_calls == 8
    assert max_weight_difference(dropin.net, mixin.net) <= 1e-6


def test_trainer_gradient_clipping_clips_the_gradients_the_optimizer_uses():
    module = PlainClassifier(lr=1.0)
    module.configure_optimizers = lambda: torch.optim.SGD(module.parameters(), lr=1.0)
    before = copy.deepcopy(module.net)
    trainer(max_steps=1, callbacks=[SAM(rho=0.05)], gradient_clip_val=1e-3).fit(
        module, loader(classification_data()))
    step = torch.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(module.net.parameters(), before.parameters(),
                                                               strict=True)))
    assert step.item() == pytest.approx(1e-3, rel=1e-3)  # lr × the clipped second-pass gradient


def test_16_mixed_is_refused_before_any_step_and_names_the_mixin():
    module = PlainClassifier()
    before = copy.deepcopy(module.net)
    run = trainer(max_steps=2, callbacks=[NuSAM(rho=0.1)], plugins=[MixedPrecision("16-mixed", "cpu")])
    with pytest.raises(ValueError, match=r"16-mixed.*SAMMixin"):
        run.fit(module, loader(classification_data()))
    assert module.loss_calls == 0 and max_weight_difference(module.net, before) == 0.0


def test_an_exception_in_the_second_pass_leaves_no_perturbation():
    module = PlainClassifier()
    before = copy.deepcopy(module.net)
    original = module.training_step

    def fail_in_second_pass(batch, batch_idx):
        if module.passes and module.passes[-1] == "first":
            raise RuntimeError("boom in the second pass")
        return original(batch, batch_idx)

    module.training_step = fail_in_second_pass
    callback = NuSAM(rho=1.0)
    with pytest.raises(RuntimeError, match="boom"):
        trainer(max_steps=1, callbacks=[callback]).fit(module, loader(classification_data()))
    assert not callback.perturbation.is_perturbed
    assert max_weight_difference(module.net, before) < 1e-6


def test_lbfgs_and_several_optimizers_are_refused_at_fit_start():
    module = PlainClassifier()
    module.configure_optimizers = lambda: torch.optim.LBFGS(module.parameters())
    with pytest.raises(ValueError, match=r"LBFGS.*closure"):
        trainer(max_steps=1, callbacks=[NuSAM(rho=0.1)]).fit(module, loader(classification_data()))

    class TwoOptimizers(PlainClassifier):
        def configure_optimizers(self):
            return [torch.optim.SGD(self.net[:2].parameters(), lr=0.1),
                    torch.optim.SGD(self.net[2:].parameters(), lr=0.1)]

    with pytest.raises(Exception, match="optimizer"):
        trainer(max_steps=1, callbacks=[NuSAM(rho=0.1)]).fit(TwoOptimizers(), loader(classification_data()))


def test_manual_optimization_without_the_mixin_is_refused():
    class Manual(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False
            self.net = nn.Linear(6, 3)

        def training_step(self, batch, batch_idx):
            return None

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    with pytest.raises(ValueError, match="manual optimization without the mixin"):
        trainer(max_steps=1, callbacks=[NuSAM(rho=0.1)]).fit(Manual(), loader(classification_data()))


# optimizer_step overrides and Lightning's callbacks ------------------------------------------------
class WarmUpClosureFirst(PlainClassifier):
    """The manual warm-up pattern that runs the closure itself, then steps without one."""

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        optimizer_closure()
        for group in optimizer.param_groups:
            group["lr"] = self.lr * min(1.0, (self.trainer.global_step + 1) / 4)
        optimizer.step()


class WarmUpClosurePassed(PlainClassifier):
    """Lightning's documented pattern: the closure passed to optimizer.step."""

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        for group in optimizer.param_groups:
            group["lr"] = self.lr * min(1.0, (self.trainer.global_step + 1) / 4)
        optimizer.step(closure=optimizer_closure)


@pytest.mark.parametrize("accumulate", [1, 2])
def test_an_optimizer_step_override_that_runs_the_closure_itself_takes_the_same_step(accumulate):
    data = loader(classification_data())
    runs = {}
    for name, cls in (("closure-first", WarmUpClosureFirst), ("closure-passed", WarmUpClosurePassed)):
        module = cls()
        run = trainer(max_epochs=1, callbacks=[NuSAM(rho=0.3)], accumulate_grad_batches=accumulate)
        run.fit(module, data)
        runs[name] = module
    plain = WarmUpClosureFirst()
    trainer(max_epochs=1, accumulate_grad_batches=accumulate).fit(plain, data)
    assert max_weight_difference(runs["closure-first"].net, runs["closure-passed"].net) == 0.0
    assert max_weight_difference(runs["closure-first"].net, plain.net) > 1e-3  # it trained, perturbed
    assert runs["closure-first"].passes.count("second") == runs["closure-first"].passes.count("first") > 0


def test_an_optimizer_step_override_that_skips_the_step_ends_the_window():
    class SkipsOddSteps(PlainClassifier):
        def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
            if batch_idx % 2:
                optimizer_closure()  # computes, but does not step
            else:
                optimizer.step(closure=optimizer_closure)

    sam = NuSAM(rho=0.1)
    module = SkipsOddSteps()
    trainer(max_epochs=1, callbacks=[sam]).fit(module, loader(classification_data()))
    assert sam.perturbation.steps == 3 and not sam.engine.in_step  # each window its own


def other_callbacks(folder: Path) -> list:
    return [ModelCheckpoint(dirpath=folder, every_n_train_steps=2, save_top_k=-1),
            EarlyStopping(monitor="val/loss", patience=5), LearningRateMonitor(logging_interval="step"),
            GradientAccumulationScheduler({0: 1, 1: 2})]


@pytest.mark.parametrize("override", ["closure-first", "closure-passed", "none"])
def test_rho_zero_is_a_no_op_with_lightnings_callbacks_and_optimizer_step_overrides(tmp_path, override):
    cls = {"closure-first": WarmUpClosureFirst, "closure-passed": WarmUpClosurePassed,
           "none": PlainClassifier}[override]
    weights = []
    for callbacks in ([], [NuSAM(rho=0.0)]):
        L.seed_everything(5)
        module = cls(net=make_net(dropout=0.2))
        run = trainer(max_epochs=2, callbacks=[*callbacks, *other_callbacks(tmp_path / str(len(callbacks)))],
                      logger=L.pytorch.loggers.CSVLogger(tmp_path), enable_checkpointing=True)
        data = loader(classification_data())
        run.fit(module, data, val_dataloaders=data)
        weights.append(module.net)
    assert max_weight_difference(*weights) == 0.0


def test_a_failed_fit_leaves_no_hook_on_a_reused_optimizer():
    class Cached(PlainClassifier):
        def configure_optimizers(self):
            if not hasattr(self, "cached"):
                self.cached = torch.optim.SGD(self.parameters(), lr=0.05)
            return self.cached

    module, sam = Cached(), NuSAM(rho=0.1)
    original = module.training_step

    def fails_once(batch, batch_idx):
        if not getattr(module, "failed", False):
            module.failed = True
            raise RuntimeError("boom")
        return original(batch, batch_idx)

    module.training_step = fails_once
    with pytest.raises(RuntimeError, match="boom"):
        trainer(max_steps=1, callbacks=[sam]).fit(module, loader(classification_data()))
    module.passes.clear()
    trainer(max_steps=2, callbacks=[sam]).fit(module, loader(classification_data()))
    assert module.passes == ["first", "second"] * 2


class LogsTheBatchIndex(PlainClassifier):
    def training_step(self, batch, batch_idx):
        if sam_pass(self) != "second":
            self.log("index", float(batch_idx), on_step=False, on_epoch=True)
        return super().training_step(batch, batch_idx)


@pytest.mark.parametrize("options", [{"accumulate_grad_batches": 2}, {}], ids=["accumulate", "every-2"])
def test_self_log_in_the_passes_the_callback_runs_is_one_series(options):
    sam = NuSAM(rho=0.1) if options else NuSAM(rho=0.1, every_n_steps=2)
    run = trainer(max_epochs=1, callbacks=[sam], **options)
    run.fit(LogsTheBatchIndex(), loader(classification_data()))  # 6 batches: the mean index is 2.5
    assert float(run.callback_metrics["index"]) == pytest.approx(2.5)


def test_a_sam_optimizer_under_the_callback_is_refused():
    from lightning_nusam.optim import SAMOptimizer

    class Both(PlainClassifier):
        def configure_optimizers(self):
            return SAMOptimizer(NuclearPerturbation(self.net), torch.optim.SGD(self.parameters(), lr=0.1))

    with pytest.raises(ValueError, match="SAMOptimizer"):
        trainer(max_steps=1, callbacks=[NuSAM(rho=0.1)]).fit(Both(), loader(classification_data()))


# accumulation windows ------------------------------------------------------------------------------
def test_dropin_follows_a_gradient_accumulation_schedule():
    from lightning.pytorch.callbacks import GradientAccumulationScheduler

    module = PlainClassifier()
    run = trainer(max_epochs=2, callbacks=[NuSAM(rho=0.3), GradientAccumulationScheduler({0: 1, 1: 3})])
    run.fit(module, loader(classification_data(n=48), 4))  # 12 micro-batches per epoch
    assert run.global_step == 12 + 4
    assert module.loss_calls == 2 * 24


def test_the_losses_it_reports_with_accumulation_are_the_windows_as_the_mixin_reports_them():
    """With accumulation Lightning runs the first passes of a window's earlier micro-batches itself:
    the drop-in keeps their losses, so the step's clean loss (and its sharpness) is the mean over
    the window, as the mixin, which runs every pass, reports it."""
    data = classification_data(n=48)
    dropin = PlainClassifier()
    run = trainer(callbacks=[NuSAM(rho=0.3)], accumulate_grad_batches=3)
    run.fit(dropin, loader(data, 4))
    mixin = Classifier(accumulate_grad_batches=3)
    reference = trainer(callbacks=[NuSAM(rho=0.3)])
    reference.fit(mixin, loader(data, 4))
    assert run.global_step == reference.global_step == 4
    for key in ("sam/sharpness_step", "sam/sharpness_epoch", "sam/loss_perturbed_epoch"):
        assert torch.allclose(run.callback_metrics[key], reference.callback_metrics[key]), key
