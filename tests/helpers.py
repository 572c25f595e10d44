"""What the tests share: small models and data, the one weight comparison, the one reference loop
(the core's perturb()/restore() written out by hand, no engine, no Lightning), and Lightning
modules and Trainer settings."""

from __future__ import annotations

import copy
import importlib.util
import random
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import lightning as L
import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_nusam import SAMMixin, sam_pass
from lightning_nusam.perturbations import Perturbation


class TinyViTLike(nn.Module):
    """A small transformer-shaped model with every kind of parameter νSAM must tell apart."""

    def __init__(self, dim: int = 12, depth: int = 2, classes: int = 5) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, kernel_size=2, stride=2)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, 5, dim) * 0.02)
        self.blocks = nn.ModuleList(
            nn.ModuleDict(
                {
                    "norm": nn.LayerNorm(dim),
                    "fc1": nn.Linear(dim, 2 * dim),
                    "fc2": nn.Linear(2 * dim, dim),
                }
            )
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embed(images).flatten(2).transpose(1, 2)  # (B, 4, dim)
        tokens = torch.cat([self.cls_token.expand(len(tokens), -1, -1), tokens], dim=1)
        tokens = tokens + self.pos_embed
        for block in self.blocks:
            tokens = tokens + block["fc2"](torch.relu(block["fc1"](block["norm"](tokens))))
        return self.head(self.norm(tokens[:, 0]))


def make_batch(seed: int = 0, n: int = 8, dtype: torch.dtype = torch.float32):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, 4, 4, generator=generator, dtype=dtype)
    labels = torch.randint(0, 5, (n,), generator=generator)
    return images, labels


def matrix_with_gap(n: int, m: int, singular_values: list[float], seed: int) -> torch.Tensor:
    """An ``n×m`` fp64 matrix with the given singular values (random singular vectors)."""
    generator = torch.Generator().manual_seed(seed)
    left, _ = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    right, _ = torch.linalg.qr(torch.randn(m, m, generator=generator, dtype=torch.float64))
    k = len(singular_values)
    return left[:, :k] @ torch.diag(torch.tensor(singular_values, dtype=torch.float64)) @ right[:, :k].T


def first_pass(model: nn.Module, seed: int = 0) -> torch.Tensor:
    """Zero the grads and run forward/backward on a fixed batch; returns the loss."""
    model.zero_grad(set_to_none=True)
    dtype = next(model.parameters()).dtype
    images, labels = make_batch(seed, dtype=dtype)
    loss = nn.functional.cross_entropy(model(images).float(), labels)
    loss.backward()
    return loss.detach()


def classification_data(n: int = 48, features: int = 6, classes: int = 3, seed: int = 0) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(n, features, generator=generator)
    labels = (inputs[:, :classes] + 0.3 * torch.randn(n, classes, generator=generator)).argmax(1)
    return TensorDataset(inputs, labels)


def write_fake_cifar(folder: Path, train: int = 64, test: int = 32) -> Path:
    """A tiny CIFAR-shaped ``train.npz``/``test.npz`` pair (random pixels, labels 0..9, valid for
    CIFAR-10 and CIFAR-100 heads) in ``folder``, for ``CIFARDataModule(npz_dir=folder)``."""
    folder.mkdir(parents=True, exist_ok=True)
    generator = np.random.default_rng(0)
    for split, n in (("train", train), ("test", test)):
        images = generator.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
        np.savez(folder / f"{split}.npz", images=images, labels=np.arange(n) % 10)
    return folder


def make_net(features: int = 6, classes: int = 3, batchnorm: bool = False, dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(features, 16)]
    if batchnorm:
        layers.append(nn.BatchNorm1d(16))
    layers += [nn.Tanh(), nn.Dropout(dropout), nn.Linear(16, 16), nn.LayerNorm(16), nn.Tanh(),
               nn.Linear(16, classes)]
    return nn.Sequential(*layers)


def configure_optimizers(module: L.LightningModule):
    """SGD with momentum (or AdamW) and, when ``module.scheduler`` is a dict, a halving StepLR."""
    if module.optimizer_name == "sgd":
        optimizer = torch.optim.SGD(module.parameters(), lr=module.lr, momentum=0.9)
    else:
        optimizer = torch.optim.AdamW(module.parameters(), lr=module.lr)
    if module.scheduler is None:
        return optimizer
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, **module.scheduler}}


class Classifier(SAMMixin, L.LightningModule):
    """A small classifier; counts compute_loss calls and can record what each pass saw."""

    def __init__(
        self,
        net: nn.Module | None = None,
        lr: float = 0.05,
        optimizer: str = "sgd",
        scheduler: dict | None = None,
        **mixin_kwargs,
    ) -> None:
        super().__init__(**mixin_kwargs)
        self.net = net if net is not None else make_net()
        self.lr, self.optimizer_name, self.scheduler = lr, optimizer, scheduler
        self.loss_calls = 0
        self.inject_inf_at_step: int | None = None

    def compute_loss(self, batch, batch_idx):
        inputs, labels = batch
        self.loss_calls += 1
        logits = self.net(inputs)
        loss = nn.functional.cross_entropy(logits, labels)
        first_pass_of_step = self.loss_calls % 2 == 1
        if self.inject_inf_at_step == self.global_step and first_pass_of_step:
            loss = loss * float("inf")
        return {"loss": loss, "accuracy": (logits.detach().argmax(1) == labels).float().mean()}

    def validation_step(self, batch, batch_idx):
        inputs, labels = batch
        self.log("val/loss", nn.functional.cross_entropy(self.net(inputs), labels))

    def configure_optimizers(self):
        return configure_optimizers(self)


class PlainClassifier(L.LightningModule):
    """The same classifier as an ordinary module (its own training_step, automatic optimization),
    for the drop-in: records sam_pass of every training_step call."""

    def __init__(self, net: nn.Module | None = None, lr: float = 0.05, optimizer: str = "sgd",
                 scheduler: dict | None = None) -> None:
        super().__init__()
        self.net = net if net is not None else make_net()
        self.lr, self.optimizer_name, self.scheduler = lr, optimizer, scheduler
        self.passes: list[str | None] = []

    @property
    def loss_calls(self) -> int:
        return len(self.passes)

    def training_step(self, batch, batch_idx):
        inputs, labels = batch
        self.passes.append(sam_pass(self))
        loss = nn.functional.cross_entropy(self.net(inputs), labels)
        if sam_pass(self) != "second":
            self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        inputs, labels = batch
        self.log("val/loss", nn.functional.cross_entropy(self.net(inputs), labels))

    def configure_optimizers(self):
        return configure_optimizers(self)


class EMATeacher(L.LightningModule):
    """BYOL/DINO style: a frozen teacher, the EMA of the student, updated in the loss (state the
    step changes besides the gradients); ``training_step`` is ``loss(batch)``."""

    def __init__(self):
        super().__init__()
        self.student = make_net()
        self.teacher = copy.deepcopy(self.student).requires_grad_(False)

    def loss(self, batch):
        inputs, labels = batch
        logits = self.student(inputs)
        with torch.no_grad():
            target = self.teacher(inputs).softmax(-1)
        loss = nn.functional.cross_entropy(logits, labels) - (target * logits.log_softmax(-1)).sum(-1).mean()
        with torch.no_grad():
            for t, s in zip(self.teacher.parameters(), self.student.parameters(), strict=True):
                t.mul_(0.9).add_(s, alpha=0.1)
        return loss

    def training_step(self, batch, batch_idx):
        return self.loss(batch)

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.1, momentum=0.9)


def resumable_fit(module_class, sam, folder: Path, ckpt_path: str | None = None,
                  save_every: int | None = None, data_seed: int = 3) -> L.LightningModule:
    """Two epochs with dropout, AdamW and a per-step scheduler, validation each epoch and a
    resumable data order; with ``save_every``, checkpoints every that many steps in ``folder``."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_nusam.data import ResumableDataLoader

    torch.manual_seed(0)
    module = module_class(net=make_net(dropout=0.3), optimizer="adamw", lr=0.01,
                          scheduler={"interval": "step", "frequency": 1})
    callbacks = [sam]
    if save_every:
        callbacks.append(ModelCheckpoint(dirpath=folder, every_n_train_steps=save_every, save_top_k=-1))
    run = trainer(max_epochs=2, callbacks=callbacks, enable_checkpointing=bool(save_every))
    train = ResumableDataLoader(classification_data(n=48), batch_size=8, seed=data_seed)
    run.fit(module, train_dataloaders=train,
            val_dataloaders=DataLoader(classification_data(n=16, seed=1), batch_size=8,
                                       generator=torch.Generator().manual_seed(0)),
            ckpt_path=ckpt_path)
    return module


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    return max_weight_difference(a, b) == 0.0


def max_weight_difference(a: nn.Module | list[torch.Tensor], b: nn.Module | list[torch.Tensor]) -> float:
    """The largest ``|a − b|`` over the parameters of two modules of one architecture (or over
    two lists of tensors, such as weights recorded after a step)."""
    first = list(a.parameters()) if isinstance(a, nn.Module) else a
    second = list(b.parameters()) if isinstance(b, nn.Module) else b
    with torch.no_grad():
        return max(float((x.float() - y.float()).abs().max()) for x, y in zip(first, second, strict=True))


Window = list[tuple[torch.Tensor, torch.Tensor]]


def micro_batches(dataset: TensorDataset, batch_size: int = 8) -> Window:
    """The dataset's micro-batches in the order ``loader(dataset, batch_size)`` yields them."""
    inputs, labels = dataset.tensors
    return [(inputs[i:i + batch_size], labels[i:i + batch_size]) for i in range(0, len(inputs), batch_size)]


def windows(dataset: TensorDataset, batch_size: int = 8, per_step: int = 1) -> list[Window]:
    """Those micro-batches grouped into optimizer steps of ``per_step`` (the last may be partial)."""
    micro = micro_batches(dataset, batch_size)
    return [micro[i:i + per_step] for i in range(0, len(micro), per_step)]


def reference_loop(net: nn.Module, make_perturbation: Callable[[nn.Module], Perturbation] | None,
                   windows: list[Window], *, divide_by: int | None = None,
                   make_optimizer: Callable[..., torch.optim.Optimizer] | None = None,
                   halve_lr_every_step: bool = False, batchnorm_update: str = "both") -> nn.Module:
    """The independent replay of a sharpness-aware run: for each window of micro-batches, the
    first pass over all of them (each loss divided by ``divide_by``, default the window's length),
    ``perturb()``, the second pass over the same ones, ``restore()``, an optimizer step (SGD with
    lr 0.05 and momentum 0.9 unless ``make_optimizer(parameters)`` says otherwise); a plain step
    when ``make_perturbation`` is None. ``batchnorm_update="first"`` (``"second"``) puts back the
    BatchNorm buffers the second (first) pass changed; ``"both"`` keeps both passes' updates."""
    optimizer = (make_optimizer or (lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9)))(net.parameters())
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1, 0.5) if halve_lr_every_step else None
    perturbation = make_perturbation(net) if make_perturbation is not None else None
    for window in windows:
        k = divide_by or len(window)
        kept = batchnorm_buffers(net) if perturbation is not None and batchnorm_update == "second" else None
        for x, y in window:
            (nn.functional.cross_entropy(net(x), y) / k).backward()
        if kept is not None:
            put_back(kept)
        if perturbation is not None:
            kept = batchnorm_buffers(net) if batchnorm_update == "first" else None
            perturbation.perturb()
            net.zero_grad(set_to_none=True)
            for x, y in window:
                (nn.functional.cross_entropy(net(x), y) / k).backward()
            perturbation.restore()
            if kept is not None:
                put_back(kept)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if scheduler is not None:
            scheduler.step()
    return net


def batchnorm_buffers(net: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(buffer, copy) for every BatchNorm buffer of ``net``, for :func:`put_back`."""
    return [(b, b.detach().clone()) for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            for b in m.buffers()]


def put_back(kept: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    with torch.no_grad():
        for buffer, copy in kept:
            buffer.copy_(copy)


ROOT = Path(__file__).resolve().parents[1]


def load_script(relative_path: str) -> ModuleType:
    """A script of the repository (``examples/fabric.py``, ``benchmarks/accuracy.py``) as a module."""
    path = ROOT / relative_path
    spec = importlib.util.spec_from_file_location(f"{path.parent.name}_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve a module's annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def trainer(**kwargs) -> L.Trainer:
    defaults = dict(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    return L.Trainer(**{**defaults, **kwargs})


def loader(dataset: TensorDataset, batch_size: int = 8) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=False)


def subprocess_env(extra_path: str) -> dict[str, str]:
    """Environment for a multi-process launch: a fresh free port, no inherited rank variables
    (an earlier in-process Trainer may have set MASTER_PORT in this process's environment)."""
    import os
    import socket

    env = {k: v for k, v in os.environ.items()
           if k not in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK",
                        "LOCAL_WORLD_SIZE", "GROUP_RANK")}
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        env["MASTER_PORT"] = str(sock.getsockname()[1])
    env["MASTER_ADDR"] = "127.0.0.1"
    env["PYTHONPATH"] = os.pathsep.join([extra_path, os.environ.get("PYTHONPATH", "")])
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


# language models offline -------------------------------------------------------------------------
WORDS = ("the a film movie plot actor scene story was is very quite good great bad awful boring fun "
         "cat dog sat on mat ran fast slow man woman said that it".split())
TINY_BERT = {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
             "intermediate_size": 64, "max_position_embeddings": 64}


def sentence(generator: random.Random, positive: bool | None = None) -> str:
    words = [generator.choice(WORDS) for _ in range(generator.randint(3, 9))]
    if positive is not None:
        words.insert(generator.randint(0, len(words)), "good" if positive else "awful")
    return " ".join(words)


def write_glue(root: Path, rows: int = 24) -> Path:
    """Every GLUE task's train/dev TSV in the official layout, with made-up sentences."""
    generator = random.Random(0)
    layouts = {
        "CoLA": (None, lambda: ["src", str(generator.randint(0, 1)), "*", sentence(generator)]),
        "SST-2": (["sentence", "label"],
                  lambda: [sentence(generator, p := generator.random() < 0.5), str(int(p))]),
        "MRPC": (["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"],
                 lambda: [str(generator.randint(0, 1)), "1", "2", sentence(generator), sentence(generator)]),
        "STS-B": (["index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1",
                   "sentence2", "score"],
                  lambda: ["0", "g", "f", "y", "0", "s", "s", sentence(generator), sentence(generator),
                           f"{generator.uniform(0, 5):.3f}"]),
        "QQP": (["id", "qid1", "qid2", "question1", "question2", "is_duplicate"],
                lambda: ["0", "1", "2", sentence(generator), sentence(generator),
                         str(generator.randint(0, 1))]),
        "MNLI": (["index", "sentence1", "sentence2", "gold_label"],
                 lambda: ["0", sentence(generator), sentence(generator),
                          generator.choice(["contradiction", "entailment", "neutral"])]),
        "QNLI": (["index", "question", "sentence", "label"],
                 lambda: ["0", sentence(generator), sentence(generator),
                          generator.choice(["entailment", "not_entailment"])]),
        "RTE": (["index", "sentence1", "sentence2", "label"],
                lambda: ["0", sentence(generator), sentence(generator),
                         generator.choice(["entailment", "not_entailment"])]),
    }
    for folder, (header, make_row) in layouts.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        dev = "dev_matched.tsv" if folder == "MNLI" else "dev.tsv"
        for name, count in (("train.tsv", rows), (dev, rows // 2)):
            lines = (["\t".join(header)] if header else []) + ["\t".join(make_row()) for _ in range(count)]
            (root / folder / name).write_text("\n".join(lines) + "\n")
    return root


def save_tiny_bert(directory: Path, num_labels: int = 2) -> Path:
    """A word-level tokenizer over the test vocabulary and a tiny random BERT, save_pretrained."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import AutoConfig, AutoModelForSequenceClassification, PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    backend = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.train_from_iterator([" ".join(WORDS)], trainers.WordLevelTrainer(special_tokens=specials))
    cls, sep = backend.token_to_id("[CLS]"), backend.token_to_id("[SEP]")
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]",
                                        cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
                                        model_input_names=["input_ids", "token_type_ids", "attention_mask"])
    fields = {k: v for k, v in TINY_BERT.items() if k != "model_type"}
    config = AutoConfig.for_model("bert", vocab_size=len(tokenizer), num_labels=num_labels, **fields)
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
