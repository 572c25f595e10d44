"""The callback (lightning_nusam.lightning.callback and .presets): the options each method takes,
as written in its signature, checked where they are defined; the checks at the start of a fit;
the schedule's start and its anchors; the checkpoint state and an exact resume; what it logs.
(How the drop-in drives a step: test_dropin.py; the mixin: test_mixin.py; what every way in
shares: test_ways_in.py.)"""

from __future__ import annotations

import copy
import inspect

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn

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
from lightning_nusam import SAM, SAMON, NuSAM, NuSAMNorm, SharpnessAwareCallback
from lightning_nusam.lightning.presets import PRESETS
from lightning_nusam.step_options import StepOptions


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_a_preset_signature_is_its_perturbation_options_then_the_common_ones(name: str) -> None:
    """Spelled out by hand in presets.py: the same names, kinds and defaults as the perturbation
    class (``model`` left out), then the keyword-only options of SharpnessAwareCallback, so an
    option added to a perturbation class without its preset fails here."""
    preset = PRESETS[name]
    method = [p for p in inspect.signature(preset.perturbation_class).parameters.values()
              if p.name != "model"]
    common = [p for p in inspect.signature(SharpnessAwareCallback.__init__).parameters.values()
              if p.kind is inspect.Parameter.KEYWORD_ONLY]
    shown = list(inspect.signature(preset).parameters.values())
    assert [(p.name, p.default) for p in shown] == [(p.name, p.default) for p in method + common]
    assert [p.kind for p in shown[:len(method)]] == [p.kind for p in method]
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in shown[len(method):])
    assert "Args:" in preset.__init__.__doc__ and "start_fraction" in preset.__init__.__doc__


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_a_preset_passes_every_option_to_its_perturbation_and_its_step(name: str) -> None:
    preset = PRESETS[name]
    callback = preset(rho=0.3, batchnorm_update="both", resync_every=7)
    assert callback.rho == 0.3 and callback.perturbation_options["rho"] == 0.3
    assert callback.step_options == StepOptions(batchnorm_update="both", resync_every=7)
    with pytest.raises(TypeError, match="unexpected keyword"):
        preset(rhoo=0.1)


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [({"rho": -1.0}, "rho"), ({"start_epoch": -1}, "start_epoch"),
     ({"start_fraction": 1.5}, "start_fraction"),
     ({"power_iterations": 0}, "power_iterations"), ({"batchnorm_update": "never"}, "batchnorm_update"),
     ({"resync_every": -2}, "resync_every")],
)
def test_bad_callback_arguments(kwargs, argument):
    with pytest.raises(ValueError, match=f"`{argument}`"):
        NuSAM(**{"rho": 0.1, **kwargs})
    with pytest.raises(ValueError, match="either"):
        SAM(rho=0.1, start_epoch=1, start_fraction=0.1)


# the checks at the start of a fit -----------------------------------------------------------------
def fit(module, callbacks, **kwargs):
    trainer(max_steps=1, callbacks=callbacks, **kwargs).fit(module, loader(classification_data()))


def test_two_sharpness_aware_callbacks():
    with pytest.raises(ValueError, match="more than one sharpness-aware callback"):
        fit(Classifier(), [NuSAM(rho=0.1), SAM(rho=0.1)])


def test_nothing_to_perturb_fails_before_the_first_step():
    module = Classifier(net=nn.Sequential(nn.Flatten(), nn.LayerNorm(6)))
    with pytest.raises(ValueError, match="no parameters to perturb"):
        fit(module, [NuSAM(rho=0.1)])
    with pytest.raises(ValueError, match="normalisation"):
        fit(Classifier(net=nn.Sequential(nn.Linear(6, 3))), [SAMON(rho=0.1)])


def test_schedules_that_need_the_number_of_steps_refuse_an_unknown_one():
    with pytest.raises(ValueError, match="rho_schedule"):
        cosine = NuSAM(rho=0.1, rho_schedule="cosine")
        run = trainer(max_epochs=-1, max_time={"seconds": 5}, callbacks=[cosine])
        run.fit(PlainClassifier(), loader(classification_data()))


def test_resuming_with_another_selection_names_the_checkpoint_and_the_change(tmp_path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer(max_steps=2, callbacks=[NuSAM(rho=0.1), checkpoint], enable_checkpointing=True).fit(
        PlainClassifier(), loader(classification_data()))
    path = str(tmp_path / "last.ckpt")
    with pytest.raises(ValueError, match=r"(?s)last\.ckpt.*net\.6\.weight.*include"):
        trainer(max_steps=4, callbacks=[NuSAM(rho=0.1, exclude="net.6.*")]).fit(
            PlainClassifier(), loader(classification_data()), ckpt_path=path)


def test_no_optimizer_mode_is_left_alone_with_a_warning():
    class NoOptimizer(PlainClassifier):
        def configure_optimizers(self):
            return None

    module = NoOptimizer()
    before = copy.deepcopy(module.net)
    with pytest.warns(UserWarning, match="no optimizer"):
        trainer(max_steps=2, callbacks=[NuSAM(rho=0.1)]).fit(module, loader(classification_data()))
    assert max_weight_difference(module.net, before) == 0.0


# the schedule's start ------------------------------------------------------------------------------
@pytest.mark.parametrize("way", ["drop-in", "mixin"])
def test_start_epoch_gives_plain_steps_before_and_two_passes_after(way):
    module = PlainClassifier() if way == "drop-in" else Classifier()
    fit = trainer(max_epochs=3, callbacks=[NuSAM(rho=0.1, start_epoch=2)])
    fit.fit(module, loader(classification_data()))
    assert fit.global_step == 18
    assert module.loss_calls == 6 + 6 + 12
    if way == "drop-in":
        assert module.passes == [None] * 12 + ["first", "second"] * 6
    assert fit.callback_metrics["sam/active_step"] == 1.0


def test_start_fraction_counts_planned_steps():
    module = Classifier()
    callback = SAM(rho=0.1, start_fraction=0.5)
    fit = trainer(max_steps=10, max_epochs=-1, callbacks=[callback])
    fit.fit(module, loader(classification_data()))
    assert fit.global_step == 10
    assert module.loss_calls == 5 + 2 * 5


def test_warns_when_the_start_is_never_reached():
    with pytest.warns(UserWarning, match="never"):
        trainer(max_epochs=1, callbacks=[NuSAM(rho=0.1, start_epoch=3)]).fit(
            Classifier(), loader(classification_data()))


# the checkpoint state and resuming ---------------------------------------------------------------
class AssertNeverPerturbedOnSave(Callback):
    def __init__(self, sam):
        self.sam, self.saves = sam, 0

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        assert not self.sam.perturbation.is_perturbed
        for name, value in pl_module.state_dict().items():
            assert torch.equal(checkpoint["state_dict"][name], value)
        self.saves += 1


@pytest.mark.parametrize("module_class", [Classifier, PlainClassifier], ids=["mixin", "dropin"])
def test_checkpoints_never_hold_perturbed_weights(tmp_path, module_class):
    sam = NuSAM(rho=1.0)
    guard = AssertNeverPerturbedOnSave(sam)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_top_k=-1)
    trainer(max_steps=4, callbacks=[sam, guard, checkpoint], enable_checkpointing=True).fit(
        module_class(), loader(classification_data()))
    assert guard.saves == 4
    state = torch.load(tmp_path / "epoch=0-step=4.ckpt", weights_only=False)
    callback_state = next(v for k, v in state["callbacks"].items() if k.startswith("NuSAM"))
    assert callback_state["perturbation"]["steps"] == 4
    assert set(callback_state["perturbation"]["u"]) == set(sam.perturbation.parameter_names)


@pytest.mark.parametrize("module_class", [Classifier, PlainClassifier], ids=["mixin", "dropin"])
@pytest.mark.parametrize("resume_step", [3, 9])
def test_resume_mid_epoch_is_bit_identical_to_an_uninterrupted_run(tmp_path, resume_step, module_class):
    sam = NuSAM(rho=0.2, start_fraction=0.1)
    uninterrupted = resumable_fit(module_class, sam, tmp_path / "a", save_every=3)
    ckpt = tmp_path / "a" / f"epoch={(resume_step - 1) // 6}-step={resume_step}.ckpt"
    torch.manual_seed(1234)  # whatever the process did before must not matter
    resumed_sam = NuSAM(rho=0.2, start_fraction=0.1)
    resumed = resumable_fit(module_class, resumed_sam, tmp_path / "b", ckpt_path=str(ckpt))
    assert resumed.global_step == uninterrupted.global_step == 12
    assert same_weights(uninterrupted, resumed)
    assert resumed_sam.perturbation.steps == sam.perturbation.steps
    for name, (u, _) in sam.perturbation.singular_vectors().items():
        assert torch.equal(u, resumed_sam.perturbation.singular_vectors()[name][0])


def scheduled_nusam() -> NuSAM:
    return NuSAM(rho=0.3, rho_schedule="linear", rho_final=0.05, every_n_steps=2, start_fraction=0.2)


def test_resume_in_the_middle_of_a_schedule_is_bit_identical(tmp_path):
    sam = scheduled_nusam()
    uninterrupted = resumable_fit(PlainClassifier, sam, tmp_path / "a", save_every=5, data_seed=2)
    torch.manual_seed(99)
    resumed_sam = scheduled_nusam()
    resumed = resumable_fit(PlainClassifier, resumed_sam, tmp_path / "b", data_seed=2,
                            ckpt_path=str(tmp_path / "a" / "epoch=0-step=5.ckpt"))
    assert resumed.global_step == 12 and same_weights(uninterrupted, resumed)
    assert resumed_sam.perturbation.steps == sam.perturbation.steps


def test_lightning_cli_optimizer_and_scheduler_sections_are_stepped(tmp_path, monkeypatch):
    from lightning.pytorch.cli import LightningCLI

    monkeypatch.setattr("sys.argv", ["nusam"])

    class CLIClassifier(Classifier):
        def __init__(self):
            super().__init__()

    class Data(L.LightningDataModule):
        def train_dataloader(self):
            return loader(classification_data())

    cli = LightningCLI(
        CLIClassifier, Data, run=False, save_config_callback=None,
        args=["--trainer.max_epochs=2", "--trainer.logger=false", "--trainer.enable_progress_bar=false",
              "--trainer.enable_checkpointing=false", "--trainer.callbacks=lightning_nusam.NuSAM",
              "--trainer.callbacks.rho=0.1", "--optimizer=torch.optim.SGD", "--optimizer.lr=0.1",
              "--lr_scheduler=torch.optim.lr_scheduler.StepLR", "--lr_scheduler.step_size=1",
              "--lr_scheduler.gamma=0.1", f"--trainer.default_root_dir={tmp_path}"],
    )
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 12
    assert cli.trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.1 * 0.1**2)
    assert cli.model.loss_calls == 24
    assert copy.deepcopy(cli.trainer.callbacks[0]).rho == 0.1


# what the callback logs ------------------------------------------------------------------------------
class SkipsEverything(PlainClassifier):
    def training_step(self, batch, batch_idx):
        return None


def test_a_window_without_any_loss_is_logged_as_not_perturbed():
    sam = NuSAM(rho=0.4)
    run = trainer(max_steps=2, callbacks=[sam], accumulate_grad_batches=2)
    run.fit(SkipsEverything(), loader(classification_data()))
    assert sam.perturbation.steps == 0
    assert run.callback_metrics["sam/active_step"] == 0.0 and run.callback_metrics["sam/rho_step"] == 0.0


@pytest.mark.parametrize("callback_cls", [NuSAM, NuSAMNorm, SAM, SAMON])
def test_every_callback_trains_and_logs(callback_cls):
    module = Classifier()
    fit = trainer(max_steps=3, callbacks=[callback_cls(rho=0.05)])
    fit.fit(module, loader(classification_data()))
    for key in ("train/loss_step", "sam/loss_perturbed_step", "sam/sharpness_step", "sam/active_step",
                "sam/rho_step", "sam/skipped_steps_step", "train/accuracy_step"):
        assert key in fit.callback_metrics, key
