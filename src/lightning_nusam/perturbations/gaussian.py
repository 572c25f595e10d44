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
    RoundingExceptions,
    add_removably,
    remove_exactly,
    resolve_exact_restore,
)
from lightning_nusam.perturbations.selection import SelectedParameter, dense_gradient, select_all
from lightning_nusam.perturbations.sharding import all_reduce_sum, local

_STEP_STRIDE = 1_000_003  # a prime: distinct (seed, step) pairs give distinct generator seeds


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
        self._applied: list[int] = []  # the parameters that carry ε now
        self._applied_order: list[int] = []  # the order their noise was drawn in
        self._applied_seed = 0
        select = functools.partial(select_all, include=options["include"], exclude=options["exclude"])
        super().__init__(model, options["rho"], select, "GaussianPerturbation selected no parameters")

    def _selection_changed(self, previous: dict[str, SelectedParameter]) -> None:
        self.exact_restore = resolve_exact_restore(self._exact_option, self._selected)
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
        squared = torch.zeros((), dtype=torch.float64)
        for i, _, noise in self._noise(step_seed, indices):
            if sharding is None or self._shardings[i] is not None or sharding.rank == 0:
                squared += torch.linalg.vector_norm(noise).double().cpu().square()
        if sharding is not None:
            squared = all_reduce_sum(squared.to(local(self._selected[0].parameter.detach()).device),
                                     sharding.group).cpu()
        self._scale = torch.tensor(rho / max(float(squared), 1e-300) ** 0.5)
        self._applied, self._applied_order, self._applied_seed = [], list(indices), step_seed
        for i, weight, noise in self._noise(step_seed, indices):
            epsilon = noise.mul_(self._scale.item())
            if self.exact_restore:
                self._exceptions[i] = add_removably(weight, epsilon)
            else:
                weight.add_(epsilon.to(weight.dtype))
            self._applied.append(i)  # restore() undoes exactly the parameters changed so far

    def _restore(self) -> None:
        for i, weight, noise in self._noise(self._applied_seed, self._applied_order):
            if i in self._applied:
                self._remove(weight, noise, i)
                self._applied.remove(i)  # forgotten one by one: an interruption leaves it consistent
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
        epsilon = noise.mul_(self._scale.item())
        if self.exact_restore:
            remove_exactly(weight, epsilon, self._exceptions[index])
        else:
            weight.sub_(epsilon.to(weight.dtype))

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
