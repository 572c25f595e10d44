"""The paper's Figure 1: GD vs SAM vs νSAM vs GaussSAM on a quadratic, fixed ρ, γ_k = 1/k.

``f(X) = (L/2)·‖X − B‖²_F`` over a matrix ``X ∈ R^{n×m}`` (the setting of Theorem 4.3). Every
method takes ``X_{k+1} = X_k − γ_k ∇f(X_k + ε_k)`` with its own ``ε_k`` (GD: ``ε = 0``), computed
by this package's perturbation classes on an ``nn.Parameter``. With ``L = 1/2`` plain GD's
error shrinks like ``Π(1 − L/k) ~ k^{-1/2}``, so ``min_i ‖∇f(X_i)‖²`` falls like ``1/k``.
The script plots ``min_{i<k} ‖∇f(X_i)‖²`` against ``k`` on log-log axes and fits its slope
over the last decade; whatever the slopes are, they are printed as measured.

Run: ``python examples/figure1_quadratic.py [--steps 10000] [--out runs/figure1_quadratic.png]``.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
from torch import nn

from lightning_nusam.perturbations import GaussianPerturbation, L2Perturbation, NuclearPerturbation

METHODS = {
    "GD": None,
    "SAM": lambda model, rho: L2Perturbation(model, rho=rho),
    "νSAM": lambda model, rho: NuclearPerturbation(model, rho=rho, power_iterations=1),
    "GaussSAM": lambda model, rho: GaussianPerturbation(model, rho=rho, seed=0),
}


def run(method: str, steps: int, rho: float, curvature: float, shape=(10, 8), seed: int = 0) -> list[float]:
    """``min_{i<k} ‖∇f(X_i)‖²`` for k = 1..steps."""
    generator = torch.Generator().manual_seed(seed)
    target = torch.randn(shape, generator=generator, dtype=torch.float64)
    model = nn.Module()
    model.weight = nn.Parameter(torch.randn(shape, generator=generator, dtype=torch.float64))
    factory = METHODS[method]
    perturbation = factory(model, rho) if factory is not None else None
    best, history = math.inf, []
    with torch.no_grad():
        for k in range(1, steps + 1):
            gradient = curvature * (model.weight - target)
            best = min(best, float(gradient.square().sum()))
            history.append(best)
            if perturbation is not None:
                model.weight.grad = gradient
                perturbation.perturb()
                gradient = curvature * (model.weight - target)  # ∇f at X + ε
                perturbation.restore()
            model.weight -= (1.0 / k) * gradient
    return history


def fitted_slope(history: list[float], first: int) -> float:
    """Least-squares slope of log(history) against log(k) for k ≥ first, over the values that
    are still > 0 (a method whose gradient reached exactly 0 stops there); NaN if none are."""
    ks = torch.arange(first, len(history) + 1, dtype=torch.float64)
    values = torch.tensor(history[first - 1 :], dtype=torch.float64)
    ks, values = ks[values > 0], values[values > 0]
    if len(values) < 2:
        return math.nan
    x, y = ks.log(), values.log()
    x_centered = x - x.mean()
    return float((x_centered * (y - y.mean())).sum() / x_centered.square().sum())


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10_000)
    parser.add_argument("--rho", type=float, default=1.0)
    parser.add_argument("--curvature", type=float, default=0.5, help="L of f(X) = (L/2)||X - B||^2")
    parser.add_argument("--out", type=Path, default=Path("runs/figure1_quadratic.png"))
    args = parser.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = max(2, args.steps // 10)  # the last decade: the asymptotic rate
    slopes = {}
    figure, axis = plt.subplots(figsize=(6, 4.2))
    for method in METHODS:
        history = run(method, args.steps, args.rho, args.curvature)
        slopes[method] = fitted_slope(history, first)
        axis.loglog(range(1, args.steps + 1), history, label=f"{method} (slope {slopes[method]:.2f})")
    axis.set_xlabel("iteration k")
    axis.set_ylabel(r"$\min_{i<k} \|\nabla f(x^i)\|^2$")
    axis.set_title(f"quadratic, L={args.curvature}, ρ={args.rho}, γ_k=1/k")
    axis.grid(alpha=0.3, which="both")
    axis.legend()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(args.out, dpi=110)
    print(f"fitted slopes of log min||grad f||^2 vs log k over k in [{first}, {args.steps}]:")
    for method, slope in slopes.items():
        print(f"  {method:<9} {slope:+.2f}")
    print(f"plot: {args.out}")
    return slopes


if __name__ == "__main__":
    main()
