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

import functools
import math
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
import torch.distributed as dist
from torch import nn

from lightning_nusam.checks import (
    check_choice,
    check_count,
    check_flag,
    check_positive,
    check_types,
)
from lightning_nusam.perturbations.base import DEFAULT_TAU, Perturbation, own_options
from lightning_nusam.perturbations.compiled import (
    CompiledPrograms,
    check_execution,
    device_problem,
    nuclear_functions,
)
from lightning_nusam.perturbations.exact import (
    LOW_PRECISION_DTYPES,
    ExceptionBudget,
    RoundingExceptions,
    add_removably,
    pinned_host_memory,
    remove_exactly,
    resolve_exact_restore,
    restores_exactly,
)
from lightning_nusam.perturbations.power_iteration import (
    Products,
    batched_power_iteration,
    looped_power_iteration,
    looped_products,
    replicated_power_iteration,
    stacked_products,
)
from lightning_nusam.perturbations.selection import (
    DEFAULT_NUCLEAR_EXCLUDE,
    SelectedParameter,
    as_patterns,
    coverage,
    dense_gradient,
    select_matrices,
)
from lightning_nusam.perturbations.sharding import (
    RowSharding,
    all_gather_rows,
    all_reduce_sum,
    average_over,
    local,
)

#: Largest number of gradient entries stacked at once by the batched power iteration
#: (1 Mi numbers = 4 MiB in fp32); larger shape groups are processed in chunks.
DEFAULT_MAX_STACK_NUMEL = 1 << 20

#: With ``batched="auto"``, matrices up to this many entries (64×64) are stacked and batched: the
#: cost there is dispatch overhead, which ``bmm`` saves. Larger ones go through the loop, which
#: reads each gradient in place (stacking would copy it, and the matvec is memory-bound).
AUTO_BATCH_MAX_NUMEL = 1 << 12

#: Below this share of the model's weights, νSAM's default selection says (once) what it left out.
COVERAGE_NOTE_BELOW = 0.5


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
    ``estimated_rows`` are the members whose gradient the last estimate read (``v`` is valid
    there); ``applied_rows`` those that carry ``ε`` now, with the rounding exceptions of
    low-precision weights (:mod:`~lightning_nusam.perturbations.exact`).
    """

    members: list[SelectedParameter]
    u: torch.Tensor
    v: torch.Tensor
    sharding: RowSharding | None = None
    estimated_rows: list[int] = field(default_factory=list)
    applied_rows: list[int] = field(default_factory=list)
    exceptions: dict[int, RoundingExceptions] = field(default_factory=dict)
    #: whether these matrices are restored exactly (chosen per dtype: a bf16 body keeps its
    #: exact restore beside an fp32 head)
    exact: bool = False
    budgets: dict[int, ExceptionBudget] = field(default_factory=dict)
    #: the compiled path's exception counts of the last step, one per member, in host memory
    #: (the ``needed`` of each member's budget: they arrive in one copy)
    needed: torch.Tensor | None = None
    _indices: dict[tuple[int, ...], torch.Tensor] = field(default_factory=dict)

    def row_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        return all_reduce_sum(tensor, self.sharding.group if self.sharding else None)

    def rows_index(self, rows: list[int]) -> torch.Tensor:
        """``rows`` as an index tensor on the vectors' device, made once per distinct set (a
        tensor made from a Python list is a host-to-device copy, which waits for the device)."""
        key = tuple(rows)
        index = self._indices.get(key)
        if index is None:
            index = self._indices[key] = torch.tensor(rows, device=self.u.device)
        return index

    @property
    def zero(self) -> torch.Tensor:
        """A 0-d zero of the vectors' dtype and device (made once: ``where`` takes no Python
        number together with ``out=``)."""
        zero = self._indices.get(())
        if zero is None:
            zero = self._indices[()] = self.v.new_zeros(())
        return zero

    def start_vectors(self, rows: list[int]) -> torch.Tensor:
        """The warm-start ``u`` of ``rows`` (a view when they are consecutive)."""
        if rows == list(range(rows[0], rows[-1] + 1)):
            return self.u[rows[0]:rows[-1] + 1]
        return self.u.index_select(0, self.rows_index(rows))


#: rows of a shape group (members, in order)
Rows = tuple[int, ...]
#: ``(group index, rows of the group)`` for the groups a compiled program covers
_Plan = list[tuple[int, Rows]]


@dataclass
class _Estimate:
    group: _ShapeGroup
    rows: list[int]
    u: torch.Tensor
    v: torch.Tensor
    sigma: torch.Tensor
    #: tensors that are all finite exactly when ``u`` and ``v`` are (the norms that normalised them)
    checks: tuple[torch.Tensor, ...] = ()

    def __post_init__(self) -> None:
        if not self.checks:
            self.checks = (self.u, self.v)


class NuclearPerturbation(Perturbation):
    """νSAM (Algorithm 1): a rank-1 perturbation ``ρ u vᵀ`` per weight matrix.

    Args:
        model: the module whose weight matrices are perturbed.
        rho: the radius ρ ≥ 0; each matrix gets a perturbation of nuclear norm ρ.
        power_iterations: T ≥ 1 of Algorithm 2 (the paper uses T = 1 with a warm start).
        include: name patterns (``fnmatch``, e.g. ``"blocks.*.mlp.*"``), or one pattern as a
            string; only matching parameters are considered. ``None`` considers all.
        exclude: name patterns never perturbed, or one as a string; None (default) is
            ``DEFAULT_NUCLEAR_EXCLUDE``: position embeddings, class and register tokens, relative
            position bias tables. A list replaces it (``[]`` excludes nothing by name).
        exclude_modules: module types whose parameters are never perturbed (normalisation
            layers are always excluded).
        include_conv: also perturb convolution kernels, each as an ``(out, in·kh·kw)`` matrix
            (off by default, as in the paper, which skips the ViT's patch convolution).
        include_embeddings: also perturb embedding tables (``nn.Embedding``: the token, position
            and segment embeddings of a language model). Off by default: a lookup table is not
            the weight matrix of a linear map (Algorithm 1 perturbs those), like the ViT's
            position embedding and class token, which the paper leaves alone.
        foreach: do the bookkeeping of the power iteration (normalisations, guards, stores) once
            per group of equally shaped matrices, with the matrix-vector products written into
            one buffer per group (default), rather than per estimate as in the reference loop
            (``False``). Both give the same ``ε`` (to the last bits of a norm's summation order).
        batched: run the power iteration as one ``bmm`` per group of equally shaped matrices
            (``True``), as a plain per-matrix loop (``False``), or batched for small matrices
            only (``"auto"``, default: at most ``AUTO_BATCH_MAX_NUMEL`` entries each); all give
            the same numbers. The loop allocates no temporary of a gradient's size.
        max_stack_numel: the batched path stacks at most this many gradient entries at once.
        tau: τ of Algorithm 2.
        seed: seed of the random start vectors ``u``.
        exact_restore: make :meth:`restore` bit-exact. ``None`` (default) does so for bf16/fp16
            weights, matrix by matrix (a bf16 body beside an fp32 head keeps it), where
            ``w + ε − ε`` visibly rounds: the few entries a subtraction would not
            give back are found at ``perturb()`` time and only they are kept (see
            :mod:`~lightning_nusam.perturbations.exact`). fp32/fp64 weights then restore by an
            in-place ``addr_`` (no temporary, a last-bit rounding at most); ``True`` makes them
            exact too, at the cost of one fp32 temporary of each matrix during perturb/restore.
        execution: ``"eager"`` (default) runs the arithmetic operation by operation, a few
            kernels per matrix (shaped by ``foreach`` and ``batched``); ``"compiled"`` runs the
            arithmetic of ``perturb()`` (Algorithm 2 with its guards, the stores of ``u`` and
            ``v``, ``M_i ← M_i + ρ u_i v_iᵀ`` for every matrix) as one ``torch.compile``'d
            function, and that of ``restore()`` as another (see
            :mod:`~lightning_nusam.perturbations.compiled`): the same numbers as the eager path,
            for a fraction of its host time and launches, at the cost of a compilation (seconds)
            at the first step and whenever the selection changes. ``foreach``, ``batched`` and
            ``max_stack_numel`` shape the eager path only. Compiled, νSAM does not average its
            products over data-parallel ``replicas`` (``replica_reduction`` is then
            ``"gradient"``: the first pass all-reduces the gradient) and refuses row-sharded
            (FSDP2) parameters.

    One-pass use: :meth:`estimate` after a backward pass keeps ``(u, v)``; :meth:`apply` adds
    ``ρ u vᵀ`` from them before the next forward pass (``supports_one_pass``).

    Data parallelism: ``perturb(replicas=group)`` reads this process's own first-pass gradient and
    gives every process the ``ε`` of the mean gradient, all-reducing only the power iteration's
    products (Σ(nᵢ + mᵢ) numbers per iteration, in two collective calls), not the gradient.

    Example:
        >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
        >>> nusam = NuclearPerturbation(model, rho=0.1)
        >>> model(torch.randn(4, 8)).square().mean().backward()
        >>> nusam.perturb()        # weights are now w + ρ u vᵀ
        >>> nusam.restore()        # and back to w
        >>> nusam.held_numel()     # (16 + 8) + (2 + 16): u and v, no copy of the weights
        42
    """

    option_checks: ClassVar[dict[str, Callable[[Any], Any]]] = {
        **Perturbation.option_checks,
        "power_iterations": lambda v: check_count("power_iterations", v, 1, whole_floats=True,
                                                  meaning="T of Algorithm 2"),
        "exclude": lambda v: DEFAULT_NUCLEAR_EXCLUDE if v is None else as_patterns("exclude", v),
        "exclude_modules": lambda v: () if v is None else check_types("exclude_modules", v),
        "include_conv": lambda v: check_flag("include_conv", v),
        "include_embeddings": lambda v: check_flag("include_embeddings", v),
        "batched": lambda v: check_choice("batched", v, (True, False, "auto")),
        "foreach": lambda v: check_flag("foreach", v),
        "max_stack_numel": lambda v: check_count("max_stack_numel", v, 1),
        "tau": lambda v: check_positive("tau", v),  # > 0 here: it keeps the normalisations finite
        "execution": check_execution,
    }
    supports_one_pass = True
    replica_reduction = "vectors"

    def __init__(
        self,
        model: nn.Module,
        rho: float = 0.05,
        power_iterations: int = 1,
        *,
        include: Sequence[str] | str | None = None,
        exclude: Sequence[str] | str | None = None,
        exclude_modules: Sequence[type[nn.Module]] | None = None,
        include_conv: bool = False,
        include_embeddings: bool = False,
        batched: bool | Literal["auto"] = "auto",
        foreach: bool = True,
        max_stack_numel: int = DEFAULT_MAX_STACK_NUMEL,
        tau: float = DEFAULT_TAU,
        seed: int = 0,
        exact_restore: bool | None = None,
        execution: Literal["eager", "compiled"] = "eager",
    ) -> None:
        options = self.check_options(own_options(locals()))  # exclude None: DEFAULT_NUCLEAR_EXCLUDE
        self.power_iterations = options["power_iterations"]
        self.batched = options["batched"]
        self.foreach = options["foreach"]
        self.max_stack_numel = options["max_stack_numel"]
        self.tau = options["tau"]
        self.seed = options["seed"]
        self._exact_option = options["exact_restore"]
        self.execution: str = options["execution"]
        if self.execution == "compiled":
            # the compiled program cannot hold the collective: the first pass all-reduces the
            # gradient instead (the engine reads this to choose)
            self.replica_reduction = "gradient"
        self._programs: CompiledPrograms | None = None
        self._pending: _Plan | None = None  # (compiled) an estimate not run yet
        self._rho_tensors: dict[tuple[torch.device, torch.dtype], tuple[float, torch.Tensor]] = {}
        self._groups: list[_ShapeGroup] = []
        self._skipped: torch.Tensor | int = 0
        select = functools.partial(select_matrices, **{k: options[k] for k in (
            "include", "exclude", "exclude_modules", "include_conv", "include_embeddings")})
        super().__init__(model, options["rho"], select, "νSAM perturbs 2-D weight matrices "
                         "(pass `include_conv=True` for convolution kernels)")
        if options["include"] is None:
            self._note_coverage(options["include_conv"], options["include_embeddings"])

    @property
    def has_direction(self) -> bool:
        return any(group.estimated_rows for group in self._groups)

    # ----------------------------------------------------------------------------- setup
    def _note_coverage(self, include_conv: bool, include_embeddings: bool) -> None:
        """Say once when the default selection leaves most of the model unperturbed (a CNN whose
        only linear layer is its head, say), and which option would perturb the rest."""
        share, left_out = coverage(self.model, self._selected, include_conv=include_conv,
                                   include_embeddings=include_embeddings)
        if share < COVERAGE_NOTE_BELOW and left_out:
            count = len(self._selected)
            warnings.warn(
                f"{type(self).__name__} perturbs {count} weight matri{'x' if count == 1 else 'ces'}, "
                f"{100 * share:.2f} % of the trainable weights; not perturbed: {'; '.join(left_out)}",
                UserWarning, stacklevel=3,
            )

    def _selection_changed(self, previous: dict[str, SelectedParameter]) -> None:
        """Group the selected matrices by shape, keeping the vectors of those selected before."""
        self.exact_restore = resolve_exact_restore(self._exact_option, self._selected)  # every matrix
        kept = {item.name: (group.u[row], group.v[row], row in group.estimated_rows)
                for group in self._groups for row, item in enumerate(group.members)}  # the previous groups
        self._groups = self._build_groups(self._selected, self._shardings, self.seed)
        for group in self._groups:
            group.exact = restores_exactly(self._exact_option, group.members[0].parameter.dtype)
            for row, item in enumerate(group.members):
                if item.name not in kept:
                    continue
                u, v, estimated = kept[item.name]
                if u.shape == group.u[row].shape and v.shape == group.v[row].shape:
                    group.u[row].copy_(u)
                    group.v[row].copy_(v)
                    if estimated:
                        group.estimated_rows.append(row)
        if self.execution == "compiled":
            self._prepare_programs()

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
    def _estimate(self, replicas: dist.ProcessGroup | None) -> None:
        if self.execution == "compiled":
            self._refuse_replicas(replicas)
            self._run_estimate(self._estimate_rows())  # the one-pass estimate()
            return
        for group in self._groups:
            group.estimated_rows = []
        if replicas is None:
            estimates = [est for group in self._groups for est in self._power_iteration(group)]
        else:
            estimates = self._replicated_power_iteration(replicas)
        if not estimates:
            return
        if self.foreach:
            # u and v are finite exactly when the norms that normalised them are (a non-finite
            # entry makes its row's norm non-finite): one check of a few numbers per matrix
            checks = torch.cat([part.reshape(-1) for e in estimates for part in e.checks])
            finite = checks.mul_(0).eq(0).all()  # x·0 is 0 for a finite x, NaN otherwise
        else:
            finite = torch.stack(
                [torch.isfinite(e.u).all() & torch.isfinite(e.v).all() for e in estimates]
            ).all()
        scales = self._matrix_scales([e.sigma for e in estimates])
        for estimate, scale in zip(estimates, scales, strict=True):
            self._store(estimate, finite, scale)
        if isinstance(self._skipped, torch.Tensor) and self._skipped.device == finite.device:
            self._skipped.add_(~finite)  # counted on the device: read only when asked for
        else:
            self._skipped = (~finite).to(torch.int64) + self._skipped

    def _apply(self, rho: float, repeat: bool) -> None:  # ε depends only on (u, v, ρ)
        if self.execution == "compiled":
            self._compiled_apply(rho)
            return
        for group in self._groups:
            for row in group.estimated_rows:
                self._add_rank_one(group, row, rho)
                group.applied_rows.append(row)  # restore() undoes exactly the rows added so far

    def _restore(self) -> None:
        if self.execution == "compiled":
            self._compiled_remove([[local(group.members[row].parameter.data) for row in group.applied_rows]
                                   for group in self._groups])
            for group in self._groups:
                group.applied_rows = []
                group.exceptions.clear()
            return
        for group in self._groups:
            while group.applied_rows:  # forgotten one by one: an interruption leaves it consistent
                row = group.applied_rows[-1]
                self._remove_rank_one(group, row, self._applied_rho,
                                      local(group.members[row].parameter.data))
                group.applied_rows.pop()
                group.exceptions.pop(row, None)

    def _unperturbed_copies(self) -> dict[int, torch.Tensor]:
        index = {id(item.parameter): i for i, item in enumerate(self._selected)}
        if self.execution == "compiled":  # the restore's own program, on copies: the same values
            applied = [[group.members[row].parameter for row in group.applied_rows] for group in self._groups]
            copies = [[p.detach().clone() for p in parameters] for parameters in applied]
            self._compiled_remove([[local(copy) for copy in group] for group in copies])
            return {index[id(p)]: copy for parameters, group in zip(applied, copies, strict=True)
                    for p, copy in zip(parameters, group, strict=True)}
        copies = {}
        for group in self._groups:
            for row in group.applied_rows:
                parameter = group.members[row].parameter
                copy = parameter.detach().clone()
                self._remove_rank_one(group, row, self._applied_rho, local(copy))
                copies[index[id(parameter)]] = copy
        return copies

    def _matrix_scales(self, sigmas: list[torch.Tensor]) -> list[torch.Tensor | None]:
        """Per-matrix factor folded into ``v``: none for νSAM (every matrix gets radius ρ)."""
        return [None] * len(sigmas)

    def _power_iteration(self, group: _ShapeGroup) -> Iterator[_Estimate]:
        """Run Algorithm 2 for the members of ``group`` that have a gradient."""
        rows = [i for i, item in enumerate(group.members)
                if self.trains(item) and dense_gradient(item) is not None]
        if not rows:
            return
        n, m = group.u.shape[1], group.v.shape[1]
        batched = self.batched if self.batched != "auto" else n * m <= AUTO_BATCH_MAX_NUMEL
        reduce = group.row_reduce if group.sharding is not None else None
        if self.foreach and (not batched or len(rows) == 1):
            yield self._grouped_power_iteration(group, rows, reduce)
            return
        if not batched or len(rows) == 1:
            grads = [self._grad_matrix(group, row) for row in rows]
            u_start = group.start_vectors(rows)
            u, v, sigma = looped_power_iteration(grads, u_start, self.power_iterations, self.tau, reduce)
            yield _Estimate(group, rows, u, v, sigma)
            return
        chunk = max(1, self.max_stack_numel // (n * m))
        for start in range(0, len(rows), chunk):
            chunk_rows = rows[start : start + chunk]
            grads = torch.stack([self._grad_matrix(group, row) for row in chunk_rows])
            u_start = group.start_vectors(chunk_rows)
            u, v, sigma = batched_power_iteration(grads, u_start, self.power_iterations, self.tau, reduce)
            del grads
            yield _Estimate(group, chunk_rows, u, v, sigma)

    def _grouped_power_iteration(self, group: _ShapeGroup, rows: list[int],
                                 reduce: Callable[[torch.Tensor], object] | None) -> _Estimate:
        """Algorithm 2 for ``rows`` of ``group``, each gradient read in place by one ``mv`` per
        half-step that writes straight into a row of the group's ``(B, m)`` / ``(B, n)``
        buffer; each normalisation is then one kernel for the whole group."""
        grads = [self._grad_matrix(group, row) for row in rows]
        n, m = group.u.shape[1], group.v.shape[1]
        u = group.start_vectors(rows)
        v_buffer = group.v.new_empty(len(rows), m)
        u_buffer = group.u.new_empty(len(rows), n)
        v_norm = sigma = u  # set by the first iteration (T ≥ 1)
        for _ in range(self.power_iterations):
            for i, grad in enumerate(grads):
                torch.mv(grad.t(), u[i], out=v_buffer[i])  # Aᵀu (this rank's rows' share when sharded)
            if reduce is not None:
                reduce(v_buffer)
            v_norm = torch.linalg.vector_norm(v_buffer, dim=1, keepdim=True)
            v_buffer.div_(v_norm + self.tau)
            for i, grad in enumerate(grads):
                torch.mv(grad, v_buffer[i], out=u_buffer[i])
            if reduce is None:
                sigma = torch.linalg.vector_norm(u_buffer, dim=1)
            else:
                squared = u_buffer.square().sum(dim=1)
                reduce(squared)
                sigma = squared.sqrt()
            u_buffer.div_(sigma.unsqueeze(1) + self.tau)
            u = u_buffer
        return _Estimate(group, rows, u_buffer, v_buffer, sigma, checks=(v_norm, sigma))

    def _replicated_power_iteration(self, replicas: dist.ProcessGroup) -> list[_Estimate]:
        """Algorithm 2 for the mean gradient over the data-parallel ``replicas`` from this
        process's own gradients: every matrix that trains takes part (a missing gradient counts
        as zero, so that all processes reduce the same numbers), and each half-step averages the
        products of all matrices in one collective call (see ``replicated_power_iteration``).

        All matrices iterate in lockstep, so their operators live together: stacked copies
        (``batched``) are made only while they total at most ``max_stack_numel`` numbers, the
        others are read in place, and a low-precision gradient is converted one matrix at a time
        when it is read, as in the single-process path."""
        stacks: list[tuple[_ShapeGroup, list[int], torch.Tensor]] = []
        operators: list[Products] = []
        stacked_numel = 0
        for group in self._groups:
            if group.sharding is not None:
                raise ValueError("`replicas` cannot be combined with row-sharded (FSDP2) parameters, "
                                 "whose gradients are reduced by the sharding itself")
            rows = [i for i, item in enumerate(group.members) if self.trains(item)]
            if not rows:
                continue
            n, m = group.u.shape[1], group.v.shape[1]
            batched = self.batched if self.batched != "auto" else n * m <= AUTO_BATCH_MAX_NUMEL
            zero = torch.zeros((), dtype=group.u.dtype, device=group.u.device).expand(n, m)  # no n×m memory
            grads = [zero if (grad := dense_gradient(group.members[row])) is None else _as_matrix(local(grad))
                     for row in rows]
            chunk = max(1, self.max_stack_numel // (n * m)) if batched else len(rows)
            for start in range(0, len(rows), chunk):
                chunk_rows, chunk_grads = rows[start:start + chunk], grads[start:start + chunk]
                u_start = group.start_vectors(chunk_rows)
                numel = len(chunk_rows) * n * m
                if batched and len(chunk_rows) > 1 and stacked_numel + numel <= self.max_stack_numel:
                    stacked_numel += numel
                    products = stacked_products(torch.stack([g.to(group.u.dtype) for g in chunk_grads]))
                else:
                    products = looped_products(chunk_grads, group.u.dtype)
                stacks.append((group, chunk_rows, u_start))
                operators.append(products)
        results = replicated_power_iteration(operators, [u for _, _, u in stacks], self.power_iterations,
                                             self.tau, lambda tensors: average_over(replicas, tensors))
        return [_Estimate(group, rows, u, v, sigma)
                for (group, rows, _), (u, v, sigma) in zip(stacks, results, strict=True)]

    @staticmethod
    def _grad_matrix(group: _ShapeGroup, row: int) -> torch.Tensor:
        """This rank's rows of a member's (dense) gradient as a matrix in the vectors' dtype (no
        copy for fp32)."""
        return _as_matrix(local(group.members[row].parameter.grad)).to(group.u.dtype)

    def _store(self, estimate: _Estimate, finite: torch.Tensor, scale: torch.Tensor | None) -> None:
        """Write the new ``u`` (warm start) and the ``v`` to apply, guarding against bad values.

        On a non-finite step ``u`` keeps its previous value and ``v`` becomes 0, so the step adds
        nothing. A zero gradient (σ = 0) gives ``v = 0`` and also keeps the previous ``u``, so the
        warm start never collapses to the zero vector. No host synchronisation is needed.
        """
        group, rows = estimate.group, estimate.rows
        keep_new_u = (finite & (estimate.sigma > 0)).unsqueeze(1)
        if not self.foreach:  # the reference
            v = estimate.v if scale is None else estimate.v * scale.unsqueeze(1)
            v = torch.where(finite, v, torch.zeros_like(v))
            if len(rows) == len(group.members):
                group.u.copy_(torch.where(keep_new_u, estimate.u, group.u))
                group.v.copy_(v)
            else:
                index = group.rows_index(rows)
                group.u.index_copy_(0, index, torch.where(keep_new_u, estimate.u, group.u[index]))
                group.v.index_copy_(0, index, v)
            group.estimated_rows.extend(rows)
            return
        v = estimate.v.to(group.v.dtype) if scale is None else estimate.v * scale.unsqueeze(1)
        if len(rows) == len(group.members):  # one kernel for each of u and v, written in place
            torch.where(keep_new_u, estimate.u.to(group.u.dtype), group.u, out=group.u)
            torch.where(finite, v, group.zero, out=group.v)
        else:
            index = group.rows_index(rows)
            group.u.index_copy_(0, index, torch.where(keep_new_u, estimate.u.to(group.u.dtype),
                                                      group.u.index_select(0, index)))
            group.v.index_copy_(0, index, torch.where(finite, v, group.zero).to(group.v.dtype))
        group.estimated_rows.extend(rows)

    def _add_rank_one(self, group: _ShapeGroup, row: int, rho: float) -> None:
        """``M ← M + ρ u vᵀ`` in place; an fp32 weight gets no ``n×m`` temporary unless exact."""
        weight = local(group.members[row].parameter.data)  # a sharded weight: this rank's rows
        if group.exact:
            budget = group.budgets.get(row)
            if budget is None:
                budget = group.budgets[row] = ExceptionBudget(weight.numel(), weight.device)
            group.exceptions[row] = add_removably(weight, self._epsilon(group, row, rho, weight), budget)
        else:
            self._add_outer(group, row, weight, rho)

    def _remove_rank_one(self, group: _ShapeGroup, row: int, rho: float, weight: torch.Tensor) -> None:
        """``M ← M − ρ u vᵀ`` on ``weight`` (the parameter's local data, or a copy of it)."""
        if group.exact:
            remove_exactly(weight, self._epsilon(group, row, rho, weight), group.exceptions[row])
        else:
            self._add_outer(group, row, weight, -rho)

    @staticmethod
    def _epsilon(group: _ShapeGroup, row: int, rho: float, weight: torch.Tensor) -> torch.Tensor:
        """``ε = ρ u vᵀ`` in fp32 (fp64 for fp64 weights), in the weight's logical shape."""
        return torch.outer(group.u[row], group.v[row]).mul_(rho).view(weight.shape)

    @staticmethod
    def _add_outer(group: _ShapeGroup, row: int, weight: torch.Tensor, alpha: float) -> None:
        u, v = group.u[row], group.v[row]
        if weight.dtype in LOW_PRECISION_DTYPES or not weight.is_contiguous():
            # ε is formed in fp32 and rounded once to the weight's dtype (or layout).
            weight.add_(torch.outer(u, v).mul_(alpha).to(weight.dtype).view(weight.shape))
        else:
            weight.view(u.shape[0], v.shape[0]).addr_(u.to(weight.dtype), v.to(weight.dtype), alpha=alpha)

    # ----------------------------------------------------------------------------- compiled
    #: νSAM-Norm's scale in the compiled programs (the eager path calls :meth:`_matrix_scales`)
    _compiled_normalized: ClassVar[bool] = False

    def _prepare_programs(self) -> None:
        """Check that the selection can run compiled, and start a fresh set of programs for it
        (compiled at their first call)."""
        if any(group.sharding is not None for group in self._groups):
            raise ValueError(
                "`execution='compiled'` cannot perturb row-sharded (FSDP2) parameters: the power "
                "iteration's reductions over the shards are collectives, which the compiled program "
                "does not hold; use `execution='eager'` with FSDP2"
            )
        devices = {group.u.device for group in self._groups}
        if len(devices) > 1:
            raise ValueError(
                f"`execution='compiled'` runs one program on one device, and the selected matrices lie "
                f"on {len(devices)} ({', '.join(sorted(map(str, devices)))}); use `execution='eager'`"
            )
        for device in devices:
            problem = device_problem(device)
            if problem is not None:
                raise ValueError(f"`execution='compiled'` is not available: {problem}; "
                                 "use `execution='eager'`")
        self._programs = CompiledPrograms(nuclear_functions(
            self.power_iterations, self.tau, self._compiled_normalized, LOW_PRECISION_DTYPES))
        self._rho_tensors = {}

    @staticmethod
    def _refuse_replicas(replicas: dist.ProcessGroup | None) -> None:
        if replicas is not None:
            raise RuntimeError(
                "`execution='compiled'` does not average the power iteration over data-parallel "
                "`replicas` (the collective cannot run inside the compiled program): all-reduce the "
                "first-pass gradient and call perturb() without `replicas` (the engine does so, as "
                "`replica_reduction` is 'gradient'), or use `execution='eager'`"
            )

    def _perturb(self, rho: float | None, replicas: dist.ProcessGroup | None) -> None:
        """Compiled: the estimate and the addition of ``ε`` run as one program (the estimate is
        left pending for :meth:`_apply`, and runs alone if nothing is applied)."""
        if self.execution != "compiled":
            super()._perturb(rho, replicas)
            return
        self._refuse_replicas(replicas)
        self._pending = self._estimate_rows()
        try:
            self._apply_checked(rho)
        finally:
            pending, self._pending = self._pending, None
            if pending is not None:  # not applied (no gradient, or a bad radius): estimate only
                self._run_estimate(pending)

    def _estimate_rows(self) -> _Plan:
        """``(group index, rows)`` of the members that train and have a gradient: what the next
        estimate reads. ``estimated_rows`` are set to them now (the arithmetic follows)."""
        plan = []
        for k, group in enumerate(self._groups):
            group.estimated_rows = [i for i, item in enumerate(group.members)
                                    if self.trains(item) and dense_gradient(item) is not None]
            if group.estimated_rows:
                plan.append((k, tuple(group.estimated_rows)))
        return plan

    def _vectors(self, plan: _Plan) -> tuple[list[torch.Tensor], list[torch.Tensor], tuple[Rows, ...]]:
        """``u`` and ``v`` of the groups of ``plan``, and their rows."""
        groups = [self._groups[k] for k, _ in plan]
        return [g.u for g in groups], [g.v for g in groups], tuple(rows for _, rows in plan)

    def _gradients(self, plan: _Plan) -> list[list[torch.Tensor]]:
        return [[local(self._groups[k].members[row].parameter.grad) for row in rows] for k, rows in plan]

    def _weights(self, plan: _Plan) -> list[list[torch.Tensor]]:
        return [[local(self._groups[k].members[row].parameter.data) for row in rows] for k, rows in plan]

    def _skip_counter(self, device: torch.device) -> torch.Tensor:
        """``skipped_steps`` as an int64 tensor on ``device``, which the program increments."""
        skipped = self._skipped
        if not (isinstance(skipped, torch.Tensor) and skipped.device == device
                and skipped.dtype == torch.int64):
            skipped = self._skipped = (
                skipped.to(device=device, dtype=torch.int64) if isinstance(skipped, torch.Tensor)
                else torch.full((), int(skipped), dtype=torch.int64, device=device))
        return skipped

    def _rho_tensors_of(self, plan: _Plan, rho: float) -> list[torch.Tensor]:
        """ρ as a 0-d tensor of each group's vector dtype and device, refilled only when it
        changes (a tensor, not a number, so that a new radius does not recompile)."""
        tensors = []
        for k, _ in plan:
            u = self._groups[k].u
            held = self._rho_tensors.get((u.device, u.dtype))
            if held is None:
                held = (rho, torch.full((), rho, dtype=u.dtype, device=u.device))
            elif held[0] != rho:
                held = (rho, held[1].fill_(rho))
            self._rho_tensors[(u.device, u.dtype)] = held
            tensors.append(held[1])
        return tensors

    def _capacities(self, group: _ShapeGroup, rows: tuple[int, ...]) -> tuple[int, ...]:
        """The exception slots of ``rows`` for this step (exactly restored groups; see
        :class:`~lightning_nusam.perturbations.exact.ExceptionBudget`); part of the plan."""
        if not group.exact:
            return ()
        if group.needed is None:
            device = group.u.device
            group.needed = torch.zeros(len(group.members), dtype=torch.int64,
                                       pin_memory=pinned_host_memory(device))
            numel = local(group.members[0].parameter.detach()).numel()
            group.budgets = {row: ExceptionBudget(numel, device, needed=group.needed[row])
                             for row in range(len(group.members))}
        return tuple(group.budgets[row].grow() for row in rows)

    def _run_estimate(self, plan: _Plan) -> None:
        if not plan:
            return
        us, vs, rows = self._vectors(plan)
        with torch.no_grad():
            self._programs("estimate", tuple(plan), self._gradients(plan), us, vs, rows,
                           self._skip_counter(us[0].device))

    def _compiled_apply(self, rho: float) -> None:
        """Add ``ε`` to the rows estimated last (with the pending estimate first, in one program)."""
        plan = [(k, tuple(group.estimated_rows)) for k, group in enumerate(self._groups)
                if group.estimated_rows]
        us, vs, rows = self._vectors(plan)
        exact = tuple(self._groups[k].exact for k, _ in plan)
        capacities = tuple(self._capacities(self._groups[k], r) for k, r in plan)
        key = (tuple(plan), exact, capacities)
        arguments = (us, vs, rows)
        with torch.no_grad():
            if self._pending is not None:  # the rows just estimated
                self._pending = None
                try:
                    exceptions, counts = self._programs(
                        "perturb", key, self._gradients(plan), self._weights(plan), *arguments,
                        self._skip_counter(us[0].device), self._rho_tensors_of(plan, rho), exact, capacities)
                except BaseException:  # nothing was estimated: no direction for a later apply()
                    for group in self._groups:
                        group.estimated_rows = []
                    raise
            else:
                exceptions, counts = self._programs("add", key, self._weights(plan), *arguments,
                                                    self._rho_tensors_of(plan, rho), exact, capacities)
        for (k, group_rows), found, count in zip(plan, exceptions, counts, strict=True):
            group = self._groups[k]
            if group.exact:
                group.needed.copy_(count, non_blocking=True)
                group.exceptions = {row: RoundingExceptions(*tensors)
                                    for row, tensors in zip(group_rows, found, strict=True)}
            group.applied_rows = list(group_rows)

    def _compiled_remove(self, weights: list[list[torch.Tensor]]) -> None:
        """Remove ``ε`` from ``weights`` (per group, those of its ``applied_rows``: the
        parameters' data, or copies of them) with the restore's program."""
        plan = [(k, tuple(group.applied_rows)) for k, group in enumerate(self._groups) if group.applied_rows]
        if not plan:
            return
        us, vs, rows = self._vectors(plan)
        exact = tuple(self._groups[k].exact for k, _ in plan)
        exceptions = [[(e.index, e.value, e.added) for e in map(self._groups[k].exceptions.get, r)]
                      if self._groups[k].exact else [] for k, r in plan]
        capacities = tuple(tuple(index.shape[0] for index, _, _ in found) for found in exceptions)
        with torch.no_grad():
            self._programs("remove", (tuple(plan), exact, capacities), [weights[k] for k, _ in plan], us, vs,
                           rows, self._rho_tensors_of(plan, self._applied_rho), exact, exceptions)

    # ----------------------------------------------------------------------------- accounting
    def held_tensors(self) -> Iterator[torch.Tensor]:
        for group in self._groups:
            yield group.u
            yield group.v
            for exceptions in group.exceptions.values():
                yield from exceptions.tensors()

    def singular_vectors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{name: (u, v)}`` of the last step (``v`` includes any νSAM-Norm scale)."""
        return {
            item.name: (group.u[row], group.v[row])
            for group in self._groups
            for row, item in enumerate(group.members)
        }

    # ----------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Counters, the vectors ``u`` (warm start) and ``v`` by parameter name, and which
        matrices the last estimate covered (a one-pass step applies them at the next step).

        For row-sharded parameters the ranks' rows of ``u`` are gathered (vectors only: ``n``
        numbers per matrix), so the state is the same on every rank and as without sharding.
        Call it on every rank then.
        """
        state = super().state_dict()
        state["u"], state["v"], state["estimated"] = {}, {}, []
        for group in self._groups:
            full_u = group.u
            if group.sharding is not None:
                full_u = all_gather_rows(group.u.t().contiguous(), group.sharding).t()
            for row, item in enumerate(group.members):
                state["u"][item.name] = full_u[row].detach().cpu().clone()
                state["v"][item.name] = group.v[row].detach().cpu().clone()
            state["estimated"] += [group.members[row].name for row in group.estimated_rows]
        return state

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        super().load_state_dict(state_dict)
        saved = state_dict["u"]
        expected = {item.name for item in self._selected}
        if set(saved) != expected:
            only_saved, only_here = sorted(set(saved) - expected), sorted(expected - set(saved))
            raise ValueError(
                f"the state_dict holds the vectors of {len(saved)} matrices and this "
                f"{type(self).__name__} selects {len(expected)}: missing from the state_dict "
                f"{only_here[:5]}{' …' if len(only_here) > 5 else ''}, not selected here "
                f"{only_saved[:5]}{' …' if len(only_saved) > 5 else ''}. The model or the selection "
                "options (include, exclude, exclude_modules, include_conv, include_embeddings) "
                "differ from those it was saved with"
            )
        saved_v, estimated = state_dict.get("v", {}), set(state_dict.get("estimated", ()))
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
                if item.name in saved_v:
                    group.v[row].copy_(saved_v[item.name])
                else:
                    group.v[row].zero_()
            group.estimated_rows = [row for row, item in enumerate(group.members) if item.name in estimated]


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

    _compiled_normalized = True

    def _matrix_scales(self, sigmas: list[torch.Tensor]) -> list[torch.Tensor | None]:
        if self.foreach:
            total = torch.linalg.vector_norm(torch.cat(sigmas)).add_(self.tau)
            return [s / total for s in sigmas]
        total = torch.sqrt(sum(s.square().sum() for s in sigmas))
        return [s / (total + self.tau) for s in sigmas]
