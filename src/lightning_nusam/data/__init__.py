"""Data: the embedded digits, CIFAR-10/100, text classification (GLUE), label noise, and a
resumable data order.

The names are imported on first use (PEP 562), so that ``lightning_nusam.data.resumable`` and
``lightning_nusam.data.label_noise`` (pure PyTorch) load without torchvision or Lightning.

Example:
    >>> import lightning_nusam.data
    >>> dir(lightning_nusam.data) == sorted(lightning_nusam.data.__all__)
    True
"""

from __future__ import annotations

import importlib as _importlib
from typing import TYPE_CHECKING

#: public name → the module that defines it
_LAZY = {
    "CIFAR_STATS": "lightning_nusam.data.datamodules",
    "CIFARDataModule": "lightning_nusam.data.datamodules",
    "DigitsDataModule": "lightning_nusam.data.datamodules",
    "ImageArrayDataset": "lightning_nusam.data.datamodules",
    "load_digits": "lightning_nusam.data.datamodules",
    "load_npz": "lightning_nusam.data.datamodules",
    "NoiseFit": "lightning_nusam.data.label_noise",
    "NoisyLabels": "lightning_nusam.data.label_noise",
    "measure_noise_fit": "lightning_nusam.data.label_noise",
    "symmetric_label_noise": "lightning_nusam.data.label_noise",
    "ResumableDataLoader": "lightning_nusam.data.resumable",
    "ResumableSampler": "lightning_nusam.data.resumable",
    "GLUE_TASKS": "lightning_nusam.data.text",
    "GlueTask": "lightning_nusam.data.text",
    "TextClassificationDataModule": "lightning_nusam.data.text",
}

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

if TYPE_CHECKING:
    from lightning_nusam.data.datamodules import (
        CIFAR_STATS,
        CIFARDataModule,
        DigitsDataModule,
        ImageArrayDataset,
        load_digits,
        load_npz,
    )
    from lightning_nusam.data.label_noise import (
        NoiseFit,
        NoisyLabels,
        measure_noise_fit,
        symmetric_label_noise,
    )
    from lightning_nusam.data.resumable import ResumableDataLoader, ResumableSampler
    from lightning_nusam.data.text import GLUE_TASKS, GlueTask, TextClassificationDataModule


def __getattr__(name: str) -> object:
    if name not in _LAZY:
        raise AttributeError(f"module 'lightning_nusam.data' has no attribute {name!r}")
    value = getattr(_importlib.import_module(_LAZY[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
