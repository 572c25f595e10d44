import copy

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from helpers import (
    Classifier,
    PlainClassifier,
    classification_data,
    loader,
    resumable_fit,
    same_weights,
    trainer,
)
from lightning_nusam import SAM, SAMON, NuSAM, SAMMixin


def fit(module, callbacks, **kwargs):
    trainer(max_steps=1, callbacks=callbacks, **kwargs).fit(module, loader(classification_data()))


def test_callback_with_automatic_optimization():
    module = Classifier()
    module.automatic_optimization = True
    with pytest.raises(ValueError, match="manual optimization"):
        fit(module, [NuSAM(rho=0.1)])


def test_two_sharpness_aware_callbacks():
    with pytest.raises(ValueError, match="more than one sharpness-aware callback"):
        fit(Classifier(), [NuSAM(rho=0.1), SAM(rho=0.1)])


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


def test_nothing_to_perturb_fails_before_the_first_step():
    module = Classifier(net=nn.Sequential(nn.Flatten(), nn.LayerNorm(6)))
    with pytest.raises(ValueError, match="no parameters to perturb"):
        fit(module, [NuSAM(rho=0.1)])
    with pytest.raises(ValueError, match="normalisation"):
        fit(Classifier(net=nn.Sequential(nn.Linear(6, 3))), [SAMON(rho=0.1)])


def test_module_without_compute_loss():
    class Incomplete(SAMMixin, L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(6, 3)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    with pytest.raises(NotImplementedError, match="compute_loss"):
        fit(Incomplete(), [NuSAM(rho=0.1)])


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
