"""Data: the embedded digits, CIFAR-10/100, label noise, and a resumable data order."""

from lightning_nusam.data.datamodules import (
    CIFAR_STATS,
    CIFARDataModule,
    DigitsDataModule,
    ImageArrayDataset,
    load_npz,
)
from lightning_nusam.data.label_noise import NoisyLabels, symmetric_label_noise
from lightning_nusam.data.resumable import ResumableDataLoader, ResumableSampler

__all__ = [
    "CIFAR_STATS",
    "CIFARDataModule",
    "DigitsDataModule",
    "ImageArrayDataset",
    "NoisyLabels",
    "ResumableDataLoader",
    "ResumableSampler",
    "load_npz",
    "symmetric_label_noise",
]
