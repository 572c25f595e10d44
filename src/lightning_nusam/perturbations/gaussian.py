"""GaussSAM, the ablation of the paper's Figure 1: a random direction instead of the gradient's.

``ε = ρ e / ‖e‖₂`` with ``e ~ N(0, I)`` over the selected parameters. Nothing of size ``e`` is
kept: the noise is drawn from a generator seeded per step, one parameter at a time, and drawn
again from the same seed to remove it, so only the seed and one scalar are held.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from lightning_nusam.perturbations.base import Perturbation
from lightning_nusam.perturbations.selection import nothing_to_perturb, select_all
from lightning_nusam.perturbations.sharding import all_reduce_sum, local

_STEP_STRIDE = 1_000_003  # a prime: distinct (seed, step) pairs give distinct generator seeds


class GaussianPerturbation(Perturbation):
    """``ε = ρ e / ‖e‖₂``, ``e ~ N(0, I)``, on the selected parameters that have a gradient.

    Args:
        model: the module to perturb.
        rho: the radius ρ ≥ 0.
        seed: base seed; step ``k`` draws its noise from seed ``seed·1000003 + k``.
        include, exclude: name patterns, as for :class:`L2Perturbation`.

    Example:
        >>> model = nn.Linear(8, 4)
        >>> gauss = GaussianPerturbation(model, rho=0.1, seed=0)
        >>> model(torch.randn(2, 8)).sum().backward()
        >>> gauss.perturb(); gauss.restore()
        >>> gauss.held_numel()     # one scalar, the scale ρ/‖e‖
        1
    """

    def __init__(
        self,
        model: nn.Module,
        rho: float = 0.05,
        *,
        seed: int = 0,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] = (),
    ) -> None:
        selected = select_all(model, include=include, exclude=exclude)
        if not selected:
            raise nothing_to_perturb(model, "GaussianPerturbation selected no parameters")
        super().__init__(model, rho, selected)
        self.seed = int(seed)
        # Row-sharded parameters (``self._shardings``) draw their local rows from a rank-specific
        # stream; the norm is one all-reduced scalar (replicated parameters counted on rank 0 only).
        self._scale = torch.zeros(())
        self._applied: list[int] = []
        self._applied_seed = 0

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

    def _perturb(self) -> None:
        indices = [i for i, item in enumerate(self._selected) if item.parameter.grad is not None]
        if not indices:
            return
        step_seed = self.seed * _STEP_STRIDE + self.steps
        sharding = self._sharding()
        squared = torch.zeros((), dtype=torch.float64)
        for i, _, noise in self._noise(step_seed, indices):
            if sharding is None or self._shardings[i] is not None or sharding.rank == 0:
                squared += torch.linalg.vector_norm(noise).double().cpu().square()
        if sharding is not None:
            squared = all_reduce_sum(squared.to(local(self._selected[0].parameter.detach()).device),
                                     sharding.group).cpu()
        self._scale = torch.tensor(self.rho / max(float(squared), 1e-300) ** 0.5)
        for _, weight, noise in self._noise(step_seed, indices):
            weight.add_(noise.mul_(self._scale.item()).to(weight.dtype))
        self._applied, self._applied_seed = indices, step_seed

    def _restore(self) -> None:
        for _, weight, noise in self._noise(self._applied_seed, self._applied):
            weight.sub_(noise.mul_(self._scale.item()).to(weight.dtype))
        self._applied = []

    def held_tensors(self) -> Iterator[torch.Tensor]:
        yield self._scale

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "seed": self.seed}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.seed = int(state_dict["seed"])
