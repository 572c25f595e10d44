"""Symmetric label noise: the standard setting in which a flat-minimum seeker resists memorising.

A fixed ``fraction`` of the training labels is replaced, each by a class drawn uniformly from
the *other* ``num_classes − 1`` classes, so exactly ``round(fraction · N)`` labels are wrong.
The choice depends only on the seed, never on the global RNG; evaluation labels stay clean.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class NoisyLabels:
    """Training labels after corruption, with what is needed to measure memorisation.

    Attributes:
        labels: the labels the model is trained on (``clean`` with the flipped entries replaced).
        clean: the original labels.
        flipped: boolean mask of the entries that were replaced (``labels != clean`` there).
    """

    labels: torch.Tensor
    clean: torch.Tensor
    flipped: torch.Tensor

    @property
    def fraction(self) -> float:
        return float(self.flipped.float().mean()) if len(self.flipped) else 0.0

    def fit(self, predictions: torch.Tensor) -> NoiseFit:
        """How much of this training set the predicted classes (one per example, in order) fit."""
        trained_on = predictions == self.labels
        return NoiseFit(
            clean=float(trained_on[~self.flipped].float().mean()),
            memorised=float(trained_on[self.flipped].float().mean()),
            true=float((predictions == self.clean)[self.flipped].float().mean()),
        )


@dataclass(frozen=True)
class NoiseFit:
    """Accuracies (in [0, 1]) of a model on a training set with label noise.

    Attributes:
        clean: on the examples whose label was kept.
        memorised: on the flipped examples, against the wrong labels trained on (memorised noise).
        true: on the flipped examples, against their true labels.
    """

    clean: float
    memorised: float
    true: float


@torch.no_grad()
def measure_noise_fit(model: nn.Module, loader: Iterable[Any], noisy: NoisyLabels) -> NoiseFit:
    """Classify the training examples of ``loader`` (``(inputs, label)`` batches in the order of
    ``noisy``, without augmentation, e.g. ``datamodule.train_eval_dataloader()``) and measure
    :class:`NoiseFit`. The model is evaluated in eval mode and left in the mode it was in."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        predictions = torch.cat([model(inputs.to(device)).argmax(1).cpu() for inputs, _ in loader])
    finally:
        model.train(was_training)
    return noisy.fit(predictions)


def symmetric_label_noise(
    labels: torch.Tensor, fraction: float, num_classes: int, seed: int = 0
) -> NoisyLabels:
    """Replace ``round(fraction · len(labels))`` labels, chosen at random, by another class.

    Example:
        >>> labels = torch.arange(10) % 5
        >>> noisy = symmetric_label_noise(labels, fraction=0.4, num_classes=5, seed=0)
        >>> int(noisy.flipped.sum()), bool((noisy.labels[noisy.flipped] != labels[noisy.flipped]).all())
        (4, True)
    """
    if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not 0 <= fraction <= 1:
        raise ValueError(f"`label_noise` must be a fraction in [0, 1], got {fraction!r}")
    if num_classes < 2 and fraction > 0:
        raise ValueError(f"label noise needs at least 2 classes, got num_classes={num_classes}")
    labels = torch.as_tensor(labels).long()
    generator = torch.Generator().manual_seed(int(seed))
    count = round(fraction * len(labels))
    chosen = torch.randperm(len(labels), generator=generator)[:count]
    # An offset in 1..C-1 added modulo C gives every other class with probability 1/(C-1).
    offsets = torch.randint(1, max(num_classes, 2), (count,), generator=generator)
    noisy = labels.clone()
    noisy[chosen] = (labels[chosen] + offsets) % num_classes
    flipped = torch.zeros(len(labels), dtype=torch.bool)
    flipped[chosen] = True
    return NoisyLabels(noisy, labels, flipped)
