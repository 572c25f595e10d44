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
        self._scale = torch.zeros(())
        self._applied: list[int] = []
        self._applied_seed = 0

    def _noise(self, step_seed: int, indices: list[int]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield ``(weight, e)`` per parameter, ``e`` drawn afresh from ``step_seed``."""
        generators: dict[torch.device, torch.Generator] = {}
        for i in indices:
            weight = self._selected[i].parameter.data
            generator = generators.get(weight.device)
            if generator is None:
                generator = torch.Generator(device=weight.device).manual_seed(step_seed)
                generators[weight.device] = generator
            noise = torch.randn(weight.shape, generator=generator, device=weight.device)
            yield weight, noise

    def _perturb(self) -> None:
        indices = [i for i, item in enumerate(self._selected) if item.parameter.grad is not None]
        if not indices:
            return
        step_seed = self.seed * _STEP_STRIDE + self.steps
        squared = sum(float(noise.square().sum()) for _, noise in self._noise(step_seed, indices))
        self._scale = torch.tensor(self.rho / max(squared, 1e-300) ** 0.5)
        for weight, noise in self._noise(step_seed, indices):
            weight.add_(noise.mul_(self._scale.item()).to(weight.dtype))
        self._applied, self._applied_seed = indices, step_seed

    def _restore(self) -> None:
        for weight, noise in self._noise(self._applied_seed, self._applied):
            weight.sub_(noise.mul_(self._scale.item()).to(weight.dtype))
        self._applied = []

    def held_tensors(self) -> Iterator[torch.Tensor]:
        yield self._scale

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "seed": self.seed}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.seed = int(state_dict["seed"])
