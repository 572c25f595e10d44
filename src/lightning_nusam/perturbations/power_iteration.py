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

import torch


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
    v = u.new_empty(matrix.shape[1])
    sigma = u.new_zeros(())
    for _ in range(iterations):
        v = torch.mv(matrix.t(), u)
        v = v / (torch.linalg.vector_norm(v) + tau)
        u = torch.mv(matrix, v)
        sigma = torch.linalg.vector_norm(u)
        u = u / (sigma + tau)
    return u, v, sigma


def batched_power_iteration(
    matrices: torch.Tensor, u: torch.Tensor, iterations: int = 1, tau: float = 1e-12
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Algorithm 2 on a stack ``(B, n, m)`` of matrices at once, ``u`` of shape ``(B, n)``.

    Returns ``u (B, n)``, ``v (B, m)`` and ``σ (B,)``; row ``i`` equals
    ``power_iteration(matrices[i], u[i], ...)`` up to floating-point summation order.
    """
    v = u.new_empty(matrices.shape[0], matrices.shape[2])
    sigma = u.new_zeros(matrices.shape[0])
    for _ in range(iterations):
        v = torch.bmm(matrices.transpose(1, 2), u.unsqueeze(-1)).squeeze(-1)
        v = v / (torch.linalg.vector_norm(v, dim=1, keepdim=True) + tau)
        u = torch.bmm(matrices, v.unsqueeze(-1)).squeeze(-1)
        sigma = torch.linalg.vector_norm(u, dim=1)
        u = u / (sigma.unsqueeze(1) + tau)
    return u, v, sigma
