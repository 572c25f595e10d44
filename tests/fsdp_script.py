"""Two-process FSDP2 (Lightning's ModelParallelStrategy, gloo, CPU), launched by test_fsdp.py.

Modes: ``train`` (νSAM, 32-true, checkpoints every 3 steps; records full weights per step,
the communication of each perturb() and any full-tensor materialisation), ``resume`` (from the
step-3 checkpoint of ``train``), ``bf16`` (bf16-mixed trains), ``sam`` and ``samon`` (the ℓ2
methods, 32-true), ``dropin`` (νSAM driven by the callback on an automatic-optimization
module). Results go to OUT/<mode>_rank<r>.pt.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from helpers import Classifier, PlainClassifier, classification_data, trainer
from lightning_nusam import SAM, SAMON, NuSAM
from lightning_nusam.data import ResumableDataLoader


class ShardedClassifier(Classifier):
    def configure_model(self):
        mesh = self.device_mesh["data_parallel"]
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)


class ShardedPlainClassifier(PlainClassifier):
    """The drop-in's module: automatic optimization, sharded the same way."""

    configure_model = ShardedClassifier.configure_model


class Recorder(Callback):
    """Per step: full weights after the step; per perturb(): numbers all-reduced, full-tensor calls."""

    def __init__(self, sam):
        self.sam, self.weights, self.reduced_numel, self.materialised = sam, [], [], 0

    def on_train_start(self, trainer, pl_module):
        perturbation = self.sam.perturbation
        perturb = perturbation.perturb

        def watched_perturb(*args, **kwargs):
            numel = []
            original_all_reduce = dist.all_reduce
            originals = {name: getattr(DTensor, name) for name in ("full_tensor", "redistribute")}

            def counting_all_reduce(tensor, *args, **kwargs):
                numel.append(tensor.numel())
                return original_all_reduce(tensor, *args, **kwargs)

            def forbidden(name):
                def call(self_, *args, **kwargs):
                    self.materialised += 1
                    return originals[name](self_, *args, **kwargs)
                return call

            dist.all_reduce = counting_all_reduce
            for name in originals:
                setattr(DTensor, name, forbidden(name))
            try:
                perturb(*args, **kwargs)
            finally:
                dist.all_reduce = original_all_reduce
                for name, original in originals.items():
                    setattr(DTensor, name, original)
            self.reduced_numel.append(sum(numel))

        perturbation.perturb = watched_perturb

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.weights.append([p.full_tensor().detach().clone() for p in pl_module.parameters()])


def main(out_dir: str, mode: str) -> None:
    out = Path(out_dir)
    sam = {"sam": SAM(rho=0.1), "samon": SAMON(rho=0.5)}.get(mode, NuSAM(rho=0.5))
    recorder = Recorder(sam)
    callbacks = [sam, recorder]
    if mode == "train":
        callbacks.append(ModelCheckpoint(dirpath=out / "ckpt", every_n_train_steps=3, save_top_k=-1))
    run = trainer(
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        devices=2, max_steps=6, max_epochs=-1, callbacks=callbacks, enable_checkpointing=mode == "train",
        precision="bf16-mixed" if mode == "bf16" else "32-true",
    )
    module_class = ShardedPlainClassifier if mode == "dropin" else ShardedClassifier
    module = module_class(optimizer="adamw" if mode == "bf16" else "sgd")
    ckpt = str(out / "ckpt" / "epoch=0-step=3.ckpt") if mode == "resume" else None
    run.fit(module, ResumableDataLoader(classification_data(), batch_size=4, shuffle=False), ckpt_path=ckpt)
    perturbation = sam.perturbation
    info = {
        "weights": recorder.weights,
        "reduced_numel": recorder.reduced_numel,
        "materialised": recorder.materialised,
        "held_rank": perturbation.held_numel(),
        "held_total": perturbation.held_numel(total=True),
        "local_u": {n: u.clone() for n, (u, _) in perturbation.singular_vectors().items()}
        if hasattr(perturbation, "singular_vectors") else {},
        "matrix_shapes": {n: tuple(p.shape) for n, p in zip(perturbation.parameter_names,
                                                           perturbation.parameters, strict=True)},
        "loss": float(next(run.callback_metrics[k] for k in ("train/loss_epoch", "train/loss_step",
                                                              "train_loss") if k in run.callback_metrics)),
        "world_size": run.world_size,
    }
    torch.save(info, out / f"{mode}_rank{run.global_rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
