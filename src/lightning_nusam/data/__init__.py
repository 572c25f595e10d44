"""Data loading: a resumable data order (and, later, data modules)."""

from lightning_nusam.data.resumable import ResumableDataLoader, ResumableSampler

__all__ = ["ResumableDataLoader", "ResumableSampler"]
