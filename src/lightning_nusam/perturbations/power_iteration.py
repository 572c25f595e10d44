"""Warm-started power iteration for the top singular pair (the paper's Algorithm 2, SVD_top1).

For a matrix ``A ∈ R^{n×m}`` and a start vector ``u ∈ R^n``, repeat ``T`` times::

    v ← Aᵀu / (‖Aᵀu‖₂ + τ)
    u ← A v / (‖A v‖₂ + τ)

and return ``(u, v, σ)`` with ``σ = ‖A v‖₂``, the estimate of the top singular value. With
``τ > 0`` a zero matrix gives ``u = v = 0`` (no NaN). Two implementations give the same numbers:
:func:`power_iteration` for one matrix (``torch.mv``) and :func:`batched_power_iteration` for a
stack of matrices of one shape (one ``torch.bmm`` per half-step).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

#: An in-place sum over the ranks that hold other rows of the matrices (row sharding), or None.
RowReduce = Callable[[torch.Tensor], object] | None


def power_iteration(
    matrix: torch.Tensor, u: torch.Tensor, iterations: int = 1, tau: float = 1e-12
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Algorithm 2 on one ``(n, m)`` matrix from the start vector ``u`` (shape ``(n,)``).

    Example:
        >>> a = torch.diag(torch.tensor([3.0, 1.0]))
        >>> u, v, sigma = power_iteration(a, torch.tensor([1.0, 1.0]), iterations=20)
        >>> round(float(sigma), 4), u.abs().argmax().item()
        (3.0, 0)
    """
    u, v, sigma = looped_power_iteration([matrix], u.unsqueeze(0), iterations, tau)
    return u[0], v[0], sigma[0]


def batched_power_iteration(
    matrices: torch.Tensor,
    u: torch.Tensor,
    iterations: int = 1,
    tau: float = 1e-12,
    row_reduce: RowReduce = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Algorithm 2 on a stack ``(B, n, m)`` of matrices at once, ``u`` of shape ``(B, n)``.

    Returns ``u (B, n)``, ``v (B, m)`` and ``σ (B,)``; row ``i`` equals
    ``power_iteration(matrices[i], u[i], ...)`` up to floating-point summation order.
    With ``row_reduce`` the matrices are this rank's rows of row-sharded matrices: ``Aᵀu`` and
    ``‖Av‖²`` are summed over the ranks, and ``u`` holds this rank's rows.
    """
    return _iterate(*stacked_products(matrices), u, iterations, tau, row_reduce)


def looped_power_iteration(
    matrices: Sequence[torch.Tensor],
    u: torch.Tensor,
    iterations: int = 1,
    tau: float = 1e-12,
    row_reduce: RowReduce = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """As :func:`batched_power_iteration` for a list of equally shaped matrices, one ``mv`` per
    matrix (each read in place, no stacked copy); only the small vectors are stacked."""
    return _iterate(*looped_products(matrices), u, iterations, tau, row_reduce)


Products = tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]


def stacked_products(matrices: torch.Tensor) -> Products:
    """``(u ↦ Aᵀu, v ↦ A v)`` for a stack ``(B, n, m)``: one ``bmm`` each."""
    return (lambda u_: torch.bmm(matrices.transpose(1, 2), u_.unsqueeze(-1)).squeeze(-1),
            lambda v_: torch.bmm(matrices, v_.unsqueeze(-1)).squeeze(-1))


def looped_products(matrices: Sequence[torch.Tensor], dtype: torch.dtype | None = None) -> Products:
    """The same for a list of equally shaped matrices, one ``mv`` per matrix (read in place).
    With ``dtype`` each matrix is converted to it when it is read, one at a time (a bf16 gradient
    gets no fp32 copy that lives beyond its own product)."""
    def read(a: torch.Tensor) -> torch.Tensor:
        return a if dtype is None else a.to(dtype)

    return (lambda u_: torch.stack([torch.mv(read(a).t(), row) for a, row in zip(matrices, u_, strict=True)]),
            lambda v_: torch.stack([torch.mv(read(a), row) for a, row in zip(matrices, v_, strict=True)]))


def replicated_power_iteration(
    operators: Sequence[Products],
    u: Sequence[torch.Tensor],
    iterations: int,
    tau: float,
    average: Callable[[list[torch.Tensor]], object],
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Algorithm 2 on the mean ``G = (1/R) Σ_r G_r`` of each replica's matrices, all stacks in
    lockstep, reading only the local ``G_r``.

    ``operators[i]`` are ``(u ↦ G_rᵀu, v ↦ G_r v)`` of a stack ``(B, n, m)`` of this replica's
    matrices and ``u[i]`` its start vectors ``(B, n)``. Since ``Gᵀu = (1/R) Σ_r G_rᵀu`` and
    ``G v = (1/R) Σ_r G_r v``, averaging the local products gives the same ``u``, ``v``, ``σ`` on
    every replica as the power iteration on ``G``; ``average`` does it for the products of all
    stacks at once, so an iteration costs two collective calls of Σm and Σn numbers. Returns
    ``(u, v, σ)`` per stack.
    """
    us, vs, sigmas = list(u), [], []
    for _ in range(iterations):
        vs = [transpose_times(u_) for (transpose_times, _), u_ in zip(operators, us, strict=True)]
        average(vs)
        vs = [v / (torch.linalg.vector_norm(v, dim=1, keepdim=True) + tau) for v in vs]
        us = [times(v) for (_, times), v in zip(operators, vs, strict=True)]
        average(us)
        sigmas = [u_.square().sum(dim=1).sqrt() for u_ in us]
        us = [u_ / (sigma.unsqueeze(1) + tau) for u_, sigma in zip(us, sigmas, strict=True)]
    return list(zip(us, vs, sigmas, strict=True))


def _iterate(
    transpose_times: Callable[[torch.Tensor], torch.Tensor],
    times: Callable[[torch.Tensor], torch.Tensor],
    u: torch.Tensor,
    iterations: int,
    tau: float,
    row_reduce: RowReduce,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    v = sigma = u
    for _ in range(iterations):
        v = transpose_times(u)  # Aᵀu: partial sums over this rank's rows when sharded
        if row_reduce is not None:
            row_reduce(v)
        v = v / (torch.linalg.vector_norm(v, dim=1, keepdim=True) + tau)
        u = times(v)
        squared = u.square().sum(dim=1)
        if row_reduce is not None:
            row_reduce(squared)
        sigma = squared.sqrt()
        u = u / (sigma.unsqueeze(1) + tau)
    return u, v, sigma
