"""Data: the embedded digits, CIFAR-10/100, and a resumable data order."""

from lightning_nusam.data.datamodules import (
    CIFAR_STATS,
    CIFARDataModule,
    DigitsDataModule,
    ImageArrayDataset,
    load_npz,
)
from lightning_nusam.data.resumable import ResumableDataLoader, ResumableSampler

__all__ = [
    "CIFAR_STATS",
    "CIFARDataModule",
    "DigitsDataModule",
    "ImageArrayDataset",
    "ResumableDataLoader",
    "ResumableSampler",
    "load_npz",
]
