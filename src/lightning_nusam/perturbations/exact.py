"""Removing ``ε`` exactly from low-precision weights without keeping a copy of them.

For a bf16/fp16 weight ``w``, ``perturb`` stores ``w' = round(w + e)`` and ``restore`` computes
``round(w' − e)``, with ``e`` the perturbation rounded to the weight's dtype. Both roundings are
to nearest, so for almost every entry the second one lands back on ``w``; it misses only where
``w + e`` left the binade of ``w`` (or crossed zero) or where ``|e|`` dwarfs ``|w|``, because the
spacing of representable numbers at ``w'`` is then coarser than at ``w``. Those entries are
found at ``perturb()`` time by doing the subtraction once in advance, and only their positions
and original values are kept (:class:`RoundingExceptions`); ``restore`` subtracts ``e`` and
writes them back, so the weights are bit-identical after any number of cycles.

``ε`` is formed in fp32 and rounded once to the weight's dtype (``e``); ``w + e`` and ``w' − e`` are
each rounded once, on both sides, so the subtraction that ``restore`` performs is exactly the one
``perturb`` checked.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from lightning_nusam.perturbations.selection import SelectedParameter

#: Weight dtypes whose ``w + ε − ε`` rounds visibly (8- and 11-bit significands).
LOW_PRECISION_DTYPES = (torch.float16, torch.bfloat16)


def resolve_exact_restore(exact_restore: bool | None, selected: Iterable[SelectedParameter]) -> bool:
    """Whether a perturbation restores exactly: as asked (``True``/``False``), or by default
    (``None``) when every selected weight is bf16/fp16, where a subtraction visibly rounds."""
    if exact_restore not in (None, True, False):
        raise ValueError(f"`exact_restore` must be None, True or False, got {exact_restore!r}")
    if exact_restore is not None:
        return exact_restore
    return {item.parameter.dtype for item in selected} <= set(LOW_PRECISION_DTYPES)


@dataclass
class RoundingExceptions:
    """Flat positions (row-major, in the weight's logical shape) and original values of the
    entries that ``round(round(w + ε) − ε)`` would not give back."""

    index: torch.Tensor
    value: torch.Tensor

    def tensors(self) -> Iterator[torch.Tensor]:
        yield self.index
        yield self.value


def add_removably(weight: torch.Tensor, epsilon: torch.Tensor) -> RoundingExceptions:
    """``weight ← round(weight + e)`` in place, ``e = round(ε)`` in the weight's dtype; returns what
    :func:`remove_exactly` needs.

    ``epsilon`` has the weight's logical shape. No copy of the weight is kept: only the entries
    whose subtraction would round to another value (about 1.4 % of them for bf16 ViT weights
    at ρ = 0.1; see ``benchmarks/low_precision_restore.py``).
    """
    e = epsilon.to(weight.dtype)
    perturbed = weight + e
    mismatch = torch.ne(perturbed - e, weight)
    flat = mismatch.reshape(-1).nonzero().squeeze(1)  # the one scan of the mask (row-major)
    values = weight.reshape(-1).index_select(0, flat)  # row-major order, whatever the strides
    index_dtype = torch.int32 if weight.numel() < 2**31 else torch.int64
    exceptions = RoundingExceptions(flat.to(index_dtype), values)
    weight.copy_(perturbed)
    return exceptions


def remove_exactly(weight: torch.Tensor, epsilon: torch.Tensor, exceptions: RoundingExceptions) -> None:
    """Undo :func:`add_removably` with the same ``epsilon``: the weight is bit-identical again."""
    weight.sub_(epsilon.to(weight.dtype))
    if not exceptions.index.numel():
        return
    index = exceptions.index.long()
    if weight.is_contiguous():
        weight.view(-1).index_copy_(0, index, exceptions.value)
    else:
        weight.index_put_(torch.unravel_index(index, weight.shape), exceptions.value)
