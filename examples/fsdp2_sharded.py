"""νSAM on a model sharded with FSDP2 (Lightning's ModelParallelStrategy).

Each transformer block is wrapped with ``fully_shard`` in ``configure_model`` (ImageClassifier
does this when the strategy provides a device mesh). The perturbation then works on each rank's
rows of every weight matrix and all-reduces only ``m + 1`` numbers per matrix per step.

    python examples/fsdp2_sharded.py --devices 4                          # GPUs
    python examples/fsdp2_sharded.py --accelerator cpu --devices 2 --tiny  # CPU, gloo

Compare the peak memory of the methods with ``--method adamw|sam|nusam``.
"""

from __future__ import annotations

import argparse

import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy

from lightning_nusam import SAM, NuSAM
from lightning_nusam.data import CIFARDataModule
from lightning_nusam.models import ImageClassifier


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--accelerator", default="gpu")
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--method", choices=["adamw", "sam", "nusam"], default="nusam")
    parser.add_argument("--npz-dir", default=None, help="local CIFAR-10 .npz folder (else torchvision)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--tiny", action="store_true", help="a 4-block ViT instead of ViT-L/4")
    args = parser.parse_args()

    kwargs = {"depth": 4, "embed_dim": 128, "num_heads": 4} if args.tiny else {}
    model = ImageClassifier("vit_large_patch16_224", num_classes=10, img_size=32, patch_size=4,
                            model_kwargs=kwargs)
    data = CIFARDataModule(npz_dir=args.npz_dir, batch_size=32, num_workers=2, subset=32 * args.steps * 4)
    callbacks = {"adamw": [], "sam": [SAM(rho=0.05)], "nusam": [NuSAM(rho=0.1)]}[args.method]
    trainer = L.Trainer(
        accelerator=args.accelerator,
        devices=args.devices,
        strategy=ModelParallelStrategy(data_parallel_size=args.devices, tensor_parallel_size=1),
        precision="bf16-mixed",
        max_steps=args.steps,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        limit_val_batches=0,
    )
    trainer.fit(model, datamodule=data)
    if torch.cuda.is_available() and args.accelerator == "gpu":
        peak = torch.cuda.max_memory_allocated() / 2**20
        print(f"rank {trainer.global_rank}: {args.method} peak CUDA memory {peak:.0f} MiB")
    if callbacks:
        perturbation = callbacks[0].perturbation
        held_rank, held_total = perturbation.held_numel(), perturbation.held_numel(total=True)
        if trainer.is_global_zero:
            print(f"{args.method}: the perturbation holds {held_rank:,} numbers on rank 0, "
                  f"{held_total:,} over all ranks")


if __name__ == "__main__":
    main()
