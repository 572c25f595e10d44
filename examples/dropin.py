"""The callback alone: νSAM for an ordinary LightningModule, with nothing changed in the module.

Run: ``python examples/dropin.py [--epochs 6]`` (scikit-learn's bundled digits, no download).
"""

from __future__ import annotations

import argparse

import lightning as L
import torch
from torch import nn

from lightning_nusam import NuSAM
from lightning_nusam.data import DigitsDataModule


class Classifier(L.LightningModule):
    def __init__(self, lr: float = 3e-3) -> None:
        super().__init__()
        self.lr = lr
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 10))

    def training_step(self, batch, batch_idx):
        images, labels = batch
        return nn.functional.cross_entropy(self.net(images), labels)

    def test_step(self, batch, batch_idx):
        images, labels = batch
        self.log("test/acc1", (self.net(images).argmax(1) == labels).float().mean())

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def main(epochs: int = 6) -> float:
    L.seed_everything(0)
    trainer = L.Trainer(max_epochs=epochs, gradient_clip_val=1.0, accumulate_grad_batches=2,
                        callbacks=[NuSAM(rho=0.1, start_fraction=0.1)], logger=False,
                        enable_checkpointing=False)
    model, data = Classifier(), DigitsDataModule(batch_size=32)
    trainer.fit(model, datamodule=data)
    accuracy = trainer.test(model, datamodule=data, verbose=False)[0]["test/acc1"]
    print(f"test accuracy {accuracy:.3f}")
    return accuracy


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6)
    main(parser.parse_args().epochs)
