"""Symmetric label noise: the standard setting in which a flat-minimum seeker resists memorising.

A fixed ``fraction`` of the training labels is replaced, each by a class drawn uniformly from
the *other* ``num_classes − 1`` classes, so exactly ``round(fraction · N)`` labels are wrong.
The choice depends only on the seed, never on the global RNG; evaluation labels stay clean.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


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
