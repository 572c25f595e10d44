"""Removing ``ε`` exactly from low-precision weights without keeping a copy of them.

For a bf16/fp16 weight ``w``, ``perturb`` stores ``w' = round(w + e)`` and ``restore`` computes
``round(w' − e)``, with ``e`` the perturbation rounded to the weight's dtype. Both roundings are
to nearest, so for almost every entry the second one lands back on ``w``; it misses only where
``w + e`` left the binade of ``w`` (or crossed zero) or where ``|e|`` dwarfs ``|w|``, because the
spacing of representable numbers at ``w'`` is then coarser than at ``w``. Those entries are
found at ``perturb()`` time by doing the subtraction once in advance, and only their positions
and original values are kept (:class:`RoundingExceptions`); ``restore`` subtracts ``e`` and
writes them back, so the weights are bit-identical after any number of cycles. Nothing of this
waits for the device: the positions go into a buffer of a budgeted size (:class:`ExceptionBudget`),
and a step whose exceptions do not fit leaves that weight unperturbed (so still exact) while the
budget grows for the next steps.

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


def restores_exactly(exact_restore: bool | None, dtype: torch.dtype) -> bool:
    """Whether a weight of ``dtype`` is restored exactly: as asked (``True``/``False``), or by
    default (``None``) when it is bf16/fp16, where a subtraction visibly rounds. Chosen per
    weight, so that a bf16 body with an fp32 head restores the bf16 matrices exactly."""
    if exact_restore not in (None, True, False):
        raise ValueError(f"`exact_restore` must be None, True or False, got {exact_restore!r}")
    if exact_restore is not None:
        return exact_restore
    return dtype in LOW_PRECISION_DTYPES


def resolve_exact_restore(exact_restore: bool | None, selected: Iterable[SelectedParameter]) -> bool:
    """Whether every selected weight is restored exactly (see :func:`restores_exactly`)."""
    return all(restores_exactly(exact_restore, item.parameter.dtype) for item in selected)


#: Share of a weight's entries whose rounding exceptions can be kept at first (with at least
#: ``MIN_EXCEPTIONS``): measured about 1.2-1.4 % for bf16 ViT weights at ρ = 0.1
#: (``benchmarks/low_precision_restore.py``), 4 % for the worst matrix of a ViT-S at ρ = 0.2.
EXCEPTION_SHARE = 1 / 32
MIN_EXCEPTIONS = 64


class ExceptionBudget:
    """How many rounding exceptions of one weight are kept, grown from what past steps needed.

    The count of a step is copied to host memory without waiting for the device (a copy still
    in flight is read as the previous value); when a step needed more than its budget, that
    weight was left unperturbed for the step (still exact) and the budget grows to 1.25× the
    count from the next step on.
    """

    def __init__(self, numel: int, device: torch.device, needed: torch.Tensor | None = None) -> None:
        self.numel = numel
        self.capacity = min(numel, max(MIN_EXCEPTIONS, -(-numel // int(1 / EXCEPTION_SHARE))))
        if needed is None:
            needed = torch.zeros((), dtype=torch.int64, pin_memory=pinned_host_memory(device))
        #: the count of the last step, in host memory (an element of a buffer that several
        #: budgets share, when given: their counts then arrive in one copy)
        self.needed = needed
        self.overflows = 0

    def grow(self) -> int:
        """The budget for the next step, grown if the last step's count (as far as it has
        arrived in host memory) did not fit."""
        needed = int(self.needed.numpy())  # host memory: no device synchronisation
        if needed > self.capacity:
            self.overflows += 1
            self.capacity = min(self.numel, needed + needed // 4)
        return self.capacity

    def record(self, count: torch.Tensor) -> None:
        self.needed.copy_(count, non_blocking=True)


def pinned_host_memory(device: torch.device) -> bool:
    """Whether host buffers that receive counts from ``device`` are pinned (a copy into them
    does not wait for the device then)."""
    return device.type == "cuda" and torch.cuda.is_available()


@dataclass
class RoundingExceptions:
    """Flat positions (row-major, in the weight's logical shape) and original values of the
    entries that ``round(round(w + ε) − ε)`` would not give back, in buffers of a fixed size
    (an :class:`ExceptionBudget`; unused slots repeat position 0 with its original value, which
    writing back leaves as it is), and ``added``: whether ``ε`` was added (a 0-d bool tensor,
    false when the exceptions did not fit, so that the weight was left as it was)."""

    index: torch.Tensor
    value: torch.Tensor
    added: torch.Tensor

    def tensors(self) -> Iterator[torch.Tensor]:
        yield self.index
        yield self.value


def add_removably(weight: torch.Tensor, epsilon: torch.Tensor,
                  budget: ExceptionBudget | None = None) -> RoundingExceptions:
    """``weight ← round(weight + e)`` in place, ``e = round(ε)`` in the weight's dtype; returns what
    :func:`remove_exactly` needs.

    ``epsilon`` has the weight's logical shape. No copy of the weight is kept: only the entries
    whose subtraction would round to another value (about 1.4 % of them for bf16 ViT weights
    at ρ = 0.1; see ``benchmarks/low_precision_restore.py``), found with ``nonzero_static`` into
    a buffer of the size ``budget`` gives, so that nothing waits for the device. When they do
    not fit the weight is left unperturbed for this step (``added`` is false), which keeps it
    exact, and the budget grows for the next steps.
    """
    e = epsilon.to(weight.dtype)
    perturbed = weight + e
    mismatch = torch.ne(perturbed - e, weight).reshape(-1)
    if budget is None:
        budget = ExceptionBudget(weight.numel(), weight.device)
    capacity = budget.grow()
    flat = _positions(mismatch, capacity)
    count = mismatch.sum()
    budget.record(count)
    added = count <= capacity
    values = weight.reshape(-1).index_select(0, flat)  # row-major order, whatever the strides
    index_dtype = torch.int32 if weight.numel() < 2**31 else torch.int64
    exceptions = RoundingExceptions(flat.to(index_dtype), values, added)
    torch.where(added, perturbed, weight, out=weight)
    return exceptions


def _positions(mask: torch.Tensor, capacity: int) -> torch.Tensor:
    """The first ``capacity`` positions of ``mask``'s true entries, padded with 0, without waiting
    for the device (``nonzero_static``; a torch without it on this device uses ``nonzero``)."""
    try:
        return torch.nonzero_static(mask, size=capacity, fill_value=0).squeeze(1)
    except (NotImplementedError, RuntimeError):  # pragma: no cover - older torch on an accelerator
        found = mask.nonzero().squeeze(1)[:capacity]
        return torch.cat([found, found.new_zeros(capacity - found.numel())])


def remove_exactly(weight: torch.Tensor, epsilon: torch.Tensor, exceptions: RoundingExceptions) -> None:
    """Undo :func:`add_removably` with the same ``epsilon``: the weight is bit-identical again."""
    weight.sub_(epsilon.to(weight.dtype).mul_(exceptions.added))
    index = exceptions.index.long()
    if weight.is_contiguous():
        weight.view(-1).index_copy_(0, index, exceptions.value)
    else:
        weight.index_put_(torch.unravel_index(index, weight.shape), exceptions.value)
