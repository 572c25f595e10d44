"""The contract every sharpness-aware perturbation follows.

A perturbation reads the first-pass gradients (``p.grad``), adds ``ε`` to the selected weights
in place (:meth:`Perturbation.perturb`), and later removes exactly that ``ε`` in place
(:meth:`Perturbation.restore`). What it keeps in between is reported by :meth:`held_numel`.

``perturb()`` is two steps that a one-pass step uses apart (see :attr:`Perturbation.supports_one_pass`):
:meth:`~Perturbation.estimate` reads the gradients and keeps the direction of ``ε`` (νSAM: the
singular vectors), and :meth:`~Perturbation.apply` adds ``ε`` of a given radius from that
direction, without reading any gradient.
"""

from __future__ import annotations

import abc
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from lightning_nusam.checks import check_rho
from lightning_nusam.perturbations.selection import SelectedParameter
from lightning_nusam.perturbations.sharding import RowSharding, all_reduce_sum, local, row_sharding

#: τ of Algorithm 2: keeps the normalisations finite for a zero gradient.
DEFAULT_TAU = 1e-12


class Perturbation(abc.ABC):
    """Base class: step bookkeeping, the perturb/restore protocol and memory accounting.

    Subclasses implement :meth:`_estimate`, :meth:`_apply` and :meth:`_restore` and list the
    tensors they keep in :meth:`held_tensors`. Counters: ``steps`` (perturbations applied) and
    ``skipped_steps`` (steps whose gradients were not finite, e.g. an fp16 overflow, so
    nothing was added).
    """

    #: Whether :meth:`restore` returns every weight bit-exactly (it copies them back, or fixes
    #: the entries that a subtraction would round elsewhere) rather than subtracting ``ε``,
    #: which can leave a last-bit rounding (see the m-SAM re-synchronisation of the callbacks).
    exact_restore: bool = False
    #: Whether :meth:`estimate` and :meth:`apply` can be used apart (a one-pass step applies
    #: the direction estimated from the previous step's gradient). The ℓ2 methods cannot: their
    #: direction is the whole gradient, which would have to be kept between steps.
    supports_one_pass: bool = False

    def __init__(self, model: nn.Module, rho: float, selected: list[SelectedParameter]) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
        self.rho = check_rho(rho)
        self._selected = selected
        # Per selected parameter: its row sharding under FSDP2 (a DTensor), None when replicated.
        self._shardings = [row_sharding(item.name, item.parameter) for item in selected]
        self._is_perturbed = False
        self._applied_rho = 0.0
        self.steps = 0
        self._skipped = 0

    # ----------------------------------------------------------------------------- protocol
    @property
    def is_perturbed(self) -> bool:
        """Whether ``ε`` is currently added to the weights."""
        return self._is_perturbed

    @property
    def parameter_names(self) -> list[str]:
        """Names (as in ``model.named_parameters()``) of the parameters this perturbation may touch."""
        return [item.name for item in self._selected]

    @property
    def parameters(self) -> list[nn.Parameter]:
        return [item.parameter for item in self._selected]

    @property
    def skipped_steps(self) -> int:
        """Steps whose gradients were not finite, so that no perturbation was applied."""
        return int(self._skipped)

    @property
    def skipped_count(self) -> torch.Tensor:
        """``skipped_steps`` as a float tensor, without a host synchronisation (for logging)."""
        return torch.as_tensor(self._skipped).float()

    @property
    def has_direction(self) -> bool:
        """Whether an :meth:`estimate` has left a direction for :meth:`apply`."""
        return False

    @property
    def applied_rho(self) -> float:
        """The radius of the ``ε`` currently added (0 when none is)."""
        return self._applied_rho if self._is_perturbed else 0.0

    @torch.no_grad()
    def perturb(self, rho: float | None = None) -> None:
        """Read ``p.grad`` of the selected parameters and add ``ε`` to them in place.

        ``rho`` overrides :attr:`rho` for this step only (a radius schedule); :meth:`restore`
        removes exactly what was added whatever :attr:`rho` is then.
        """
        self._check_not_perturbed("perturb")
        self._estimate()
        self._apply_checked(rho)

    @torch.no_grad()
    def estimate(self) -> None:
        """Read ``p.grad`` and keep the direction of the next ``ε`` without touching the weights
        (the half of :meth:`perturb` that a one-pass step runs after its backward pass)."""
        self._require_one_pass("estimate")
        self._check_not_perturbed("estimate")
        self._estimate()

    @torch.no_grad()
    def apply(self, rho: float | None = None, *, repeat: bool = False) -> None:
        """Add ``ε`` of radius ``rho`` (default :attr:`rho`) along the direction of the last
        :meth:`estimate`, reading no gradient (the other half of :meth:`perturb`).

        ``repeat=True`` adds the same ``ε`` as the last ``apply`` again (the next micro-batch of
        the same step; GaussSAM then redraws the same noise) and does not count a new step.
        """
        self._require_one_pass("apply")
        self._check_not_perturbed("apply")
        self._apply_checked(rho, repeat)

    @torch.no_grad()
    def restore(self) -> None:
        """Remove the ``ε`` added by the last :meth:`perturb`; does nothing when none is applied."""
        if not self._is_perturbed:
            return
        self._restore()
        self._is_perturbed = False
        self._applied_rho = 0.0

    def _apply_checked(self, rho: float | None, repeat: bool = False) -> None:
        radius = self.rho if rho is None else check_rho(rho)
        self._is_perturbed, self._applied_rho = True, radius
        try:
            self._apply(radius, repeat)
        except BaseException:
            self.restore()  # undo whatever part of ε was added before the error
            raise
        if not repeat:
            self.steps += 1

    def _check_not_perturbed(self, method: str) -> None:
        if self._is_perturbed:
            raise RuntimeError(
                f"{type(self).__name__}.{method}() called while ε is applied (twice without restore()): "
                "call restore() after the second backward pass, before the optimizer step"
            )

    def _require_one_pass(self, method: str) -> None:
        if not self.supports_one_pass:
            raise RuntimeError(
                f"{type(self).__name__}.{method}() is not available: its direction is the whole "
                "gradient, which a one-pass step would have to keep between steps; use perturb()"
            )

    # ----------------------------------------------------------------------------- accounting
    @abc.abstractmethod
    def held_tensors(self) -> Iterator[torch.Tensor]:
        """Every tensor this object keeps to restore the weights (and to warm-start)."""

    def held_numel(self, total: bool = False) -> int:
        """How many numbers the perturbation holds between :meth:`perturb` and :meth:`restore`.

        Counted from the tensors it actually keeps (:meth:`held_tensors`), not from a formula.
        SAM keeps a full copy of the perturbed weights; νSAM keeps ``u`` and ``v`` per matrix.
        For sharded parameters this is what this rank holds; ``total=True`` sums over the ranks
        (a collective call) where a subclass supports sharding, and equals it otherwise.
        """
        count = sum(t.numel() for t in self.held_tensors())
        sharding = self._sharding() if total else None
        if sharding is None:
            return count
        device = local(self._selected[0].parameter.detach()).device
        counts = torch.tensor([count], dtype=torch.int64, device=device)
        return int(all_reduce_sum(counts, sharding.group).item())

    def _sharding(self) -> RowSharding | None:
        """The row sharding of the perturbed parameters (None when none is sharded)."""
        return next((s for s in self._shardings if s is not None), None)

    def perturbed_numel(self) -> int:
        """How many weights :meth:`perturb` may change (what SAM would have to copy)."""
        return sum(item.parameter.numel() for item in self._selected)

    def describe(self) -> str:
        """A short human-readable account of what is perturbed and what is held."""
        return (
            f"{type(self).__name__}(rho={self.rho}): {len(self._selected)} tensors, "
            f"{self.perturbed_numel():,} weights perturbed, {self.held_numel():,} numbers held"
        )

    # ----------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        if self._is_perturbed:
            raise RuntimeError("load_state_dict() while the weights are perturbed: call restore() first")
        self.steps = int(state_dict["steps"])
        self._skipped = int(state_dict["skipped_steps"])

    # ----------------------------------------------------------------------------- subclasses
    @abc.abstractmethod
    def _estimate(self) -> None:
        """Read the gradients and keep what :meth:`_apply` needs (no weight changes)."""

    @abc.abstractmethod
    def _apply(self, rho: float, repeat: bool) -> None:
        """Add ``ε`` of radius ``rho`` from what :meth:`_estimate` kept (``repeat``: the same ``ε``
        as the last time)."""

    @abc.abstractmethod
    def _restore(self) -> None: ...

    def __repr__(self) -> str:
        return self.describe()
