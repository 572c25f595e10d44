"""νSAM: sharpness-aware perturbations under a nuclear-norm constraint (the paper's Algorithm 1).

For every selected weight matrix ``M_i ∈ R^{n_i×m_i}`` with first-pass gradient ``G_i``::

    (u_i, v_i) = SVD_top1(G_i, u_i^{prev})        # Algorithm 2, warm-started, T iterations
    M_i ← M_i + ρ · u_i v_iᵀ                      # perturb(): in place, eq. (8a)
    ...second forward/backward at the perturbed weights...
    M_i ← M_i − ρ · u_i v_iᵀ                      # restore(): in place, eq. (8b)

``ε_i = ρ u_i v_iᵀ`` is the solution of the linear maximisation ``argmax_{‖ε‖_* ≤ ρ} ⟨ε, G_i⟩``
(Lemma 3.1): rank one, nuclear norm ρ, and ``⟨ε_i, G_i⟩ = ρ σ_i > 0``. Only ``u_i`` and ``v_i``
are kept, never ``ε_i`` nor a copy of ``M_i``; ``u_i`` is the warm start of the next step.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from lightning_nusam.perturbations.base import DEFAULT_TAU, Perturbation
from lightning_nusam.perturbations.power_iteration import batched_power_iteration, looped_power_iteration
from lightning_nusam.perturbations.selection import (
    DEFAULT_NUCLEAR_EXCLUDE,
    SelectedParameter,
    nothing_to_perturb,
    select_matrices,
)
from lightning_nusam.perturbations.sharding import (
    RowSharding,
    all_gather_rows,
    all_reduce_sum,
    local,
)

#: Largest number of gradient entries stacked at once by the batched power iteration
#: (1 Mi numbers = 4 MiB in fp32); larger shape groups are processed in chunks.
DEFAULT_MAX_STACK_NUMEL = 1 << 20

#: With ``batched="auto"``, matrices up to this many entries (64×64) are stacked and batched: the
#: cost there is dispatch overhead, which ``bmm`` saves. Larger ones go through the loop, which
#: reads each gradient in place (stacking would copy it, and the matvec is memory-bound).
AUTO_BATCH_MAX_NUMEL = 1 << 12

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _as_matrix(tensor: torch.Tensor) -> torch.Tensor:
    """``(out, in, *kernel)`` → ``(out, in·prod(kernel))``; a 2-D tensor is returned as is."""
    return tensor if tensor.dim() == 2 else tensor.reshape(tensor.shape[0], -1)


@dataclass
class _ShapeGroup:
    """Selected matrices of one shape, dtype and device, with their power-iteration vectors.

    ``u`` (``B×n``) and ``v`` (``B×m``), fp32 (fp64 for fp64 weights), are the only state:
    row ``i`` belongs to ``members[i]``. ``v`` already contains any per-matrix scale
    (νSAM-Norm) and is zeroed on a skipped step, so ``restore`` subtracts exactly what
    ``perturb`` added. For row-sharded parameters ``u`` holds this rank's rows only.
    """

    members: list[SelectedParameter]
    u: torch.Tensor
    v: torch.Tensor
    sharding: RowSharding | None = None
    applied_rows: list[int] = field(default_factory=list)

    def row_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        return all_reduce_sum(tensor, self.sharding.group if self.sharding else None)


@dataclass
class _Estimate:
    group: _ShapeGroup
    rows: list[int]
    u: torch.Tensor
    v: torch.Tensor
    sigma: torch.Tensor


class NuclearPerturbation(Perturbation):
    """νSAM (Algorithm 1): a rank-1 perturbation ``ρ u vᵀ`` per weight matrix.

    Args:
        model: the module whose weight matrices are perturbed.
        rho: the radius ρ ≥ 0; each matrix gets a perturbation of nuclear norm ρ.
        power_iterations: T ≥ 1 of Algorithm 2 (the paper uses T = 1 with a warm start).
        include: name patterns (``fnmatch``, e.g. ``"blocks.*.mlp.*"``); only matching
            parameters are considered. ``None`` considers all.
        exclude: name patterns never perturbed (default: position embeddings and class tokens).
        exclude_modules: module types whose parameters are never perturbed (normalisation
            layers are always excluded).
        include_conv: also perturb convolution kernels, each as an ``(out, in·kh·kw)`` matrix
            (off by default, as in the paper, which skips the ViT's patch convolution).
        batched: run the power iteration as one ``bmm`` per group of equally shaped matrices
            (``True``), as a plain per-matrix loop (``False``), or batched for small matrices
            only (``"auto"``, default: at most ``AUTO_BATCH_MAX_NUMEL`` entries each); all give
            the same numbers. The loop allocates no temporary of a gradient's size.
        max_stack_numel: the batched path stacks at most this many gradient entries at once.
        tau: τ of Algorithm 2.
        seed: seed of the random start vectors ``u``.

    Example:
        >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
        >>> nusam = NuclearPerturbation(model, rho=0.1)
        >>> model(torch.randn(4, 8)).square().mean().backward()
        >>> nusam.perturb()        # weights are now w + ρ u vᵀ
        >>> nusam.restore()        # and back to w
        >>> nusam.held_numel()     # (16 + 8) + (2 + 16): u and v, no copy of the weights
        42
    """

    def __init__(
        self,
        model: nn.Module,
        rho: float = 0.05,
        power_iterations: int = 1,
        *,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] = DEFAULT_NUCLEAR_EXCLUDE,
        exclude_modules: Sequence[type[nn.Module]] = (),
        include_conv: bool = False,
        batched: bool | Literal["auto"] = "auto",
        max_stack_numel: int = DEFAULT_MAX_STACK_NUMEL,
        tau: float = DEFAULT_TAU,
        seed: int = 0,
    ) -> None:
        if int(power_iterations) != power_iterations or power_iterations < 1:
            raise ValueError(
                f"`power_iterations` must be an integer >= 1 (T of Algorithm 2), got {power_iterations}"
            )
        if not tau > 0:
            raise ValueError(f"`tau` must be > 0 (it keeps Algorithm 2 finite), got {tau}")
        if max_stack_numel < 1:
            raise ValueError(f"`max_stack_numel` must be >= 1, got {max_stack_numel}")
        selected = select_matrices(
            model,
            include=include,
            exclude=exclude,
            exclude_modules=exclude_modules,
            include_conv=include_conv,
        )
        if not selected:
            raise nothing_to_perturb(
                model,
                "νSAM perturbs 2-D weight matrices (pass `include_conv=True` for convolution kernels)",
            )
        super().__init__(model, rho, selected)
        self.power_iterations = int(power_iterations)
        if batched not in (True, False, "auto"):
            raise ValueError(f"`batched` must be True, False or 'auto', got {batched!r}")
        self.batched = batched
        self.max_stack_numel = int(max_stack_numel)
        self.tau = float(tau)
        self._groups = self._build_groups(selected, self._shardings, seed)
        self._skipped: torch.Tensor | int = 0

    # ----------------------------------------------------------------------------- setup
    @staticmethod
    def _build_groups(
        selected: list[SelectedParameter], item_shardings: list[RowSharding | None], seed: int
    ) -> list[_ShapeGroup]:
        generator = torch.Generator().manual_seed(seed)
        by_key: dict[tuple, list[SelectedParameter]] = {}
        shardings: dict[tuple, RowSharding | None] = {}
        for item, sharding in zip(selected, item_shardings, strict=True):
            n, m = item.parameter.shape[0], math.prod(item.parameter.shape[1:])
            group_id = None if sharding is None else id(sharding.group)
            key = (n, m, item.parameter.dtype, local(item.parameter.detach()).device, group_id)
            by_key.setdefault(key, []).append(item)
            shardings[key] = sharding
        groups = []
        for key, members in by_key.items():
            n, m, dtype, device, _ = key
            # fp32 vectors for fp32/bf16/fp16 weights, fp64 for fp64 weights. The start vectors
            # are drawn for the full n rows, so a sharded run starts where an unsharded one does.
            vector_dtype = torch.promote_types(dtype, torch.float32)
            u = torch.randn(len(members), n, generator=generator, dtype=torch.float64)
            u = (u / torch.linalg.vector_norm(u, dim=1, keepdim=True)).to(vector_dtype)
            sharding = shardings[key]
            if sharding is not None:
                u = u[:, sharding.row_slice].contiguous()
            v = torch.zeros(len(members), m, dtype=vector_dtype)
            groups.append(_ShapeGroup(members, u.to(device), v.to(device), sharding))
        return groups

    # ----------------------------------------------------------------------------- step
    def _perturb(self) -> None:
        estimates = [est for group in self._groups for est in self._estimate(group)]
        if not estimates:
            return
        finite = torch.stack(
            [torch.isfinite(e.u).all() & torch.isfinite(e.v).all() for e in estimates]
        ).all()
        scales = self._matrix_scales([e.sigma for e in estimates])
        for estimate, scale in zip(estimates, scales, strict=True):
            self._store(estimate, finite, scale)
        self._skipped = self._skipped + (~finite).to(torch.int64)
        for group in self._groups:
            for row in group.applied_rows:
                self._add_rank_one(group, row, self.rho)

    def _restore(self) -> None:
        for group in self._groups:
            for row in group.applied_rows:
                self._add_rank_one(group, row, -self.rho)
            group.applied_rows = []

    def _matrix_scales(self, sigmas: list[torch.Tensor]) -> list[torch.Tensor | None]:
        """Per-matrix factor folded into ``v``: none for νSAM (every matrix gets radius ρ)."""
        return [None] * len(sigmas)

    def _estimate(self, group: _ShapeGroup) -> Iterator[_Estimate]:
        """Run Algorithm 2 for the members of ``group`` that have a gradient."""
        rows = [i for i, item in enumerate(group.members) if item.parameter.grad is not None]
        if not rows:
            return
        self._follow_device(group)
        n, m = group.u.shape[1], group.v.shape[1]
        batched = self.batched if self.batched != "auto" else n * m <= AUTO_BATCH_MAX_NUMEL
        reduce = group.row_reduce if group.sharding is not None else None
        if not batched or len(rows) == 1:
            grads = [self._grad_matrix(group, row) for row in rows]
            u_start = group.u if len(rows) == len(group.members) else group.u[rows]
            u, v, sigma = looped_power_iteration(grads, u_start, self.power_iterations, self.tau, reduce)
            yield _Estimate(group, rows, u, v, sigma)
            return
        chunk = max(1, self.max_stack_numel // (n * m))
        for start in range(0, len(rows), chunk):
            chunk_rows = rows[start : start + chunk]
            grads = torch.stack([self._grad_matrix(group, row) for row in chunk_rows])
            u_start = group.u if len(chunk_rows) == len(group.members) else group.u[chunk_rows]
            u, v, sigma = batched_power_iteration(grads, u_start, self.power_iterations, self.tau, reduce)
            del grads
            yield _Estimate(group, chunk_rows, u, v, sigma)

    @staticmethod
    def _grad_matrix(group: _ShapeGroup, row: int) -> torch.Tensor:
        """This rank's rows of the gradient as a matrix in the vectors' dtype (no copy for fp32)."""
        grad = local(group.members[row].parameter.grad)
        return _as_matrix(grad).to(group.u.dtype)

    def _store(self, estimate: _Estimate, finite: torch.Tensor, scale: torch.Tensor | None) -> None:
        """Write the new ``u`` (warm start) and the ``v`` to apply, guarding against bad values.

        On a non-finite step ``u`` keeps its previous value and ``v`` becomes 0, so the step adds
        nothing. A zero gradient (σ = 0) gives ``v = 0`` and also keeps the previous ``u``, so the
        warm start never collapses to the zero vector. No host synchronisation is needed.
        """
        group, rows = estimate.group, estimate.rows
        keep_new_u = (finite & (estimate.sigma > 0)).unsqueeze(1)
        v = estimate.v if scale is None else estimate.v * scale.unsqueeze(1)
        v = torch.where(finite, v, torch.zeros_like(v))
        if len(rows) == len(group.members):
            group.u.copy_(torch.where(keep_new_u, estimate.u, group.u))
            group.v.copy_(v)
        else:
            index = torch.tensor(rows, device=group.u.device)
            group.u.index_copy_(0, index, torch.where(keep_new_u, estimate.u, group.u[index]))
            group.v.index_copy_(0, index, v)
        group.applied_rows.extend(rows)

    @staticmethod
    def _follow_device(group: _ShapeGroup) -> None:
        """Keep the vectors on the parameters' device (Lightning moves the model after setup)."""
        device = local(group.members[0].parameter.detach()).device
        if group.u.device != device:
            group.u = group.u.to(device)
            group.v = group.v.to(device)

    @staticmethod
    def _add_rank_one(group: _ShapeGroup, row: int, alpha: float) -> None:
        """``M ← M + alpha · u vᵀ`` in place, without an ``n×m`` temporary for fp32 weights."""
        weight = local(group.members[row].parameter.data)  # a sharded weight: this rank's rows
        u, v = group.u[row], group.v[row]
        if weight.dtype in _LOW_PRECISION or not weight.is_contiguous():
            # ε is formed in fp32 and rounded once to the weight's dtype (or layout).
            weight.add_(torch.outer(u, v).mul_(alpha).to(weight.dtype).view(weight.shape))
        else:
            weight.view(u.shape[0], v.shape[0]).addr_(u.to(weight.dtype), v.to(weight.dtype), alpha=alpha)

    # ----------------------------------------------------------------------------- accounting
    def held_tensors(self) -> Iterator[torch.Tensor]:
        for group in self._groups:
            yield group.u
            yield group.v

    def singular_vectors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{name: (u, v)}`` of the last step (``v`` includes any νSAM-Norm scale)."""
        return {
            item.name: (group.u[row], group.v[row])
            for group in self._groups
            for row, item in enumerate(group.members)
        }

    # ----------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Counters and the warm-start vectors ``u`` by parameter name (``v`` is recomputed).

        For row-sharded parameters the ranks' rows of ``u`` are gathered (vectors only: ``n``
        numbers per matrix), so the state is the same on every rank and as without sharding.
        Call it on every rank then.
        """
        state = super().state_dict()
        state["u"] = {}
        for group in self._groups:
            full_u = group.u
            if group.sharding is not None:
                full_u = all_gather_rows(group.u.t().contiguous(), group.sharding).t()
            for row, item in enumerate(group.members):
                state["u"][item.name] = full_u[row].detach().cpu().clone()
        return state

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        super().load_state_dict(state_dict)
        saved = state_dict["u"]
        expected = set(self.parameter_names)
        if set(saved) != expected:
            missing, unexpected = sorted(expected - set(saved)), sorted(set(saved) - expected)
            raise ValueError(
                "state_dict does not match the perturbed matrices: "
                f"missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        for group in self._groups:
            rows = group.members[0].parameter.shape[0]
            for row, item in enumerate(group.members):
                value = saved[item.name]
                if value.shape != (rows,):
                    raise ValueError(
                        f"state_dict['u'][{item.name!r}] has shape {tuple(value.shape)}, expected ({rows},)"
                    )
                if group.sharding is not None:
                    value = value[group.sharding.row_slice]
                group.u[row].copy_(value)
            group.v.zero_()


class NuclearNormalizedPerturbation(NuclearPerturbation):
    """νSAM-Norm (Appendix C.1, eq. 21): matrix ``i`` gets ``ρ σ_i u_i v_iᵀ / √(Σ_j σ_j²)``.

    The SAM perturbation of the rank-1 approximations ``σ_i u_i v_iᵀ`` of the gradients: the
    Frobenius norm of the whole perturbation is ρ, shared between matrices in proportion to
    their top singular values ``σ_i`` (estimated by the same power iteration). The factor is
    folded into the stored ``v_i``, so the state is still ``u`` and ``v`` per matrix.

    Example:
        >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
        >>> nusam_norm = NuclearNormalizedPerturbation(model, rho=0.1)
        >>> model(torch.randn(4, 8)).square().mean().backward()
        >>> nusam_norm.perturb(); nusam_norm.restore()
    """

    def _matrix_scales(self, sigmas: list[torch.Tensor]) -> list[torch.Tensor | None]:
        total = torch.sqrt(sum(s.square().sum() for s in sigmas))
        return [s / (total + self.tau) for s in sigmas]
