"""Your own LightningModule with νSAM: mix in SAMMixin, write compute_loss, add the callback.

A small convolutional network on scikit-learn's 8×8 digits (no download). Its convolution
kernels are perturbed too (``include_conv=True`` treats each as an ``(out, in·kh·kw)`` matrix).
Run: ``python examples/custom_module.py [--epochs 6]``.
"""

from __future__ import annotations

import argparse

import lightning as L
import torch
from torch import nn

from lightning_nusam import NuSAM, SAMMixin
from lightning_nusam.data import DigitsDataModule


class SmallConvNet(SAMMixin, L.LightningModule):
    def __init__(self, lr: float = 3e-3) -> None:
        super().__init__(gradient_clip_val=5.0)  # the mixin's clipping (Trainer's is refused)
        self.lr = lr
        self.net = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1, stride=2), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Flatten(), nn.Linear(32 * 4 * 4, 10),
        )

    def compute_loss(self, batch, batch_idx):
        images, labels = batch
        logits = self.net(images)
        return {
            "loss": nn.functional.cross_entropy(logits, labels),
            "acc1": (logits.detach().argmax(1) == labels).float().mean(),  # logged as train/acc1
        }

    def test_step(self, batch, batch_idx):
        images, labels = batch
        self.log("test/acc1", (self.net(images).argmax(1) == labels).float().mean())

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.lr)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=self.lr, total_steps=self.trainer.estimated_stepping_batches
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def main(epochs: int = 6) -> float:
    L.seed_everything(0)
    trainer = L.Trainer(
        max_epochs=epochs,
        callbacks=[NuSAM(rho=0.1, include_conv=True, start_epoch=1)],
        logger=False,
        enable_checkpointing=False,
    )
    model, data = SmallConvNet(), DigitsDataModule(batch_size=64)
    trainer.fit(model, datamodule=data)
    accuracy = trainer.test(model, datamodule=data, verbose=False)[0]["test/acc1"]
    print(f"test accuracy {accuracy:.3f}")
    return accuracy


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6)
    main(parser.parse_args().epochs)
