"""LightningModules that train with the sharpness-aware callbacks."""

from lightning_nusam.models.classifier import ImageClassifier, warmup_cosine_schedule

__all__ = ["ImageClassifier", "warmup_cosine_schedule"]
