"""Two-process DDP run over gloo on CPU, launched by test_ddp.py (Lightning re-runs this file
as rank 1). Saves each rank's weights after every step and the first-pass gradients."""

import sys
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback

from helpers import Classifier, PlainClassifier, classification_data, trainer
from lightning_nusam import NuSAM
from lightning_nusam.data import ResumableDataLoader


class Recorder(Callback):
    """Per step: the first-pass gradients (seen by perturb()) and the weights after the step."""

    def __init__(self, sam):
        self.sam, self.first_grads, self.weights = sam, [], []
        self.allreduces, self.allreduces_per_step = 0, []

    def on_train_start(self, trainer, pl_module):
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        def counting_allreduce(state, bucket):  # DDP's gradient all-reduce, one call per bucket
            self.allreduces += 1
            return allreduce_hook(state, bucket)

        trainer.strategy.model.register_comm_hook(None, counting_allreduce)
        perturb = self.sam.perturbation.perturb

        def recording_perturb(*args, **kwargs):
            self.first_grads.append([p.grad.detach().clone() for p in pl_module.parameters()])
            perturb(*args, **kwargs)

        estimate = self.sam.perturbation.estimate

        def recording_estimate(*args, **kwargs):  # one-pass: the gradient the direction comes from
            self.first_grads.append([p.grad.detach().clone() for p in pl_module.parameters()])
            estimate(*args, **kwargs)

        self.sam.perturbation.perturb = recording_perturb
        self.sam.perturbation.estimate = recording_estimate

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step > len(self.weights):  # after an optimizer step, not a micro-batch
            self.weights.append([p.detach().clone() for p in pl_module.parameters()])
            self.allreduces_per_step.append(self.allreduces)
            self.allreduces = 0


def main(out_dir: str, mode: str, steps: int) -> None:
    """Modes: ``sync``/``msam``/``msam-noresync`` (SAMMixin), ``dropin``/``dropin-msam`` (the
    callback on an ordinary module), ``*-accumulate`` (2 micro-batches of 2 per rank and step)."""
    base = mode.removesuffix("-accumulate")
    sync = base in ("sync", "dropin", "dropin-onepass")
    resync_every = {"sync": 0, "msam": 3, "msam-noresync": 0, "dropin": 0, "dropin-msam": 3,
                    "dropin-onepass": 0}[base]
    accumulate = 2 if mode.endswith("-accumulate") else 1
    sam = NuSAM(rho=0.5, sync_first_pass=sync, resync_every=resync_every, one_pass=base == "dropin-onepass")
    recorder = Recorder(sam)
    dropin = base.startswith("dropin")
    module = PlainClassifier() if dropin else Classifier(accumulate_grad_batches=accumulate)
    run = trainer(strategy="ddp", devices=2, max_steps=steps, max_epochs=-1, callbacks=[sam, recorder],
                  accumulate_grad_batches=accumulate if dropin else 1)
    run.fit(module, ResumableDataLoader(classification_data(), batch_size=4 // accumulate, shuffle=False))
    rank = run.global_rank
    torch.manual_seed(100 + rank)  # distinct RNG states per rank
    rng = sam.state_dict()["rng"]  # a collective: every rank's state
    own_rng_saved = torch.equal(rng[rank]["cpu"], torch.get_rng_state())
    torch.save(
        {"weights": recorder.weights, "first_grads": recorder.first_grads, "resyncs": sam.resyncs,
         "world_size": run.world_size, "allreduces_per_step": recorder.allreduces_per_step,
         "rng_entries": len(rng), "own_rng_saved": own_rng_saved},
        Path(out_dir) / f"{mode}_rank{rank}.pt",
    )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
