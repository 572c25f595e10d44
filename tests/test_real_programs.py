"""The programs Lightning users write around their module, with a sharpness-aware callback added.

Fine-tuning callbacks that unfreeze layers, torchmetrics updated in ``training_step``,
``optimizer_step`` overrides, SWA, skipped batches, the Tuner, an LR warm-up under
``rho_schedule="lr"``, checkpoints written in the middle of a step, and misuse of the core. Each
case is checked against an independent replay, and with ``rho=0`` against the run without the
callback. (Random draws in the step, and rho=0 with accumulation, clipping, BatchNorm, dropout
and skips on every way in: ``test_ways_in.py``.)
"""

from __future__ import annotations

import os
import signal
import stat
from pathlib import Path

import lightning as L
import pytest
import torch
import torchmetrics
from lightning.pytorch.callbacks import (
    BackboneFinetuning,
    BaseFinetuning,
    Callback,
    StochasticWeightAveraging,
)
from lightning.pytorch.tuner import Tuner
from torch import nn

from helpers import (
    Classifier,
    PlainClassifier,
    classification_data,
    loader,
    make_net,
    max_weight_difference,
    micro_batches,
    reference_loop,
    trainer,
)
from lightning_nusam import SAM, SAMON, GaussSAM, NuSAM, NuSAMNorm, sam_pass
from lightning_nusam.perturbations import GaussianPerturbation, L2Perturbation, NuclearPerturbation

CALLBACKS = {
    "NuSAM": NuSAM, "NuSAMNorm": NuSAMNorm, "SAM": SAM, "SAMON": SAMON, "GaussSAM": GaussSAM,
    "ASAM": lambda **kw: SAM(adaptive=True, **kw),
    "NuSAM-one-pass": lambda **kw: NuSAM(one_pass=True, **kw),
    "GaussSAM-one-pass": lambda **kw: GaussSAM(one_pass=True, **kw),
}


Records = list[tuple[str | None, dict[str, torch.Tensor]]]


def epsilon_per_step(records: Records) -> list[dict[str, torch.Tensor]]:
    """From (pass, weights) recorded at every training_step call: ε = second − first per step."""
    epsilons, first = [], None
    for name, weights in records:
        if name == "first":
            first = weights
        elif name == "second":
            epsilons.append({k: weights[k] - first[k] for k in weights})
        else:
            epsilons.append({k: torch.zeros_like(v) for k, v in weights.items()})
    return epsilons


# 1. layers that become trainable during fit -------------------------------------------------------
class FineTuned(L.LightningModule):
    """A backbone and a head; records the weights every training_step sees."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh())
        self.head = nn.Linear(16, 3)
        self.records: Records = []

    def training_step(self, batch, batch_idx):
        self.records.append((sam_pass(self), {n: p.detach().clone() for n, p in self.named_parameters()}))
        inputs, labels = batch
        return nn.functional.cross_entropy(self.head(self.backbone(inputs)), labels)

    def configure_optimizers(self):
        return torch.optim.SGD(filter(lambda p: p.requires_grad, self.parameters()), lr=0.05)


@pytest.mark.parametrize("method", ["NuSAM", "SAM"])
def test_layers_unfrozen_during_fit_are_perturbed_from_then_on(method):
    module, sam = FineTuned(), CALLBACKS[method](rho=0.2)
    run = trainer(max_epochs=2, callbacks=[BackboneFinetuning(unfreeze_backbone_at_epoch=1), sam])
    run.fit(module, loader(classification_data()))  # 6 steps per epoch
    epsilons = epsilon_per_step(module.records)
    assert len(epsilons) == 12
    backbone = ["backbone.0.weight", "backbone.2.weight"]
    for step, epsilon in enumerate(epsilons):
        frozen = step < 6
        assert epsilon["head.weight"].abs().max() > 0, step
        for name in backbone:
            assert (epsilon[name].abs().max() == 0) == frozen, (step, name)
            if method == "NuSAM" and not frozen:  # a rank-one step of nuclear norm ρ
                nuclear = float(torch.linalg.matrix_norm(epsilon[name], ord="nuc"))
                assert nuclear == pytest.approx(0.2, rel=1e-4)
    if method == "NuSAM":  # the frozen backbone cost its u and v, nothing more
        assert sam.perturbation.held_numel() == (16 + 6) + (16 + 16) + (3 + 16)


class FreezeAllUnfreezeLater(BaseFinetuning):
    """Everything frozen at the start of fit; the head is unfrozen at epoch 0, the rest at 1."""

    def freeze_before_training(self, pl_module):
        self.freeze(pl_module)

    def finetune_function(self, pl_module, epoch, optimizer):
        if epoch == 0:
            self.make_trainable(pl_module.head)
        if epoch == 1:
            self.make_trainable(pl_module.backbone)


class OptimizesEverything(FineTuned):
    def configure_optimizers(self):  # frozen parameters have no gradient: SGD leaves them alone
        return torch.optim.SGD(self.parameters(), lr=0.05)


def test_a_model_frozen_entirely_at_setup_trains_and_is_perturbed_once_unfrozen():
    module = OptimizesEverything()
    run = trainer(max_epochs=2, callbacks=[FreezeAllUnfreezeLater(), NuSAM(rho=0.2)])
    run.fit(module, loader(classification_data()))
    epsilons = epsilon_per_step(module.records)
    assert all(e["head.weight"].abs().max() > 0 for e in epsilons)
    assert [bool(e["backbone.0.weight"].abs().max() > 0) for e in epsilons] == [False] * 6 + [True] * 6


# 2. torchmetrics updated in training_step --------------------------------------------------------
class WithMetrics(PlainClassifier):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.seen = torchmetrics.SumMetric()
        self.accuracy = torchmetrics.classification.MulticlassAccuracy(num_classes=3, average="micro")
        self.first_pass_correct, self.first_pass_count = 0, 0

    def training_step(self, batch, batch_idx):
        inputs, labels = batch
        logits = self.net(inputs)
        self.seen.update(torch.tensor(float(len(labels))))
        self.accuracy(logits, labels)
        if sam_pass(self) != "second":  # the independent count: the clean pass at w
            self.first_pass_correct += int((logits.argmax(1) == labels).sum())
            self.first_pass_count += len(labels)
        self.log("train/acc", self.accuracy, on_step=False, on_epoch=True)
        return nn.functional.cross_entropy(logits, labels)


@pytest.mark.parametrize("accumulate", [1, 2])
def test_a_metric_updated_in_training_step_counts_each_sample_once_from_the_first_pass(accumulate):
    module = WithMetrics(lr=0.5)
    run = trainer(max_epochs=1, callbacks=[NuSAM(rho=0.5)], accumulate_grad_batches=accumulate)
    run.fit(module, loader(classification_data(n=64)))
    assert float(module.seen.compute()) == 64.0
    expected = module.first_pass_correct / module.first_pass_count
    assert module.first_pass_count == 64
    assert float(run.callback_metrics["train/acc"]) == pytest.approx(expected, abs=1e-6)


# 4. optimizer_step overrides -------------------------------------------------------------------------


# 5. SWA on a BatchNorm model ---------------------------------------------------------------------------
def swa_fit(callbacks):
    torch.manual_seed(0)
    module = PlainClassifier(net=make_net(batchnorm=True))
    swa = StochasticWeightAveraging(swa_lrs=0.02, swa_epoch_start=1)
    run = trainer(max_epochs=3, callbacks=[*callbacks, swa])
    run.fit(module, loader(classification_data()))
    return module


def test_swa_batchnorm_update_epoch_runs_only_lightnings_pass_and_rho_zero_is_a_no_op():
    plain = swa_fit([])
    sam = NuSAM(rho=0.5)
    perturbed = swa_fit([sam])
    # epoch 3 is SWA's BatchNorm update: Lightning runs one forward per batch and no backward,
    # and the callback adds nothing to it (epochs 0-2 perturb every step: 18 steps)
    assert perturbed.passes[-6:] == [None] * 6
    assert perturbed.passes[:-6] == ["first", "second"] * 18 and sam.perturbation.steps == 18
    assert perturbed.net[1].momentum is not None  # SWA put the BatchNorm momentum back
    zero = swa_fit([NuSAM(rho=0.0)])
    assert max_weight_difference(zero.net, plain.net) == 0.0
    assert torch.equal(zero.net[1].running_mean, plain.net[1].running_mean)
    assert torch.equal(zero.net[1].running_var, plain.net[1].running_var)


# 6. a skipped micro-batch in an accumulation window -----------------------------------------------------
class SkipsEveryThird(PlainClassifier):
    def training_step(self, batch, batch_idx):
        if batch_idx % 3 == 2:
            self.passes.append(sam_pass(self))
            return None
        return super().training_step(batch, batch_idx)


class MixinSkipsEveryThird(Classifier):
    def compute_loss(self, batch, batch_idx):
        if batch_idx % 3 == 2:
            return None
        return super().compute_loss(batch, batch_idx)


def skipped_reference(rho: float) -> nn.Module:
    """Windows of 3 micro-batches, the third skipped: νSAM over the other two, losses / 3."""
    micro = micro_batches(classification_data())
    return reference_loop(make_net(), lambda net: NuclearPerturbation(net, rho=rho), [micro[0:2], micro[3:5]],
                          divide_by=3)


@pytest.mark.parametrize("path", ["dropin", "mixin"])
def test_a_skipped_last_micro_batch_still_perturbs_the_window_it_ends(path):
    sam = NuSAM(rho=0.4)
    if path == "dropin":
        module, run = SkipsEveryThird(), trainer(max_epochs=1, callbacks=[sam], accumulate_grad_batches=3)
    else:
        module, run = MixinSkipsEveryThird(accumulate_grad_batches=3), trainer(max_epochs=1, callbacks=[sam])
    run.fit(module, loader(classification_data()))
    assert run.global_step == 2 and sam.perturbation.steps == 2
    assert run.callback_metrics["sam/active_epoch"] == 1.0
    assert max_weight_difference(module.net, skipped_reference(0.4)) <= 1e-6


# 7. the Tuner ---------------------------------------------------------------------------------------
class FirstDraw(PlainClassifier):
    def training_step(self, batch, batch_idx):
        if not hasattr(self, "first_draw"):
            self.first_draw = float(torch.rand(()))
        return super().training_step(batch, batch_idx)


def first_draw_after_lr_find(seed: int, lr_find: bool) -> float:
    data = loader(classification_data(n=96))
    module = FirstDraw()
    run = trainer(max_epochs=1, callbacks=[NuSAM(rho=0.1)])
    if lr_find:
        Tuner(run).lr_find(module, train_dataloaders=data, num_training=5, update_attr=False)
        del module.first_draw
    torch.manual_seed(seed)
    run.fit(module, data)
    return module.first_draw


def test_after_lr_find_the_next_fit_follows_the_users_seed():
    seven = first_draw_after_lr_find(7, lr_find=True)
    assert seven == first_draw_after_lr_find(7, lr_find=False)
    assert seven != first_draw_after_lr_find(8, lr_find=True)


# 8. rho_schedule="lr" with a warm-up ---------------------------------------------------------------------
class RadiusLog(Callback):
    def __init__(self):
        self.radii, self.lrs = [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])  # the step's learning rate

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.radii.append(float(trainer.callback_metrics["sam/rho_step"]))


class WarmedUp(PlainClassifier):
    def __init__(self, warmup: str):
        super().__init__(lr=0.1)
        self.warmup = warmup

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=self.lr)
        if self.warmup == "linear":
            scheduler = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1e-3, total_iters=4)
        else:  # from lr 0
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, step / 4))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


@pytest.mark.parametrize("warmup", ["linear", "from-zero"])
def test_lr_radius_is_relative_to_the_base_learning_rate_and_never_exceeds_rho(warmup):
    log = RadiusLog()
    module = WarmedUp(warmup)
    trainer(max_steps=6, callbacks=[NuSAM(rho=0.1, rho_schedule="lr"), log]).fit(
        module, loader(classification_data()))
    factors = [1e-3 + (1 - 1e-3) * min(t, 4) / 4 for t in range(6)] if warmup == "linear" \
        else [min(1.0, t / 4) for t in range(6)]
    assert log.radii == pytest.approx([0.1 * f for f in factors], rel=1e-5)
    assert max(log.radii) <= 0.1 * (1 + 1e-6)  # (logged in fp32)


def test_lr_radius_with_one_cycle_is_relative_to_its_peak():
    class OneCycle(PlainClassifier):
        def configure_optimizers(self):
            optimizer = torch.optim.SGD(self.parameters(), lr=0.1)
            scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.1, total_steps=6)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    log = RadiusLog()
    trainer(max_steps=6, callbacks=[NuSAM(rho=0.1, rho_schedule="lr"), log]).fit(
        OneCycle(), loader(classification_data()))
    assert max(log.radii) <= 0.1 * (1 + 1e-6) and log.radii[0] < 0.01
    assert log.radii == pytest.approx([0.1 * lr / 0.1 for lr in log.lrs], rel=1e-5)  # ρ·lr_t/max_lr


# 9. misuse of the core --------------------------------------------------------------------------------------
def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def backward(model: nn.Module, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    model.zero_grad(set_to_none=True)
    inputs = torch.randn(8, 6, generator=generator)
    dtype = next(model.parameters()).dtype
    model(inputs.to(dtype)).float().square().mean().backward()


@pytest.mark.parametrize("cls", [NuclearPerturbation, L2Perturbation, GaussianPerturbation])
def test_perturb_before_any_backward_is_an_error_and_counts_nothing(cls):
    model = small_net()
    perturbation = cls(model, rho=0.1)
    with pytest.raises(RuntimeError, match=r"backward"):
        perturbation.perturb()
    assert perturbation.steps == 0 and not perturbation.is_perturbed


@pytest.mark.parametrize("cls", [NuclearPerturbation, L2Perturbation, GaussianPerturbation])
@pytest.mark.parametrize("how", ["assign", "swap"])
def test_replaced_parameters_are_followed(cls, how):
    model = small_net()
    perturbation = cls(model, rho=0.5)
    if how == "assign":
        replacement = {k: torch.randn_like(v) for k, v in model.state_dict().items()}
        model.load_state_dict(replacement, assign=True)
    else:
        model[2] = nn.Linear(8, 3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    backward(model)
    perturbation.perturb()
    assert not torch.equal(model[2].weight, before["2.weight"])  # the new parameter got ε
    perturbation.restore()
    for name, parameter in model.named_parameters():
        assert torch.allclose(parameter, before[name], atol=1e-6), name
    assert "2.weight" in perturbation.parameter_names


@pytest.mark.parametrize("cls", [NuclearPerturbation, GaussianPerturbation])
def test_a_model_cast_to_bf16_after_construction_is_still_restored_exactly(cls):
    model = small_net()
    perturbation = cls(model, rho=0.5)
    model.to(torch.bfloat16)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for step in range(48):
        backward(model, seed=step)
        perturbation.perturb()
        perturbation.restore()
    assert perturbation.exact_restore
    for name, parameter in model.named_parameters():
        assert torch.equal(parameter, before[name]), name


@pytest.mark.parametrize("cls", [L2Perturbation, NuclearPerturbation, GaussianPerturbation])
def test_an_optimizer_step_between_perturb_and_restore_is_an_error(cls):
    model = small_net()
    perturbation = cls(model, rho=0.5, **({} if cls is L2Perturbation else {"exact_restore": True}))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    backward(model)
    perturbation.perturb()
    optimizer.step()
    with pytest.raises(RuntimeError, match=r"restore\(\) before optimizer.step\(\)"):
        perturbation.restore()


# 10. checkpoints written while ε is applied --------------------------------------------------------
class SaveDuringTheSecondPass(Callback):
    """Writes a checkpoint from inside the second pass (as a preemption handler would)."""

    def __init__(self, folder: Path, hook: str):
        self.folder, self.hook, self.saved = folder, hook, []

    def _maybe_save(self, trainer, pl_module):
        if sam_pass(pl_module) == "second" and not self.saved:
            path = self.folder / f"{self.hook}.ckpt"
            trainer.save_checkpoint(path)
            self.saved.append(path)

    def on_before_backward(self, trainer, pl_module, loss):
        if self.hook == "on_before_backward":
            self._maybe_save(trainer, pl_module)

    def on_after_backward(self, trainer, pl_module):
        if self.hook == "on_after_backward":
            self._maybe_save(trainer, pl_module)


class RecordsCleanWeights(PlainClassifier):
    """Keeps the state_dict its first pass sees (the unperturbed weights), per optimizer step."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.clean: dict[int, dict[str, torch.Tensor]] = {}

    def training_step(self, batch, batch_idx):
        if sam_pass(self) == "first":
            self.clean[self.global_step] = {k: v.detach().clone() for k, v in self.state_dict().items()}
        return super().training_step(batch, batch_idx)


def assert_unperturbed(state: dict[str, torch.Tensor], clean: dict[str, torch.Tensor], exact: bool) -> None:
    """The checkpoint's weights are the step's w: bit for bit where restore() is exact (SAM, copies
    back), else up to the last-bit rounding that restore() itself leaves (|ε| is ~0.1 here)."""
    assert state.keys() == clean.keys()
    for key, value in clean.items():
        if exact:
            assert torch.equal(state[key], value), key
        else:
            assert torch.allclose(state[key], value, rtol=0, atol=1e-6), key


@pytest.mark.parametrize("hook", ["on_before_backward", "on_after_backward"])
@pytest.mark.parametrize("method", ["NuSAM", "SAM", "GaussSAM"])
def test_a_checkpoint_written_during_the_second_pass_holds_the_unperturbed_weights(tmp_path, hook, method):
    saver = SaveDuringTheSecondPass(tmp_path, hook)
    module = RecordsCleanWeights(lr=0.0)  # the weights after the step are the restored ones
    run = trainer(max_steps=1, callbacks=[saver, CALLBACKS[method](rho=0.5)])
    run.fit(module, loader(classification_data()))
    state = torch.load(saver.saved[0], weights_only=False)["state_dict"]
    assert_unperturbed(state, module.clean[0], exact=method == "SAM")
    assert_unperturbed(state, module.state_dict(), exact=True)


def test_a_slurm_preemption_signal_in_the_second_pass_saves_unperturbed_weights(tmp_path, monkeypatch):
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    scontrol = tmp_path / "bin" / "scontrol"
    scontrol.parent.mkdir()
    scontrol.write_text("#!/bin/sh\nexit 0\n")
    scontrol.chmod(scontrol.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{scontrol.parent}{os.pathsep}{os.environ['PATH']}")
    for key, value in {"SLURM_NTASKS": "1", "SLURM_JOB_ID": "1234", "SLURM_JOB_NAME": "train",
                       "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0"}.items():
        monkeypatch.setenv(key, value)

    class Preempted(RecordsCleanWeights):
        def training_step(self, batch, batch_idx):
            if sam_pass(self) == "second" and self.global_step == 2:
                os.kill(os.getpid(), signal.SIGUSR1)  # handled at once, inside the second pass
            return super().training_step(batch, batch_idx)

    module = Preempted()
    run = trainer(max_steps=3, callbacks=[NuSAM(rho=0.5)], plugins=[SLURMEnvironment(auto_requeue=True)],
                  default_root_dir=tmp_path)
    run.fit(module, loader(classification_data()))
    checkpoints = list(tmp_path.glob("hpc_ckpt_*.ckpt"))
    assert len(checkpoints) == 1
    state = torch.load(checkpoints[0], weights_only=False)
    assert state["global_step"] == 2
    assert_unperturbed(state["state_dict"], module.clean[2], exact=False)


# the smaller ones --------------------------------------------------------------------------------------
class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Conv2d(3, 32, 3), nn.ReLU(), nn.Conv2d(32, 32, 3), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(32, 10)

    def forward(self, images):
        return self.fc(self.features(images))


def test_a_model_mostly_left_uncovered_is_reported_once_and_include_conv_covers_it():
    message = r"(?s)1 weight matrix.*3\.\d+ % of the trainable weights.*include_conv"
    with pytest.warns(UserWarning, match=message):
        NuclearPerturbation(SmallCNN(), rho=0.1)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        covered = NuclearPerturbation(SmallCNN(), rho=0.1, include_conv=True)
    assert covered.parameter_names == ["features.0.weight", "features.2.weight", "fc.weight"]


def test_nusam_memory_says_which_layers_it_counted(capsys):
    from lightning_nusam.memory import main

    main(["--model", "resnet18"])
    shown = capsys.readouterr().out
    assert "fc.weight" in shown and "(1000, 512)" in shown
    assert "not perturbed" in shown and "conv1.weight" in shown and "include_conv" in shown


def test_relative_position_bias_tables_are_not_perturbed_by_default():
    import timm

    with torch.device("meta"):
        model = timm.create_model("swin_tiny_patch4_window7_224")
    names = NuclearPerturbation(model, rho=0.1).parameter_names
    tables = [n for n, _ in model.named_parameters() if "relative_position_bias_table" in n]
    assert tables and not set(tables) & set(names)
    assert "layers.0.blocks.0.attn.qkv.weight" in names


# with rho=0 the callback is exactly a no-op (with accumulation, clipping, BatchNorm: test_ways_in.py) ---


def test_rho_zero_is_a_no_op_with_ema_and_backbone_finetuning():
    from lightning.pytorch.callbacks import EMAWeightAveraging

    nets = []
    for callbacks in ([], [NuSAM(rho=0.0)]):
        module = FineTuned()
        trainer(max_epochs=2, callbacks=[BackboneFinetuning(unfreeze_backbone_at_epoch=1),
                                         EMAWeightAveraging(decay=0.9), *callbacks]).fit(
            module, loader(classification_data()))
        nets.append(module)
    assert max_weight_difference(*nets) == 0.0


def test_rho_zero_is_a_no_op_with_torch_compile():
    nets = []
    for callbacks in ([], [NuSAM(rho=0.0)]):
        torch.manual_seed(0)
        module = PlainClassifier()
        module.net = torch.compile(module.net, backend="eager")
        trainer(max_steps=4, callbacks=callbacks).fit(module, loader(classification_data()))
        nets.append(module)
    assert max_weight_difference(*nets) == 0.0


# found in review: more programs -----------------------------------------------------------------------


def test_the_same_callback_in_a_second_fit_starts_its_schedule_afresh():
    def radius_at_the_end(sam, batches):
        log = RadiusLog()
        trainer(max_epochs=2, callbacks=[sam, log], limit_train_batches=batches).fit(
            PlainClassifier(), loader(classification_data()))
        return log.radii

    reused = NuSAM(rho=0.1, start_epoch=1, rho_schedule="linear", rho_final=0.0)
    radius_at_the_end(reused, 2)
    assert radius_at_the_end(reused, 4) == radius_at_the_end(
        NuSAM(rho=0.1, start_epoch=1, rho_schedule="linear", rho_final=0.0), 4)


