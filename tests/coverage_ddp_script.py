"""Two-process DDP runs (gloo, CPU) of the DDP options users turn on, launched by
test_coverage_and_programs.py (Lightning re-runs this file as rank 1): ``static_graph=True`` and
``find_unused_parameters=True`` with a branch that only some samples take. Saves, per rank and
mode, the weights after every step.

A mode is ``key=value`` pairs joined by ``,``: ``method`` (a callback of lightning_nusam, or
``none``), ``rho``, ``ddp`` (``static`` or ``unused``), ``msam`` (``1``: ``sync_first_pass=False``).
"""

import sys
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy
from torch import nn

import lightning_nusam
from helpers import PlainClassifier, classification_data, make_net, trainer
from lightning_nusam.data import ResumableDataLoader

DEFAULTS = {"method": "NuSAM", "rho": "0.5", "ddp": "static", "msam": "0"}


def parse(mode: str) -> dict[str, str]:
    return {**DEFAULTS, **dict(part.split("=") for part in mode.split(",") if part)}


class Branchy(PlainClassifier):
    """The tests' net and a branch that only samples with ``x₀ > 1`` take: in some steps one
    rank uses it and the other not, in others no rank does (DDP needs find_unused_parameters)."""

    def __init__(self):
        super().__init__(net=make_net())
        self.branch = nn.Linear(6, 3)

    def training_step(self, batch, batch_idx):
        inputs, labels = batch
        logits = self.net(inputs)
        takes = inputs[:, 0] > 1.0
        if bool(takes.any()):  # the branch's output added to the samples that take it
            rows = takes.nonzero()[:, 0]
            logits = logits + torch.zeros_like(logits).index_put((rows,), self.branch(inputs[rows]))
        return nn.functional.cross_entropy(logits, labels)


class Weights(Callback):
    def __init__(self):
        self.weights = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.weights.append([p.detach().clone() for p in pl_module.parameters()])


def make_callback(options: dict[str, str]):
    if options["method"] == "none":
        return None
    return getattr(lightning_nusam, options["method"])(rho=float(options["rho"]),
                                                      sync_first_pass=options["msam"] != "1")


def module_for(options: dict[str, str]):
    torch.manual_seed(0)
    return Branchy() if options["ddp"] == "unused" else PlainClassifier()


def run_mode(out_dir: Path, mode: str, steps: int) -> None:
    options = parse(mode)
    sam, weights = make_callback(options), Weights()
    kind = {"static": {"static_graph": True}, "unused": {"find_unused_parameters": True}}[options["ddp"]]
    run = trainer(strategy=DDPStrategy(process_group_backend="gloo", **kind), devices=2, max_steps=steps,
                  max_epochs=-1, callbacks=[cb for cb in (sam, weights) if cb is not None])
    error = None
    try:
        run.fit(module_for(options), ResumableDataLoader(classification_data(), batch_size=4, shuffle=False))
    except ValueError as caught:
        error = str(caught)
    torch.save({"weights": weights.weights, "error": error}, out_dir / f"{mode}_rank{run.global_rank}.pt")


if __name__ == "__main__":
    out, count = Path(sys.argv[1]), int(sys.argv[2])
    for mode in sys.argv[3:]:
        run_mode(out, mode, count)
