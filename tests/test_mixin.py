"""SAMMixin (lightning_nusam.lightning.mixin and .lr_schedulers): what only the mixin does.

compute_loss and its dict of extras, the mixin's own clipping (also with a hook overridden
without super()), its accumulation, precision="16-mixed", its manual stepping of LR schedulers
(ReduceLROnPlateau included), and what it refuses. (What every way in shares, the mixin among
them, is in test_ways_in.py.)
"""

import copy
import warnings

import lightning as L
import pytest
import torch
import torchmetrics
from lightning.pytorch.plugins import MixedPrecision
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from helpers import (
    Classifier,
    PlainClassifier,
    classification_data,
    loader,
    max_weight_difference,
    reference_loop,
    trainer,
    windows,
)
from lightning_nusam import SAM, NuSAM, SAMMixin


def fit(module, callbacks, **kwargs):
    trainer(max_steps=1, callbacks=callbacks, **kwargs).fit(module, loader(classification_data()))


# the step -------------------------------------------------------------------------------------------
def test_without_a_callback_the_mixins_step_is_a_plain_step_of_the_reference_loop():
    """(With a callback: test_ways_in.py's two-pass test [mixin].)"""
    dataset = classification_data()
    module = Classifier()
    reference = reference_loop(copy.deepcopy(module.net), None, windows(dataset))
    trainer().fit(module, loader(dataset))
    assert module.global_step == 6 and module.loss_calls == 6
    assert max_weight_difference(module.net, reference) == 0.0


@pytest.mark.parametrize(("interval", "frequency", "expected_steps"), [("step", 2, 3), ("epoch", 1, 2)])
def test_lr_scheduler_and_global_step_advance_once_per_step(interval, frequency, expected_steps):
    module = Classifier(scheduler={"interval": interval, "frequency": frequency})
    fit = trainer(max_epochs=2 if interval == "epoch" else 1, callbacks=[NuSAM(rho=0.1)],
                  limit_train_batches=6)
    fit.fit(module, loader(classification_data()))
    assert fit.global_step == 6 * (2 if interval == "epoch" else 1)
    scheduler = fit.lr_scheduler_configs[0].scheduler
    assert scheduler.last_epoch == expected_steps
    assert fit.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.05 * 0.5**expected_steps)


def test_clipping_happens_on_unscaled_second_pass_gradients():
    dataset = classification_data()
    module = Classifier(lr=1.0, gradient_clip_val=1e-3)
    before = copy.deepcopy(module.net)

    def plain_sgd():
        return torch.optim.SGD(module.parameters(), lr=1.0)

    module.configure_optimizers = plain_sgd
    fit = trainer(max_steps=1, callbacks=[SAM(rho=0.05)],
                  plugins=[MixedPrecision("16-mixed", "cpu")])
    fit.fit(module, loader(dataset))
    step = torch.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(module.net.parameters(),
                                                               before.parameters(), strict=True)))
    # the update is lr × the clipped gradient: its norm is the clip value (not clip/scale)
    assert step.item() == pytest.approx(1e-3, rel=1e-3)


def test_fp16_inf_in_first_pass_skips_the_perturbation_cleanly():
    module = Classifier()
    module.inject_inf_at_step = 2
    callback = NuSAM(rho=0.1)
    fit = trainer(max_steps=5, callbacks=[callback], plugins=[MixedPrecision("16-mixed", "cpu")])
    fit.fit(module, loader(classification_data()))
    assert fit.global_step == 5
    assert callback.perturbation.skipped_steps == 1
    assert all(torch.isfinite(p).all() for p in module.parameters())
    assert all(torch.isfinite(u).all() and torch.isfinite(v).all()
               for u, v in callback.perturbation.singular_vectors().values())


def test_bf16_mixed_trains():
    module = Classifier(optimizer="adamw", lr=1e-2)
    dataset = classification_data(n=96)
    fit = trainer(max_epochs=4, precision="bf16-mixed", callbacks=[NuSAM(rho=0.05)])
    fit.fit(module, loader(dataset))
    assert fit.callback_metrics["train/loss_epoch"] < 0.9  # ln(3) = 1.10 at chance
    assert fit.callback_metrics["sam/active_epoch"] == 1.0
    assert torch.isfinite(fit.callback_metrics["sam/sharpness_epoch"])


def test_exception_in_second_pass_leaves_weights_unperturbed():
    module = Classifier()
    before = copy.deepcopy(module.net)
    original = module.compute_loss

    def first_then_fail(batch, batch_idx):
        if module.loss_calls == 0:
            return original(batch, batch_idx)
        raise RuntimeError("boom in the second pass")

    module.compute_loss = first_then_fail
    callback = NuSAM(rho=1.0)
    with pytest.raises(RuntimeError, match="boom"):
        trainer(max_steps=1, callbacks=[callback]).fit(module, loader(classification_data()))
    assert not callback.perturbation.is_perturbed
    assert max_weight_difference(module.net, before) < 1e-6


def test_16_mixed_works_through_the_mixin():
    run = trainer(max_steps=3, callbacks=[NuSAM(rho=0.1)], plugins=[MixedPrecision("16-mixed", "cpu")])
    run.fit(Classifier(), loader(classification_data()))
    assert run.global_step == 3 and run.callback_metrics["sam/active_step"] == 1.0


def test_16_mixed_with_accumulation_through_the_mixin():
    module = Classifier(accumulate_grad_batches=2, gradient_clip_val=1.0)
    run = trainer(max_steps=3, callbacks=[NuSAM(rho=0.1)], plugins=[MixedPrecision("16-mixed", "cpu")])
    run.fit(module, loader(classification_data(), 4))
    assert run.global_step == 3 and module.loss_calls == 3 * 2 * 2
    assert all(torch.isfinite(p).all() for p in module.parameters())


# compute_loss, hooks overridden without super() ----------------------------------------------------
class MixinWithMetrics(Classifier):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.seen = torchmetrics.SumMetric()

    def compute_loss(self, batch, batch_idx):
        self.seen.update(torch.tensor(float(len(batch[1]))))
        return super().compute_loss(batch, batch_idx)


def test_a_metric_updated_in_compute_loss_counts_each_sample_once():
    module = MixinWithMetrics(accumulate_grad_batches=2)
    trainer(max_epochs=1, callbacks=[SAM(rho=0.5)]).fit(module, loader(classification_data(n=64)))
    assert float(module.seen.compute()) == 64.0


@pytest.mark.parametrize("callbacks", [[], [NuSAM(rho=0.0)]], ids=["no-callback", "nusam"])
def test_the_mixin_keeps_its_window_through_a_validation_in_the_middle_of_an_epoch(callbacks):
    nets = []
    for interval in (1.0, 1):  # validation at the end of the epoch, or after every batch
        torch.manual_seed(0)
        module = Classifier(accumulate_grad_batches=2)
        data = loader(classification_data())
        trainer(max_epochs=1, limit_train_batches=4, val_check_interval=interval,
                callbacks=[copy.deepcopy(cb) for cb in callbacks]).fit(module, data, val_dataloaders=data)
        nets.append(module.net)
    assert max_weight_difference(*nets) == 0.0


def test_the_mixin_after_the_module_in_the_bases_is_refused_when_the_class_is_defined():
    with pytest.raises(TypeError, match=r"SAMMixin.*before.*PlainClassifier"):
        class Wrong(PlainClassifier, SAMMixin):
            pass


def test_epoch_schedulers_of_a_mixin_step_without_super_in_on_train_epoch_end():
    class OwnEpochEnd(Classifier):
        def on_train_epoch_end(self):
            self.ended = getattr(self, "ended", 0) + 1  # no super() call

    module = OwnEpochEnd(scheduler={"interval": "epoch", "frequency": 1})
    run = trainer(max_epochs=2, callbacks=[NuSAM(rho=0.1)])
    run.fit(module, loader(classification_data()))
    assert module.ended == 2
    assert run.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.05 * 0.5**2)


def test_clipping_of_a_mixin_that_overrides_on_before_optimizer_step_without_super():
    class OwnHook(Classifier):
        def on_before_optimizer_step(self, optimizer):
            self.hooked = True

    module = OwnHook(lr=1.0, gradient_clip_val=1e-3)
    module.configure_optimizers = lambda: torch.optim.SGD(module.parameters(), lr=1.0)
    before = copy.deepcopy(module.net)
    trainer(max_steps=1, callbacks=[SAM(rho=0.05)]).fit(module, loader(classification_data()))
    step = torch.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(module.net.parameters(), before.parameters(),
                                                               strict=True)))
    assert module.hooked and step.item() == pytest.approx(1e-3, rel=1e-3)


# what the mixin refuses ----------------------------------------------------------------------------
def test_callback_with_automatic_optimization():
    module = Classifier()
    module.automatic_optimization = True
    with pytest.raises(ValueError, match="manual optimization"):
        fit(module, [NuSAM(rho=0.1)])


def test_gradient_accumulation_is_rejected():
    with pytest.raises((ValueError, MisconfigurationException), match="accumulat"):
        fit(Classifier(), [NuSAM(rho=0.1)], accumulate_grad_batches=2)


def test_trainer_gradient_clipping_is_rejected_in_favour_of_the_mixin_option():
    with pytest.raises(MisconfigurationException, match="gradient_clip_val"):
        fit(Classifier(), [NuSAM(rho=0.1)], gradient_clip_val=1.0)
    with pytest.raises(ValueError, match="`gradient_clip_val`"):
        Classifier(gradient_clip_val=-1.0)
    with pytest.raises(ValueError, match="`gradient_clip_algorithm`"):
        Classifier(gradient_clip_algorithm="max")


def test_module_without_compute_loss():
    class Incomplete(SAMMixin, L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(6, 3)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    with pytest.raises(NotImplementedError, match="compute_loss"):
        fit(Incomplete(), [NuSAM(rho=0.1)])


def test_mixin_with_its_own_training_step_is_refused_at_construction():
    class Overrides(SAMMixin, L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(6, 3)

        def training_step(self, batch, batch_idx):
            return self.layer(batch[0]).sum()

    with pytest.raises(TypeError, match="compute_loss"):
        Overrides()


# ReduceLROnPlateau, stepped by the mixin ----------------------------------------------------------
class PlateauClassifier(Classifier):
    def __init__(self, interval: str = "epoch"):
        super().__init__(lr=0.1)
        self.interval = interval

    def validation_step(self, batch, batch_idx):
        self.log("val/flat", torch.tensor(1.0))  # never improves

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=self.lr)
        plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.5, patience=0)
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": plateau, "monitor": "val/flat", "interval": self.interval}}


@pytest.mark.parametrize("callbacks", [[], [NuSAM(rho=0.1)]], ids=["no-callback", "nusam"])
def test_reduce_lr_on_plateau_is_stepped_with_its_monitored_metric_after_validation(callbacks):
    module = PlateauClassifier()
    data = loader(classification_data())
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")  # Lightning's "monitor will be ignored" must not appear
        run = trainer(max_epochs=4, callbacks=callbacks)
        run.fit(module, data, val_dataloaders=data)
    assert not any("will be ignored" in str(w.message) for w in record)
    # epoch 0 sets the best value; each later epoch is a plateau: 3 halvings
    assert run.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**3)


def test_reduce_lr_on_plateau_without_a_monitor_is_a_clear_error():
    class NoMonitor(PlateauClassifier):
        def configure_optimizers(self):
            optimizer = torch.optim.SGD(self.parameters(), lr=self.lr)
            return {"optimizer": optimizer,
                    "lr_scheduler": torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer)}

    data = loader(classification_data())
    with pytest.raises(ValueError, match="monitor"):
        trainer(max_epochs=1).fit(NoMonitor(), data, val_dataloaders=data)


def test_lbfgs_is_refused_on_the_mixin_too():
    module = Classifier()
    module.configure_optimizers = lambda: torch.optim.LBFGS(module.parameters())
    with pytest.raises(ValueError, match="closure"):
        trainer(max_steps=1, callbacks=[NuSAM(rho=0.1)]).fit(module, loader(classification_data()))


def test_sam_pass_tells_compute_loss_which_pass_runs():
    class Passes(Classifier):
        def compute_loss(self, batch, batch_idx):
            self.seen.append(self.sam_pass)
            return super().compute_loss(batch, batch_idx)

    module = Passes()
    module.seen = []
    trainer(max_epochs=2, limit_train_batches=2, callbacks=[NuSAM(rho=0.1, start_epoch=1)]).fit(
        module, loader(classification_data()))
    assert module.seen == [None, None, "first", "second", "first", "second"]
    assert module.sam_pass is None  # between steps
