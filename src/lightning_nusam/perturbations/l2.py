"""SAM (Foret et al.), ASAM and SAM-ON: the ℓ2-constrained perturbation ``ε = ρ g / ‖g‖₂``.

``g`` is the first-pass gradient of the selected parameters, flattened into one vector, so the
normalisation is global. The closed form of ``argmax_{‖ε‖₂ ≤ ρ} ⟨ε, g⟩`` (the paper's eq. (3)
and update (SAM)). Restoring by subtraction would round differently from the addition, so, like
the reference implementations, the perturbed weights are copied before ``ε`` is added and
copied back by :meth:`restore`: this copy is SAM's memory cost that νSAM removes.

ASAM (Kwon et al., 2021, "adaptive" SAM) measures the ball in the scale-invariant coordinates
``T⁻¹w`` with ``T = diag(|w| + η)``: ``ε = ρ T² g / ‖T g‖₂``, so that rescaling a layer's weights
(which leaves a ReLU network's function unchanged) rescales its perturbation with them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from torch import nn

from lightning_nusam.checks import check_flag, check_positive, check_types
from lightning_nusam.perturbations.base import DEFAULT_TAU, Perturbation, Selection, own_options
from lightning_nusam.perturbations.selection import (
    SelectedParameter,
    dense_gradient,
    select_all,
    select_norm_layers,
)
from lightning_nusam.perturbations.sharding import RowSharding, all_reduce_sum, average_over, local


def squared_norm(tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """``‖(t_1, ..., t_k)‖₂²`` as an fp32 scalar on ``device`` (zero for an empty list)."""
    if not tensors:
        return torch.zeros((), device=device)
    if tensors[0].dtype in (torch.float16, torch.bfloat16):
        norms = [torch.linalg.vector_norm(t, dtype=torch.float32) for t in tensors]
    else:
        norms = torch._foreach_norm(tensors)
    return torch.stack([n.to(device) for n in norms]).float().square().sum()


def _norm(tensor: torch.Tensor) -> torch.Tensor:
    """``‖t‖₂``, accumulated in fp32 for a bf16/fp16 tensor."""
    low = tensor.dtype in (torch.float16, torch.bfloat16)
    return torch.linalg.vector_norm(tensor, dtype=torch.float32 if low else None)


def sharded_squared_norm(
    tensors: list[torch.Tensor], shardings: list[RowSharding | None], device: torch.device
) -> torch.Tensor:
    """Squared norm of the full tensors given this rank's rows of the row-sharded ones: local
    sums over the shards plus the replicated tensors counted once, all-reduced (one scalar)."""
    group = next((s for s in shardings if s is not None), None)
    if group is None:
        return squared_norm(tensors, device)
    shards = [t for t, s in zip(tensors, shardings, strict=True) if s is not None]
    replicated = [t for t, s in zip(tensors, shardings, strict=True) if s is None]
    total = squared_norm(shards, device)
    if group.rank == 0:
        total = total + squared_norm(replicated, device)
    return all_reduce_sum(total, group.group)


def common_sharding(names: list[str], shardings: list[RowSharding | None]) -> None:
    """All sharded parameters must share one process group (one all-reduce of the norm)."""
    groups = {id(s.group) for s in shardings if s is not None}
    if len(groups) > 1:
        raise ValueError(
            f"the perturbed parameters are sharded over {len(groups)} different process groups "
            f"(e.g. {names[0]!r}); a global norm needs one"
        )


class L2Perturbation(Perturbation):
    """SAM: ``ε = ρ g / (‖g‖₂ + τ)`` over every selected parameter that has a gradient.

    Args:
        model: the module to perturb.
        rho: the radius ρ ≥ 0 of the ℓ2 ball.
        include: name patterns; only matching parameters are perturbed (``None``: all). A single
            string is one pattern.
        exclude: name patterns never perturbed (a single string is one pattern; None: none).
        tau: added to the norm (the ``perturb_eps`` of common implementations).
        adaptive: ASAM: ``ε = ρ T² g / (‖T g‖₂ + τ)`` with ``T = |w| + adaptive_eta``, elementwise
            (the ``adaptive=True`` of the reference SAM implementations, which use η = 0). ρ is
            then a radius in those rescaled coordinates; ASAM's authors use values about 10×
            larger than SAM's (e.g. 0.5 instead of 0.05).
        adaptive_eta: η ≥ 0 of ASAM's ``T`` (keeps zero weights perturbable).

    Example:
        >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
        >>> sam = L2Perturbation(model, rho=0.05)
        >>> model(torch.randn(4, 8)).square().mean().backward()
        >>> sam.perturb(); sam.restore()
        >>> sam.held_numel() == sum(p.numel() for p in model.parameters())  # a full copy
        True
    """

    exact_restore = True
    option_checks: ClassVar[dict[str, Callable[[Any], Any]]] = {
        **Perturbation.option_checks,
        "adaptive": lambda v: check_flag("adaptive", v),
        "adaptive_eta": lambda v: check_positive("adaptive_eta", v, allow_zero=True),
    }

    def __init__(
        self,
        model: nn.Module,
        rho: float = 0.05,
        *,
        include: Sequence[str] | str | None = None,
        exclude: Sequence[str] | str | None = None,
        tau: float = DEFAULT_TAU,
        adaptive: bool = False,
        adaptive_eta: float = 0.0,
    ) -> None:
        options = self.check_options(own_options(locals()))
        self.adaptive, self.adaptive_eta = options["adaptive"], options["adaptive_eta"]
        select = functools.partial(select_all, include=options["include"], exclude=options["exclude"])
        self._init_selected(model, options["rho"], select, options["tau"],
                            f"{type(self).__name__} selected no parameters")

    def _init_selected(self, model: nn.Module, rho: float, select: Selection, tau: float, hint: str) -> None:
        self.tau = tau
        # Per selected parameter, a buffer for its weights before the perturbation (this rank's
        # rows when sharded), allocated the first time the parameter is perturbed.
        self._backups: list[torch.Tensor | None] = []
        self._applied: list[int] = []
        self._estimated: list[int] = []
        self._inverse_norm = torch.zeros(())
        self._finite = torch.ones((), dtype=torch.bool)
        self._skipped: torch.Tensor | int = 0
        super().__init__(model, rho, select, hint)

    def _selection_changed(self, previous: dict[str, SelectedParameter]) -> None:
        common_sharding([item.name for item in self._selected], self._shardings)
        self._backups = [None] * len(self._selected)
        self._estimated = []

    @property
    def has_direction(self) -> bool:
        return bool(self._estimated)

    def _estimate(self, replicas: dist.ProcessGroup | None) -> None:
        """The parameters with a gradient and ``1 / (‖T g‖ + τ)``; the direction is ``g`` itself.
        With ``replicas`` the selected gradients are first averaged over them, in place, in one
        collective call (a missing one counts as zero)."""
        trains = [i for i, item in enumerate(self._selected) if self.trains(item)]
        if replicas is not None:
            if self._sharding() is not None:
                raise ValueError("`replicas` cannot be combined with row-sharded (FSDP2) parameters")
            for i in trains:
                parameter = self._selected[i].parameter
                if parameter.grad is None:
                    parameter.grad = torch.zeros_like(parameter)
            average_over(replicas, [self._selected[i].parameter.grad for i in trains])
        indices = [i for i in trains if dense_gradient(self._selected[i]) is not None]
        self._estimated = []
        if not indices:
            return
        grads = [local(self._selected[i].parameter.grad) for i in indices]
        if self.adaptive:  # ‖T g‖ per parameter, one temporary at a time
            grads = [_norm(self._metric(i).mul_(grad)) for i, grad in zip(indices, grads, strict=True)]
        shardings = [self._shardings[i] for i in indices]
        norm = sharded_squared_norm(grads, shardings, grads[0].device).sqrt()
        # A non-finite gradient adds nothing (each weight keeps its value, see _apply) and is
        # counted, all on the device: nothing waits for it.
        self._finite = torch.isfinite(norm)
        self._inverse_norm = torch.where(self._finite, 1.0 / (norm + self.tau), torch.zeros_like(norm))
        if isinstance(self._skipped, torch.Tensor) and self._skipped.device == norm.device:
            self._skipped.add_(~self._finite)
        else:
            self._skipped = (~self._finite).to(torch.int64) + self._skipped
        self._estimated = indices

    def _metric(self, index: int) -> torch.Tensor:
        """ASAM's ``T = |w| + η`` of one parameter (this rank's rows)."""
        return local(self._selected[index].parameter.detach()).abs().add_(self.adaptive_eta)

    def _apply(self, rho: float, repeat: bool) -> None:
        indices = self._estimated
        if not indices:
            return
        params = [local(self._selected[i].parameter.data) for i in indices]
        grads = [local(self._selected[i].parameter.grad) for i in indices]
        scale = rho * self._inverse_norm
        backups = [self._backup_for(i) for i in indices]
        torch._foreach_copy_(backups, params)
        self._applied = list(indices)  # from here on restore() copies all of them back
        for index, param, grad, backup in zip(indices, params, grads, backups, strict=True):
            if self.adaptive:  # w ← w + T²g·ρ/‖Tg‖
                param.add_(self._metric(index).square_().mul_(grad).mul_(scale.to(param.dtype)))
            else:
                param.addcmul_(grad, scale)  # w ← w + g·ρ/‖g‖, fused: no temporary of ε
            # a non-finite gradient (ε would carry inf/NaN): the weight keeps its value
            torch.where(self._finite, param, backup, out=param)

    def _restore(self) -> None:
        if self._applied:
            params = [local(self._selected[i].parameter.data) for i in self._applied]
            torch._foreach_copy_(params, [self._backups[i] for i in self._applied])
        self._applied = []

    def _unperturbed_copies(self) -> dict[int, torch.Tensor]:
        copies = {}
        for i in self._applied:
            copy = self._selected[i].parameter.detach().clone()
            local(copy).copy_(self._backups[i])
            copies[i] = copy
        return copies

    def _backup_for(self, index: int) -> torch.Tensor:
        """The backup buffer, allocated on first use (a change of the parameter's layout takes the
        selection again, which drops the buffers)."""
        backup = self._backups[index]
        if backup is None:
            self._backups[index] = backup = torch.empty_like(local(self._selected[index].parameter.detach()))
        return backup

    def held_tensors(self) -> Iterator[torch.Tensor]:
        yield from (backup for backup in self._backups if backup is not None)


class NormLayerPerturbation(L2Perturbation):
    """SAM-ON (Mueller et al., 2023): SAM restricted to the parameters of normalisation layers.

    Layers are found by module type (BatchNorm, LayerNorm, GroupNorm, RMSNorm, InstanceNorm and
    their subclasses, plus ``extra_norm_types``), never by name.

    Args:
        model: the module to perturb.
        rho: the radius ρ ≥ 0 over the normalisation parameters. The default, 0.5, is ten times
            SAM's: SAM-ON perturbs a small part of the model, and its authors use radii of about
            0.5-1 where SAM takes 0.05-0.1.
        extra_norm_types: module types to count as normalisation layers besides the built-in
            ones (None: none).
        tau: added to the norm.

    Example:
        >>> model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 2))
        >>> samon = NormLayerPerturbation(model, rho=0.5)
        >>> samon.parameter_names
        ['1.weight', '1.bias']
    """

    replica_reduction = "selected gradients"
    option_checks: ClassVar[dict[str, Callable[[Any], Any]]] = {
        **Perturbation.option_checks,
        "extra_norm_types": lambda v: () if v is None else check_types("extra_norm_types", v),
    }

    def __init__(
        self,
        model: nn.Module,
        rho: float = 0.5,
        *,
        extra_norm_types: Sequence[type[nn.Module]] | None = None,
        tau: float = DEFAULT_TAU,
    ) -> None:
        options = self.check_options(own_options(locals()))
        self.adaptive, self.adaptive_eta = False, 0.0
        select = functools.partial(select_norm_layers, extra_norm_types=options["extra_norm_types"])
        self._init_selected(model, options["rho"], select, options["tau"],
                            "SAM-ON perturbs normalisation layers and the model has none "
                            "(pass `extra_norm_types` for custom norm modules)")
