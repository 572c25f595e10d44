"""LightningModules that train with the sharpness-aware callbacks (TextClassifier needs the
``text`` extra: ``pip install "lightning-nusam[text]"``)."""

from lightning_nusam.models.classifier import ImageClassifier, warmup_cosine_schedule
from lightning_nusam.models.text import TextClassifier, warmup_linear_schedule

__all__ = ["ImageClassifier", "TextClassifier", "warmup_cosine_schedule", "warmup_linear_schedule"]
