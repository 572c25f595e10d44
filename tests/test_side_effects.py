"""What the second pass may not change: module state besides the gradients, the batch, the user's
own random generators, and what ``self.log`` records.

Each program below is one a user of another field writes around the drop-in (self-supervised
teachers, VQ codebooks, spectral normalisation, diffusion EMA copies, Hugging Face batches,
loaders that reuse their buffers). With ``rho=0`` and with ``rho=1e-12`` (a radius below the
rounding of the weights) the callback must give exactly the weights and buffers of the run
without it.
"""

from __future__ import annotations

import copy
import random
from collections import UserDict

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import Logger
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from helpers import Classifier, EMATeacher, classification_data, loader, make_net, trainer
from lightning_nusam import NuSAM, sam_pass

RADII = [0.0, 1e-12]


def state_difference(a: nn.Module, b: nn.Module) -> float:
    """The largest ``|a − b|`` over every entry of two state dicts (weights and buffers)."""
    first, second = a.state_dict(), b.state_dict()
    assert first.keys() == second.keys()
    return max(float((x.double() - second[k].double()).abs().max()) if x.numel() else 0.0
               for k, x in first.items())


def image_data(n: int = 32, seed: int = 0) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, 4, 4, generator=generator)
    return TensorDataset(images, torch.randint(0, 3, (n,), generator=generator))


def fit(make_module, callbacks, data, *, accumulate: int = 1, epochs: int = 1, **kwargs) -> L.LightningModule:
    L.seed_everything(0)
    module = make_module()
    run = trainer(max_epochs=epochs, callbacks=callbacks, accumulate_grad_batches=accumulate, **kwargs)
    run.fit(module, data)
    return module


def assert_no_op(make_module, data, rho: float, *, accumulate: int = 1, epochs: int = 1) -> None:
    plain = fit(make_module, [], data, accumulate=accumulate, epochs=epochs)
    sam = fit(make_module, [NuSAM(rho=rho)], data, accumulate=accumulate, epochs=epochs)
    assert state_difference(sam, plain) == 0.0


class Module(L.LightningModule):
    """SGD with momentum over the parameters that train; subclasses give ``loss``."""

    def training_step(self, batch, batch_idx):
        return self.loss(batch)

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.1, momentum=0.9)


# 1. module state: buffers and parameters that do not train --------------------------------------------
class InstanceNormNet(Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.norm = nn.InstanceNorm2d(4, affine=True, track_running_stats=True)
        self.head = nn.Linear(64, 3)

    def loss(self, batch):
        images, labels = batch
        features = torch.relu(self.norm(self.conv(images))).flatten(1)
        return nn.functional.cross_entropy(self.head(features), labels)


class SpectralNormNet(Module):
    """A GAN-discriminator-style net: spectral normalisation on every linear layer."""

    def __init__(self, form: str = "parametrization"):
        super().__init__()
        wrap = (torch.nn.utils.parametrizations.spectral_norm if form == "parametrization"
                else torch.nn.utils.spectral_norm)
        self.net = nn.Sequential(wrap(nn.Linear(6, 16)), nn.Tanh(), wrap(nn.Linear(16, 3)))

    def loss(self, batch):
        return nn.functional.cross_entropy(self.net(batch[0]), batch[1])


class EMATeacherThroughData(EMATeacher):
    """The same teacher updated through ``.data``, as much published code does: by replacing the
    storage (``t.data = ...``, seen by its address), or in place (``t.data.mul_``: no version
    counter sees it; found by value on the first perturbed step only, a documented limit)."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how

    def loss(self, batch):
        logits = self.student(batch[0])
        with torch.no_grad():
            target = self.teacher(batch[0]).softmax(-1)
        distillation = (target * logits.log_softmax(-1)).sum(-1).mean()
        loss = nn.functional.cross_entropy(logits, batch[1]) - distillation
        for t, s in zip(self.teacher.parameters(), self.student.parameters(), strict=True):
            if self.how == "in-place":
                t.data.mul_(0.9).add_(s.data, alpha=0.1)
            else:
                t.data = t.data * 0.9 + s.data * 0.1
        return loss


class MoCo(Module):
    """A momentum key encoder and a queue of keys (MoCo v2), updated in training_step."""

    def __init__(self, queue: int = 32, dim: int = 8):
        super().__init__()
        torch.manual_seed(0)
        self.query = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, dim))
        self.key = copy.deepcopy(self.query).requires_grad_(False)
        self.register_buffer("queue", nn.functional.normalize(torch.randn(dim, queue), dim=0))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    def loss(self, batch):
        inputs = batch[0]
        q = nn.functional.normalize(self.query(inputs), dim=1)
        with torch.no_grad():
            for k, p in zip(self.key.parameters(), self.query.parameters(), strict=True):
                k.mul_(0.99).add_(p, alpha=0.01)
            keys = nn.functional.normalize(self.key(inputs.flip(1)), dim=1)
        logits = torch.cat([(q * keys).sum(1, keepdim=True), q @ self.queue.clone()], dim=1) / 0.2
        loss = nn.functional.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long))
        with torch.no_grad():
            ptr = int(self.queue_ptr)
            self.queue[:, ptr:ptr + len(keys)] = keys.T
            self.queue_ptr[0] = (ptr + len(keys)) % self.queue.shape[1]
        return loss


class VectorQuantizerEMA(nn.Module):
    """VQ-VAE's quantiser with an EMA codebook (van den Oord et al., 2017), updated in forward."""

    def __init__(self, codes: int = 8, dim: int = 4, decay: float = 0.9):
        super().__init__()
        self.decay = decay
        self.register_buffer("embedding", torch.randn(codes, dim))
        self.register_buffer("cluster_size", torch.zeros(codes))
        self.register_buffer("embed_avg", self.embedding.clone())

    def forward(self, z):
        indices = torch.cdist(z, self.embedding).argmin(1)
        quantized = self.embedding[indices]
        if self.training:
            with torch.no_grad():
                onehot = nn.functional.one_hot(indices, len(self.embedding)).type_as(z)
                self.cluster_size.mul_(self.decay).add_(onehot.sum(0), alpha=1 - self.decay)
                self.embed_avg.mul_(self.decay).add_(onehot.T @ z, alpha=1 - self.decay)
                n = self.cluster_size.sum()
                size = (self.cluster_size + 1e-5) / (n + len(self.embedding) * 1e-5) * n
                self.embedding.copy_(self.embed_avg / size.unsqueeze(1))
        commitment = nn.functional.mse_loss(z, quantized.detach())
        return z + (quantized - z).detach(), commitment


class VQVAE(Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.encoder, self.quantizer, self.decoder = nn.Linear(6, 4), VectorQuantizerEMA(), nn.Linear(4, 6)

    def loss(self, batch):
        quantized, commitment = self.quantizer(self.encoder(batch[0]))
        return nn.functional.mse_loss(self.decoder(quantized), batch[0]) + 0.25 * commitment


class DiffusionWithEMA(Module):
    """A denoiser trained on noise drawn in the step, with an EMA copy kept for sampling."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.denoiser = nn.Sequential(nn.Linear(7, 16), nn.SiLU(), nn.Linear(16, 6))
        self.ema = copy.deepcopy(self.denoiser).requires_grad_(False)
        self.register_buffer("ema_updates", torch.zeros((), dtype=torch.long))

    def loss(self, batch):
        x = batch[0]
        noise, t = torch.randn_like(x), torch.rand(len(x), 1)
        loss = nn.functional.mse_loss(self.denoiser(torch.cat([x * (1 - t) + noise * t, t], 1)), noise)
        with torch.no_grad():
            for e, p in zip(self.ema.parameters(), self.denoiser.parameters(), strict=True):
                e.lerp_(p, 0.05)
            self.ema_updates += 1
        return loss


STATEFUL = {
    "instance-norm": (InstanceNormNet, image_data),
    "spectral-norm": (SpectralNormNet, classification_data),
    "spectral-norm-hook": (lambda: SpectralNormNet("hook"), classification_data),
    "ema-teacher": (EMATeacher, classification_data),
    "moco-queue": (MoCo, classification_data),
    "ema-teacher-data-replaced": (lambda: EMATeacherThroughData("replaced"), classification_data),
    "vq-ema-codebook": (VQVAE, classification_data),
    "diffusion-ema": (DiffusionWithEMA, classification_data),
}


@pytest.mark.parametrize("rho", RADII)
@pytest.mark.parametrize("case", sorted(STATEFUL))
def test_state_the_step_changes_is_as_after_one_pass(case, rho):
    make_module, make_data = STATEFUL[case]
    assert_no_op(make_module, loader(make_data()), rho)


@pytest.mark.parametrize("case", ["moco-queue", "instance-norm"])
def test_state_with_accumulation_is_as_after_one_pass_per_micro_batch(case):
    make_module, make_data = STATEFUL[case]
    assert_no_op(make_module, loader(make_data()), 0.0, accumulate=2, epochs=2)


def test_the_second_pass_sees_the_state_the_first_pass_started_from():
    """The teacher the second pass reads is the one the first pass read (not updated twice), and
    after the step it holds one update: checked against the teacher recorded in the first pass."""

    class Recording(EMATeacher):
        def __init__(self):
            super().__init__()
            self.seen: list[tuple[str | None, torch.Tensor]] = []

        def loss(self, batch):
            self.seen.append((sam_pass(self), self.teacher[0].weight.detach().clone()))
            return super().loss(batch)

    module = fit(Recording, [NuSAM(rho=0.5)], loader(classification_data(n=24)))
    pairs = list(zip(module.seen[0::2], module.seen[1::2], strict=True))
    assert len(pairs) == 3
    for (first_name, first), (second_name, second) in pairs:
        assert (first_name, second_name) == ("first", "second")
        assert torch.equal(first, second)


class CountsInTheSecondPass(Module):
    """Changes a buffer only in the second pass, from step ``from_step`` on."""

    def __init__(self, from_step: int = 0):
        super().__init__()
        self.net, self.from_step = make_net(), from_step
        self.register_buffer("second_passes", torch.zeros((), dtype=torch.long))

    def loss(self, batch):
        if sam_pass(self) == "second" and self.global_step >= self.from_step:
            self.second_passes += 1
        return nn.functional.cross_entropy(self.net(batch[0]), batch[1])


def test_a_buffer_only_the_second_pass_changes_is_put_back():
    module = fit(CountsInTheSecondPass, [NuSAM(rho=0.1)], loader(classification_data()))
    assert int(module.second_passes) == 0


def test_a_buffer_only_the_second_pass_changes_from_a_later_step_on_is_refused_naming_it():
    with pytest.raises(RuntimeError, match=r"second_passes.*on_train_batch_end.*sam_pass"):
        fit(lambda: CountsInTheSecondPass(from_step=2), [NuSAM(rho=0.1)], loader(classification_data()))


class CountsFromStepTwo(CountsInTheSecondPass):
    def loss(self, batch):
        if sam_pass(self) == "first" and self.global_step >= 2:
            self.second_passes += 1
        return nn.functional.cross_entropy(self.net(batch[0]), batch[1])


def test_state_a_first_pass_changes_only_from_a_later_step_on_is_named_in_a_warning_and_kept():
    with pytest.warns(UserWarning, match=r"second_passes for the first time.*sam_pass"):
        module = fit(CountsFromStepTwo, [NuSAM(rho=0.1)], loader(classification_data()))
    assert int(module.second_passes) == 4  # steps 2..5, once each


# 2. the batch ------------------------------------------------------------------------------------------
class DictDataset(Dataset):
    def __init__(self, data: TensorDataset):
        self.data = data

    def __len__(self):
        return len(self.data)

    def __getitem__(self, index):
        inputs, labels = self.data[index]
        return {"inputs": inputs, "labels": labels}


class Encoding(UserDict):
    """A Hugging Face ``BatchEncoding``-like mapping (a ``UserDict`` with attribute access)."""

    def __getattr__(self, name):
        try:
            return self.data[name]
        except KeyError:
            raise AttributeError(name) from None


def collate_encoding(kind: str):
    def collate(rows):
        batch = torch.utils.data.default_collate(rows)
        if kind == "userdict":
            return Encoding(batch)
        if kind == "hf":
            from transformers import BatchEncoding

            return BatchEncoding(batch)
        return batch

    return collate


class PopsLabels(Module):
    """Hugging Face style: ``labels = batch.pop("labels")``, the rest goes to the model."""

    def __init__(self):
        super().__init__()
        self.net = make_net()

    def loss(self, batch):
        labels = batch.pop("labels")
        return nn.functional.cross_entropy(self.net(batch["inputs"]), labels)


class NormalisesInPlace(Module):
    def __init__(self):
        super().__init__()
        self.net = make_net()

    def loss(self, batch):
        inputs, labels = batch
        inputs.sub_(0.5).mul_(2.0)
        return nn.functional.cross_entropy(self.net(inputs), labels)


@pytest.mark.parametrize("rho", RADII)
@pytest.mark.parametrize("kind", ["dict", "userdict", "hf"])
def test_a_batch_whose_labels_are_popped_is_replayed_whole(kind, rho):
    if kind == "hf":
        pytest.importorskip("transformers")
    data = DataLoader(DictDataset(classification_data()), batch_size=8, collate_fn=collate_encoding(kind))
    assert_no_op(PopsLabels, data, rho)


@pytest.mark.parametrize("accumulate", [1, 2])
@pytest.mark.parametrize("rho", RADII)
def test_a_batch_normalised_in_place_is_replayed_as_the_loader_gave_it(rho, accumulate):
    assert_no_op(NormalisesInPlace, loader(classification_data()), rho, accumulate=accumulate)


class ReusingLoader:
    """A loader that fills the same batch buffers for every batch (pinned staging buffers, GPU data
    pipelines): valid without the callback, where a batch is used up before the next is fetched."""

    def __init__(self, data: TensorDataset, batch_size: int = 8):
        self.inputs, self.labels = data.tensors
        self.batch_size = batch_size
        self.buffers = [(torch.empty(batch_size, self.inputs.shape[1]),
                         torch.empty(batch_size, dtype=torch.long))]

    def __len__(self):
        return len(self.inputs) // self.batch_size

    def __iter__(self):
        for index in range(len(self)):
            inputs, labels = self.buffers[0]
            window = slice(index * self.batch_size, (index + 1) * self.batch_size)
            inputs.copy_(self.inputs[window])
            labels.copy_(self.labels[window])
            yield inputs, labels


@pytest.mark.parametrize("rho", RADII)
def test_a_loader_that_reuses_its_buffers_is_replayed_with_each_micro_batch(rho):
    class Plain(Module):
        def __init__(self):
            super().__init__()
            self.net = make_net()

        def loss(self, batch):
            return nn.functional.cross_entropy(self.net(batch[0]), batch[1])

    assert_no_op(Plain, ReusingLoader(classification_data()), rho, accumulate=2, epochs=2)


# 3. random generators the module owns ------------------------------------------------------------------
class Noisy(nn.Module):
    """A submodule with its own torch generator (as some augmentation layers keep)."""

    def __init__(self):
        super().__init__()
        self.generator = torch.Generator().manual_seed(3)

    def forward(self, x):
        return x + 0.1 * torch.randn(x.shape, generator=self.generator)


class OwnGenerators(Module):
    def __init__(self, kind: str):
        super().__init__()
        self.kind, self.net, self.noise = kind, make_net(dropout=0.2), Noisy()
        self.numpy_rng, self.legacy_rng = np.random.default_rng(1), np.random.RandomState(1)
        self.torch_rng, self.python_rng = torch.Generator().manual_seed(2), random.Random(4)

    def loss(self, batch):
        inputs, labels = batch
        draw = {"numpy": lambda: float(self.numpy_rng.random()),
                "numpy-legacy": lambda: float(self.legacy_rng.rand()),
                "torch": lambda: float(torch.rand((), generator=self.torch_rng)),
                "python": lambda: self.python_rng.random(),
                "submodule": lambda: 0.0}[self.kind]()
        if self.kind == "submodule":
            inputs = self.noise(inputs)
        return nn.functional.cross_entropy(self.net(inputs * (1 + draw)), labels)


@pytest.mark.parametrize("rho", RADII)
@pytest.mark.parametrize("kind", ["numpy", "numpy-legacy", "torch", "python", "submodule"])
def test_generators_the_module_owns_draw_the_same_in_both_passes(kind, rho):
    assert_no_op(lambda: OwnGenerators(kind), loader(classification_data()), rho, accumulate=2)


# 4. what self.log records ---------------------------------------------------------------------------------
class MemoryLogger(Logger):
    def __init__(self):
        super().__init__()
        self.rows: list[dict[str, float]] = []

    @property
    def name(self):
        return "memory"

    @property
    def version(self):
        return 0

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.rows.append(dict(metrics))


class LogsItsLoss(Module):
    """Logs the loss without a guard, on step and on epoch; records the clean losses itself."""

    def __init__(self):
        super().__init__()
        self.net = make_net()
        self.clean: list[float] = []

    def loss(self, batch):
        loss = nn.functional.cross_entropy(self.net(batch[0]), batch[1])
        if sam_pass(self) != "second":
            self.clean.append(float(loss))
        self.log("train_loss", loss)
        self.log("loss_epoch_mean", loss, on_step=False, on_epoch=True)
        return loss


@pytest.mark.parametrize("accumulate", [1, 2])
def test_self_log_in_training_step_shows_the_clean_loss_per_step_and_per_epoch(accumulate):
    logger = MemoryLogger()
    module = fit(LogsItsLoss, [NuSAM(rho=0.5)], loader(classification_data()), accumulate=accumulate,
                 logger=logger, log_every_n_steps=1)
    assert len(module.clean) == 6
    epoch = [row["loss_epoch_mean"] for row in logger.rows if "loss_epoch_mean" in row]
    assert epoch == [pytest.approx(float(np.mean(module.clean)), rel=1e-6)]
    per_step = [row["train_loss"] for row in logger.rows if "train_loss" in row]
    # logged every optimizer step: the clean loss of the step's last micro-batch
    assert per_step == pytest.approx(module.clean[accumulate - 1::accumulate], rel=1e-6)
    perturbed = [row["sam/loss_perturbed_step"] for row in logger.rows if "sam/loss_perturbed_step" in row]
    assert len(perturbed) == 6 // accumulate and all(p != c for p, c in zip(perturbed, per_step, strict=True))


# 5. the mixin (SAMOptimizer, a plain loop and Fabric on the EMA-teacher program: test_ways_in.py) -------
class MixinTeacher(Classifier):
    """The EMA-teacher and in-place-normalisation program written with SAMMixin's compute_loss."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.teacher = copy.deepcopy(self.net).requires_grad_(False)
        self.norm = nn.InstanceNorm1d(1, track_running_stats=True)

    def compute_loss(self, batch, batch_idx):
        labels = batch.pop("labels")
        inputs = batch["inputs"]
        inputs.sub_(0.5).mul_(2.0)
        inputs = self.norm(inputs.unsqueeze(1)).squeeze(1)
        logits = self.net(inputs)
        with torch.no_grad():
            target = self.teacher(inputs).softmax(-1)
            for t, s in zip(self.teacher.parameters(), self.net.parameters(), strict=True):
                t.mul_(0.9).add_(s, alpha=0.1)
        return nn.functional.cross_entropy(logits, labels) - (target * logits.log_softmax(-1)).sum(-1).mean()


@pytest.mark.parametrize("rho", RADII)
@pytest.mark.parametrize("accumulate", [1, 2])
def test_the_mixin_replays_state_and_batch_as_one_pass(accumulate, rho):
    data = DataLoader(DictDataset(classification_data()), batch_size=8)
    plain = fit(lambda: MixinTeacher(accumulate_grad_batches=accumulate), [], data)
    sam = fit(lambda: MixinTeacher(accumulate_grad_batches=accumulate), [NuSAM(rho=rho)], data)
    assert state_difference(sam, plain) == 0.0


