"""Data: the embedded digits, CIFAR-10/100, text classification (GLUE), label noise, and a
resumable data order."""

from lightning_nusam.data.datamodules import (
    CIFAR_STATS,
    CIFARDataModule,
    DigitsDataModule,
    ImageArrayDataset,
    load_digits,
    load_npz,
)
from lightning_nusam.data.label_noise import NoiseFit, NoisyLabels, measure_noise_fit, symmetric_label_noise
from lightning_nusam.data.resumable import ResumableDataLoader, ResumableSampler
from lightning_nusam.data.text import GLUE_TASKS, GlueTask, TextClassificationDataModule

__all__ = [
    "CIFAR_STATS",
    "GLUE_TASKS",
    "CIFARDataModule",
    "DigitsDataModule",
    "GlueTask",
    "ImageArrayDataset",
    "NoiseFit",
    "NoisyLabels",
    "ResumableDataLoader",
    "ResumableSampler",
    "TextClassificationDataModule",
    "load_digits",
    "load_npz",
    "measure_noise_fit",
    "symmetric_label_noise",
]
