"""Removing ``ε`` exactly from low-precision weights without keeping a copy of them.

For a bf16/fp16 weight ``w``, ``perturb`` stores ``w' = round(w + ε)`` and ``restore`` computes
``round(w' − ε)``. Both roundings are to nearest, so for almost every entry the second one lands
back on ``w``; it misses only where ``w + ε`` left the binade of ``w`` (or crossed zero) or where
``|ε|`` dwarfs ``|w|``, because the spacing of representable numbers at ``w'`` is then coarser than
at ``w``. Those entries are found at ``perturb()`` time by doing the subtraction once in advance,
and only their positions and original values are kept (:class:`RoundingExceptions`); ``restore``
subtracts ``ε`` and writes them back, so the weights are bit-identical after any number of cycles.

The arithmetic is in fp32 and rounded once per operation, on both sides, so the subtraction that
``restore`` performs is exactly the one ``perturb`` checked.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

#: Weight dtypes whose ``w + ε − ε`` rounds visibly (8- and 11-bit significands).
LOW_PRECISION_DTYPES = (torch.float16, torch.bfloat16)


@dataclass
class RoundingExceptions:
    """Flat positions (row-major, in the weight's logical shape) and original values of the
    entries that ``round(round(w + ε) − ε)`` would not give back."""

    index: torch.Tensor
    value: torch.Tensor

    def tensors(self) -> Iterator[torch.Tensor]:
        yield self.index
        yield self.value


def _subtract(weight: torch.Tensor, epsilon: torch.Tensor) -> torch.Tensor:
    return (weight.float() - epsilon).to(weight.dtype)


def add_removably(weight: torch.Tensor, epsilon: torch.Tensor) -> RoundingExceptions:
    """``weight ← round(weight + ε)`` in place; returns what :func:`remove_exactly` needs.

    ``epsilon`` is fp32 with the weight's logical shape. No copy of the weight is kept: only the
    entries whose subtraction would round to another value (typically well under 1 %).
    """
    perturbed = (weight.float() + epsilon).to(weight.dtype)
    mismatch = _subtract(perturbed, epsilon) != weight
    flat = mismatch.reshape(-1).nonzero().squeeze(1)
    index_dtype = torch.int32 if weight.numel() < 2**31 else torch.int64
    exceptions = RoundingExceptions(flat.to(index_dtype), weight[mismatch].clone())
    weight.copy_(perturbed)
    return exceptions


def remove_exactly(weight: torch.Tensor, epsilon: torch.Tensor, exceptions: RoundingExceptions) -> None:
    """Undo :func:`add_removably` with the same ``epsilon``: the weight is bit-identical again."""
    weight.copy_(_subtract(weight, epsilon))
    if exceptions.index.numel():
        position = torch.unravel_index(exceptions.index.long(), weight.shape)
        weight.index_put_(position, exceptions.value)
