"""Two-process DDP runs over gloo on CPU, launched by test_ddp.py (Lightning re-runs this file as
rank 1). Runs every mode given, one fit after the other in the same two processes, and saves per
rank and mode: the weights after every step and right after each perturb(), the first-pass
gradients perturb() read, DDP's gradient all-reduces per step and the sizes of the collective
calls perturb() made itself.

A mode is ``key=value`` pairs joined by ``,``: ``way`` (``mixin``/``dropin``), ``method``
(``NuSAM``, ``NuSAMNorm``, ``SAM``, ``SAMON``, ``GaussSAM``, or ``none`` for no callback), ``reduction``
(``auto``, ``gradients``, ``msam`` or ``onepass``), ``accumulate`` (micro-batches per step, of
4 // accumulate samples per rank), ``precision``, ``every`` (``every_n_steps``), ``rho`` and
``resync`` (m-SAM's ``resync_every``).
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback

import lightning_nusam
from helpers import Classifier, PlainClassifier, classification_data, trainer
from lightning_nusam.data import ResumableDataLoader

DEFAULTS = {"way": "mixin", "method": "NuSAM", "reduction": "auto", "accumulate": "1", "precision": "32-true",
            "every": "1", "rho": "0.5", "resync": "0"}


def parse(mode: str) -> dict[str, str]:
    return {**DEFAULTS, **dict(part.split("=") for part in mode.split(",") if part)}


class Recorder(Callback):
    """Per step: DDP's gradient all-reduces (its comm hook) and the weights after the step; per
    perturb(): the first-pass gradients it read, its own collective calls and the weights it left."""

    def __init__(self, sam):
        self.sam, self.first_grads, self.perturbed, self.weights = sam, [], [], []
        self.collectives, self.allreduces, self.allreduces_per_step = [], 0, []

    def on_train_start(self, trainer, pl_module):
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        def counting_allreduce(state, bucket):  # DDP's gradient all-reduce, one call per bucket
            self.allreduces += 1
            return allreduce_hook(state, bucket)

        trainer.strategy.model.register_comm_hook(None, counting_allreduce)
        if self.sam is None:
            return
        perturbation = self.sam.perturbation
        perturb, estimate = perturbation.perturb, perturbation.estimate

        def recording_perturb(*args, **kwargs):
            self.first_grads.append([p.grad.detach().clone() for p in pl_module.parameters()])
            sizes, all_reduce = [], dist.all_reduce

            def counting(tensor, *a, **k):
                sizes.append(tensor.numel())
                return all_reduce(tensor, *a, **k)

            dist.all_reduce = counting
            try:
                perturb(*args, **kwargs)
            finally:
                dist.all_reduce = all_reduce
            self.collectives.append(sizes)
            self.perturbed.append([p.detach().clone() for p in pl_module.parameters()])

        def recording_estimate(*args, **kwargs):  # one-pass: the gradient the direction comes from
            self.first_grads.append([p.grad.detach().clone() for p in pl_module.parameters()])
            estimate(*args, **kwargs)

        perturbation.perturb, perturbation.estimate = recording_perturb, recording_estimate

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step > len(self.weights):  # after an optimizer step, not a micro-batch
            self.weights.append([p.detach().clone() for p in pl_module.parameters()])
            self.allreduces_per_step.append(self.allreduces)
            self.allreduces = 0


def run_mode(out_dir: Path, mode: str, steps: int) -> None:
    options = parse(mode)
    accumulate, dropin = int(options["accumulate"]), options["way"] == "dropin"
    sam = None
    if options["method"] != "none":
        reduction = options["reduction"]
        sam = getattr(lightning_nusam, options["method"])(
            rho=float(options["rho"]), sync_first_pass=reduction != "msam", one_pass=reduction == "onepass",
            first_pass_reduction="gradients" if reduction == "gradients" else "auto",
            resync_every=int(options["resync"]), every_n_steps=int(options["every"]))
    recorder = Recorder(sam)
    torch.manual_seed(0)
    module = PlainClassifier() if dropin else Classifier(accumulate_grad_batches=accumulate)
    run = trainer(strategy="ddp", devices=2, max_steps=steps, max_epochs=-1,
                  callbacks=[cb for cb in (sam, recorder) if cb is not None], precision=options["precision"],
                  accumulate_grad_batches=accumulate if dropin else 1)
    run.fit(module, ResumableDataLoader(classification_data(), batch_size=4 // accumulate, shuffle=False))
    rank = run.global_rank
    result = {"weights": recorder.weights, "perturbed": recorder.perturbed,
              "first_grads": recorder.first_grads, "collectives": recorder.collectives,
              "allreduces_per_step": recorder.allreduces_per_step, "world_size": run.world_size}
    if sam is not None:
        torch.manual_seed(100 + rank)  # distinct RNG states per rank
        rng = sam.state_dict()["rng"]  # a collective: every rank's state
        result.update(resyncs=sam.resyncs, rng_entries=len(rng),
                      own_rng_saved=torch.equal(rng[rank]["cpu"], torch.get_rng_state()))
    torch.save(result, out_dir / f"{mode}_rank{rank}.pt")


def main(out_dir: str, steps: int, modes: list[str]) -> None:
    for mode in modes:
        run_mode(Path(out_dir), mode, steps)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3:])
