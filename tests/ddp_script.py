"""Two-process DDP run over gloo on CPU, launched by test_ddp.py (Lightning re-runs this file
as rank 1). Saves each rank's weights after every step and the first-pass gradients."""

import sys
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback

from lightning_helpers import Classifier, classification_data, trainer
from lightning_nusam import NuSAM
from lightning_nusam.data import ResumableDataLoader


class Recorder(Callback):
    """Per step: the first-pass gradients (seen by perturb()) and the weights after the step."""

    def __init__(self, sam):
        self.sam, self.first_grads, self.weights = sam, [], []

    def on_train_start(self, trainer, pl_module):
        perturb = self.sam.perturbation.perturb

        def recording_perturb():
            self.first_grads.append([p.grad.detach().clone() for p in pl_module.parameters()])
            perturb()

        self.sam.perturbation.perturb = recording_perturb

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.weights.append([p.detach().clone() for p in pl_module.parameters()])


def main(out_dir: str, mode: str, steps: int) -> None:
    sync = mode == "sync"
    resync_every = {"sync": 0, "msam": 3, "msam-noresync": 0}[mode]
    sam = NuSAM(rho=0.5, sync_first_pass=sync, resync_every=resync_every)
    recorder = Recorder(sam)
    module = Classifier()
    run = trainer(strategy="ddp", devices=2, max_steps=steps, max_epochs=-1, callbacks=[sam, recorder])
    run.fit(module, ResumableDataLoader(classification_data(), batch_size=4, shuffle=False))
    rank = run.global_rank
    torch.save(
        {"weights": recorder.weights, "first_grads": recorder.first_grads, "resyncs": sam.resyncs,
         "world_size": run.world_size},
        Path(out_dir) / f"{mode}_rank{rank}.pt",
    )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
