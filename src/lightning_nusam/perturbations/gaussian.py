"""GaussSAM, the ablation of the paper's Figure 1: a random direction instead of the gradient's.

``ε = ρ e / ‖e‖₂`` with ``e ~ N(0, I)`` over the selected parameters. Nothing of size ``e`` is
kept: the noise is drawn from a generator seeded per step, one parameter at a time, and drawn
again from the same seed to remove it, so only the seed and one scalar are held (and, for
bf16/fp16 weights, the few entries whose subtraction would round elsewhere, so that
``restore`` is exact; see :mod:`~lightning_nusam.perturbations.exact`).

The direction does not depend on the gradient, so the first forward/backward pass of a
two-pass step is not needed at all: with one-pass steps (``supports_one_pass``) GaussSAM is the
same method at half the cost.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lightning_nusam.perturbations.base import Perturbation, own_options
from lightning_nusam.perturbations.exact import (
    ExceptionBudget,
    RoundingExceptions,
    add_removably,
    remove_exactly,
    resolve_exact_restore,
    restores_exactly,
)
from lightning_nusam.perturbations.selection import SelectedParameter, dense_gradient, select_all
from lightning_nusam.perturbations.sharding import all_reduce_sum, local

_STEP_STRIDE = 1_000_003  # a prime: distinct (seed, step) pairs give distinct generator seeds
#: The noise of at most this many weights is alive at once while its norm is taken (one
#: ``_foreach_norm`` per chunk: 16 MiB of fp32).
NORM_CHUNK_NUMEL = 1 << 22


class GaussianPerturbation(Perturbation):
    """``ε = ρ e / ‖e‖₂``, ``e ~ N(0, I)``, on the selected parameters that have a gradient.

    Args:
        model: the module to perturb.
        rho: the radius ρ ≥ 0.
        seed: base seed; step ``k`` draws its noise from seed ``seed·1000003 + k``.
        include, exclude: name patterns, as for :class:`L2Perturbation`.
        exact_restore: as for :class:`~lightning_nusam.perturbations.NuclearPerturbation`
            (default: exact for bf16/fp16 weights).

    Example:
        >>> model = nn.Linear(8, 4)
        >>> gauss = GaussianPerturbation(model, rho=0.1, seed=0)
        >>> model(torch.randn(2, 8)).sum().backward()
        >>> gauss.perturb(); gauss.restore()
        >>> gauss.held_numel()     # one scalar, the scale ρ/‖e‖
        1
    """

    supports_one_pass = True
    replica_reduction = "nothing"

    def __init__(
        self,
        model: nn.Module,
        rho: float = 0.05,
        *,
        seed: int = 0,
        include: Sequence[str] | str | None = None,
        exclude: Sequence[str] | str | None = None,
        exact_restore: bool | None = None,
    ) -> None:
        options = self.check_options(own_options(locals()))
        self.seed = options["seed"]
        self._exact_option = options["exact_restore"]
        self._estimated: list[int] = []
        self._exceptions: dict[int, RoundingExceptions] = {}
        # Row-sharded parameters (``self._shardings``) draw their local rows from a rank-specific
        # stream; the norm is one all-reduced scalar (replicated parameters counted on rank 0 only).
        self._scale = torch.zeros(())
        self._applied: set[int] = set()  # the parameters that carry ε now
        self._exact: list[bool] = []
        self._applied_order: list[int] = []  # the order their noise was drawn in
        self._applied_seed = 0
        select = functools.partial(select_all, include=options["include"], exclude=options["exclude"])
        super().__init__(model, options["rho"], select, "GaussianPerturbation selected no parameters")

    def _selection_changed(self, previous: dict[str, SelectedParameter]) -> None:
        self.exact_restore = resolve_exact_restore(self._exact_option, self._selected)
        self._exact = [restores_exactly(self._exact_option, item.parameter.dtype) for item in self._selected]
        self._budgets: dict[int, ExceptionBudget] = {}
        self._partly_exact = any(self._exact)
        previous_names = list(previous)  # in the order of the previous selection
        estimated = {previous_names[i] for i in self._estimated}
        self._estimated = [i for i, item in enumerate(self._selected) if item.name in estimated]

    def _noise(self, step_seed: int, indices: list[int]) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """Yield ``(index, weight, e)`` per parameter, ``e`` drawn afresh from ``step_seed``."""
        generators: dict[tuple, torch.Generator] = {}
        for i in indices:
            weight = local(self._selected[i].parameter.data)
            sharding = self._shardings[i]
            stream = (weight.device, None if sharding is None else sharding.rank)
            generator = generators.get(stream)
            if generator is None:
                seed = step_seed if sharding is None else step_seed * 4096 + 1 + sharding.rank
                generator = torch.Generator(device=weight.device).manual_seed(seed)
                generators[stream] = generator
            noise = torch.randn(weight.shape, generator=generator, device=weight.device)
            yield i, weight, noise

    @property
    def has_direction(self) -> bool:
        return bool(self._estimated)

    def _estimate(self, replicas: dist.ProcessGroup | None) -> None:
        """The direction is random: only remember which parameters have a gradient (with
        ``replicas``, which train: the same set on every process, nothing to communicate)."""
        self._estimated = [i for i, item in enumerate(self._selected) if self.trains(item)
                           and (replicas is not None or dense_gradient(item) is not None)]

    def _apply(self, rho: float, repeat: bool) -> None:
        indices = self._estimated
        if not indices:
            return
        step_seed = self._applied_seed if repeat else self.seed * _STEP_STRIDE + self.steps
        sharding = self._sharding()
        norms: list[torch.Tensor] = []
        chunk: list[torch.Tensor] = []
        chunk_numel = 0
        for i, _, noise in self._noise(step_seed, indices):
            if sharding is None or self._shardings[i] is not None or sharding.rank == 0:
                chunk.append(noise)
                chunk_numel += noise.numel()
                if chunk_numel >= NORM_CHUNK_NUMEL:
                    norms += torch._foreach_norm(chunk)
                    chunk, chunk_numel = [], 0
        if chunk:
            norms += torch._foreach_norm(chunk)
        device = local(self._selected[indices[0]].parameter.detach()).device
        squared = (torch.stack(norms).double().square().sum() if norms
                   else torch.zeros((), dtype=torch.float64, device=device))
        if sharding is not None:
            squared = all_reduce_sum(squared, sharding.group)
        # ρ/‖e‖ on the device, computed in fp64 and rounded once to fp32 (no host synchronisation)
        self._scale = squared.clamp_min(1e-300).rsqrt().mul_(rho).float()
        self._applied, self._applied_order, self._applied_seed = set(), list(indices), step_seed
        for i, weight, noise in self._noise(step_seed, indices):
            if self._exact[i]:
                budget = self._budgets.get(i)
                if budget is None:
                    budget = self._budgets[i] = ExceptionBudget(weight.numel(), weight.device)
                self._exceptions[i] = add_removably(weight, noise.mul_(self._scale), budget)
            elif weight.dtype in (torch.float32, torch.float64):
                weight.addcmul_(noise, self._scale)  # w + e·ρ/‖e‖ in one kernel
            else:
                weight.add_(noise.mul_(self._scale).to(weight.dtype))
            self._applied.add(i)  # restore() undoes exactly the parameters changed so far

    def _restore(self) -> None:
        for i, weight, noise in self._noise(self._applied_seed, self._applied_order):
            if i in self._applied:
                self._remove(weight, noise, i)
                self._applied.discard(i)  # forgotten one by one: an interruption leaves it consistent
                self._exceptions.pop(i, None)
        self._applied_order = []

    def _unperturbed_copies(self) -> dict[int, torch.Tensor]:
        copies = {}
        for i, _, noise in self._noise(self._applied_seed, self._applied_order):
            if i not in self._applied:
                continue
            copy = self._selected[i].parameter.detach().clone()
            self._remove(local(copy), noise, i)
            copies[i] = copy
        return copies

    def _remove(self, weight: torch.Tensor, noise: torch.Tensor, index: int) -> None:
        """``weight ← weight − ε`` for the selected parameter ``index`` (its data, or a copy)."""
        if self._exact[index]:
            remove_exactly(weight, noise.mul_(self._scale), self._exceptions[index])
        elif weight.dtype in (torch.float32, torch.float64):
            weight.addcmul_(noise, self._scale, value=-1)
        else:
            weight.sub_(noise.mul_(self._scale).to(weight.dtype))

    def held_tensors(self) -> Iterator[torch.Tensor]:
        yield self._scale
        for exceptions in self._exceptions.values():
            yield from exceptions.tensors()

    def state_dict(self) -> dict[str, Any]:
        estimated = [self._selected[i].name for i in self._estimated]
        return {**super().state_dict(), "seed": self.seed, "estimated": estimated}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.seed = int(state_dict["seed"])
        estimated = set(state_dict.get("estimated", ()))
        self._estimated = [i for i, item in enumerate(self._selected) if item.name in estimated]
