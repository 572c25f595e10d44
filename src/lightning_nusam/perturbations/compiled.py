"""νSAM's arithmetic as ``torch.compile``'d programs (``execution="compiled"``).

The eager path launches a few kernels per weight matrix, each costing some µs of host (Python
and dispatcher) time; on a GPU that host time, not the bytes, sets the cost of ``perturb()`` and
``restore()``. Here the arithmetic of a whole step runs as one function compiled with
``torch.compile(fullgraph=True, dynamic=False)``, over the lists of gradients ``G_i``, weights
``M_i`` and power-iteration vectors ``u_i``, ``v_i`` of all selected matrices at once.
``perturb`` computes, for every matrix ``i`` that trains and has a gradient::

    repeat T times:                                   # Algorithm 2, warm-started at u_i
        v_i ← G_iᵀ u_i / (‖G_iᵀ u_i‖₂ + τ)
        u_i ← G_i v_i / (‖G_i v_i‖₂ + τ),   σ_i = ‖G_i v_i‖₂
    finite = every u_i and v_i is finite              # one flag for the step
    u_i    ← u_i if finite and σ_i > 0, else the previous u_i (the warm start never collapses)
    v_i    ← v_i · s_i if finite, else 0              # s_i = 1 (νSAM), σ_i / √(Σ_j σ_j²) (νSAM-Norm)
    skipped_steps += not finite
    M_i    ← M_i + ρ u_i v_iᵀ                         # eq. (8a)

``estimate`` and ``add`` are its two halves (a one-pass step); ``remove`` is the restore,
``M_i ← M_i − ρ u_i v_iᵀ`` (eq. 8b), with the rounding exceptions written back where the restore
is exact (bf16/fp16 weights; see :mod:`~lightning_nusam.perturbations.exact`).

Everything else (which matrices train and have a gradient, following the model, counters,
checkpoint hooks) stays in Python, outside the compiled functions. What a compiled function is
specialised on is its *plan*: the rows of each shape group it covers and the exception budgets of
exactly restored weights; tensors are guarded on their shapes, strides and dtypes only. A
:class:`CompiledPrograms` compiles a fresh copy of a function for each plan (so that several
perturbations, or several plans, never share one code object's recompilation budget), which
happens once per selection in practice. ``ρ`` is a 0-d tensor on the vectors' device, refilled
when it changes, so a radius schedule does not recompile.

The functions below are written as the eager reference path writes its arithmetic (the same
operations in the same order, rounding to low precision where it rounds: inductor's
``emulate_precision_casts`` is on), so that they give the same numbers to the last bits of a
summation order, and an exact restore stays bit-exact.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from lightning_nusam.perturbations import NuclearPerturbation
    >>> from lightning_nusam.perturbations.compiled import torch_compile_problem
    >>> execution = "compiled" if torch_compile_problem() is None else "eager"  # an older torch: eager
    >>> model = nn.Sequential(nn.Linear(8, 4))
    >>> nusam = NuclearPerturbation(model, rho=0.1, execution=execution)
    >>> model(torch.randn(2, 8)).square().sum().backward()
    >>> before = model[0].weight.detach().clone()
    >>> nusam.perturb()   # compiles at the first call (seconds), then reuses the program
    >>> eps = model[0].weight.detach() - before
    >>> round(float(torch.linalg.matrix_norm(eps, ord="nuc")), 4)  # rank one, nuclear norm ρ
    0.1
    >>> nusam.restore()
"""

from __future__ import annotations

import types
from collections.abc import Callable, Sequence
from typing import Any

import torch

from lightning_nusam.checks import check_choice

#: The ways ``perturb()``/``restore()`` can run (the ``execution`` option).
EXECUTIONS = ("eager", "compiled")

#: What inductor must know, as an option of ``torch.compile``: round explicit casts to bf16/fp16
#: inside fused kernels as the eager path does (the exact restore depends on it).
COMPILE_OPTIONS = {"emulate_precision_casts": True}

#: Device types the compiled path is built for (inductor: C++ on the CPU, Triton on CUDA).
COMPILED_DEVICE_TYPES = ("cpu", "cuda")

#: Plans whose compiled programs are kept per function (the oldest is dropped beyond it).
MAX_PLANS = 8

Plan = tuple[Any, ...]


def check_execution(value: object) -> str:
    """The ``execution`` option: ``"eager"``, or ``"compiled"`` where this torch can compile it."""
    execution = check_choice("execution", value, EXECUTIONS)
    if execution == "compiled":
        problem = torch_compile_problem()
        if problem is not None:
            raise ValueError(f"`execution='compiled'` is not available: {problem}; "
                             "use `execution='eager'` (the default)")
    return execution  # type: ignore[return-value]


def torch_compile_problem() -> str | None:
    """Why this torch cannot run the compiled programs (None when it can)."""
    try:
        import torch._dynamo
        import torch._inductor.config as inductor_config
    except ImportError as error:  # pragma: no cover - a torch built without the compiler
        return f"this torch ({torch.__version__}) has no compiler ({error})"
    if not torch._dynamo.is_dynamo_supported():  # pragma: no cover - e.g. a new Python version
        return f"torch.compile does not support this Python with torch {torch.__version__}"
    if not hasattr(inductor_config, "emulate_precision_casts") or not hasattr(torch, "nonzero_static"):
        return (f"torch {torch.__version__} is too old (the compiled path needs inductor's "
                "`emulate_precision_casts` and `torch.nonzero_static`; tested with torch 2.14)")
    return None


def device_problem(device: torch.device) -> str | None:
    """Why inductor cannot compile for ``device`` here (None when it can, or cannot tell)."""
    if device.type not in COMPILED_DEVICE_TYPES:
        return f"the compiled path runs on {' and '.join(COMPILED_DEVICE_TYPES)} tensors, not {device.type}"
    try:
        if device.type == "cuda":
            from torch.utils._triton import has_triton

            return None if has_triton() else "Triton is not installed (inductor's CUDA kernels need it)"
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
    except (ImportError, AttributeError):  # pragma: no cover - another torch's internals: cannot tell
        return None
    except Exception as error:  # inductor raises its own types for a missing compiler
        return f"inductor finds no C++ compiler for CPU tensors ({type(error).__name__}: {error})"
    return None


class CompiledPrograms:
    """``torch.compile``'d copies of the functions of one perturbation, one per (function, plan).

    Each copy gets a code object of its own: ``torch.compile`` keeps its compiled graphs and
    their guards on the code object, so copies never count against each other's
    recompilation limit, and a plan seen before is a dictionary lookup. ``compiles`` counts the
    copies made.
    """

    def __init__(self, functions: dict[str, Callable[..., Any]]) -> None:
        self.functions = functions
        self.programs: dict[tuple[str, Plan], Callable[..., Any]] = {}
        self.compiles = 0

    def __call__(self, name: str, plan: Plan, *args: Any) -> Any:
        key = (name, plan)
        program = self.programs.get(key)
        if program is None:
            if len(self.programs) >= MAX_PLANS * len(self.functions):
                self.programs.pop(next(iter(self.programs)))
            function = self.functions[name]
            copy = types.FunctionType(function.__code__.replace(), function.__globals__,
                                      function.__name__, function.__defaults__, function.__closure__)
            program = self.programs[key] = torch.compile(copy, fullgraph=True, dynamic=False,
                                                         options=COMPILE_OPTIONS)
            self.compiles += 1
        try:
            return program(*args)
        except Exception as error:
            if type(error).__module__.startswith(("torch._dynamo", "torch._inductor")):
                raise RuntimeError(
                    f"the compiled νSAM program {name!r} failed to compile or run "
                    f"({type(error).__name__}: {str(error).strip().splitlines()[0] if str(error) else ''}); "
                    "construct the perturbation with `execution='eager'` to run without torch.compile"
                ) from error
            raise


def nuclear_functions(iterations: int, tau: float, normalized: bool,
                      low_precision: Sequence[torch.dtype]) -> dict[str, Callable[..., Any]]:
    """The functions that :class:`CompiledPrograms` compiles for νSAM (``normalized``: νSAM-Norm).

    Arguments, per shape group ``k`` (lists in the order of the groups):

    - ``grads[k]`` / ``weights[k]``: the gradients / weights (``.data``, logical shape) of the
      matrices in ``rows[k]`` (a tuple of row numbers of the group, part of the plan);
    - ``us[k]`` (``B×n``) / ``vs[k]`` (``B×m``): the group's vectors, written in place;
    - ``rhos[k]``: ρ as a 0-d tensor of the vectors' dtype and device;
    - ``exact[k]``: whether the group's weights are restored exactly, with ``capacities[k]``
      (one per row of ``rows[k]``) exception slots; ``exceptions[k]``: what ``add`` returned for it.
    """
    low_precision = tuple(low_precision)

    def power_iteration(grads, u):
        v = sigma = u
        for _ in range(iterations):
            v = torch.stack([torch.mv(a.t(), row) for a, row in zip(grads, u.unbind(0), strict=True)])
            v = v / (torch.linalg.vector_norm(v, dim=1, keepdim=True) + tau)
            u = torch.stack([torch.mv(a, row) for a, row in zip(grads, v.unbind(0), strict=True)])
            sigma = u.square().sum(dim=1).sqrt()
            u = u / (sigma.unsqueeze(1) + tau)
        return u, v, sigma

    def estimate(grads, us, vs, rows, skipped):
        results = []
        for group_grads, u, group_rows in zip(grads, us, rows, strict=True):
            matrices = [g.reshape(g.shape[0], -1).to(u.dtype) for g in group_grads]
            everyone = len(group_rows) == u.shape[0]
            start = u if everyone else torch.stack([u[row] for row in group_rows])
            results.append(power_iteration(matrices, start))
        finite = torch.stack([torch.isfinite(u_).all() & torch.isfinite(v_).all()
                              for u_, v_, _ in results]).all()
        scales = [None] * len(results)
        if normalized:  # νSAM-Norm: σ_i / √(Σ_j σ_j²), folded into v_i
            total = torch.sqrt(sum(sigma.square().sum() for _, _, sigma in results))
            scales = [sigma / (total + tau) for _, _, sigma in results]
        for (u_new, v_new, sigma), u, v, group_rows, scale in zip(results, us, vs, rows, scales, strict=True):
            keep_new_u = (finite & (sigma > 0)).unsqueeze(1)
            if scale is not None:
                v_new = v_new * scale.unsqueeze(1)
            v_new = torch.where(finite, v_new, torch.zeros_like(v_new))
            if len(group_rows) == u.shape[0]:
                u.copy_(torch.where(keep_new_u, u_new, u))
                v.copy_(v_new)
            else:
                for i, row in enumerate(group_rows):
                    u[row].copy_(torch.where(keep_new_u[i], u_new[i], u[row]))
                    v[row].copy_(v_new[i])
        skipped.add_((~finite).to(skipped.dtype))

    def epsilon(u, v, rho, weight):
        return (torch.outer(u, v) * rho).view(weight.shape)

    def add_outer(weight, u, v, rho, sign):
        if weight.dtype in low_precision or not weight.is_contiguous():
            weight.add_((torch.outer(u, v) * (sign * rho)).to(weight.dtype).view(weight.shape))
        else:  # addr_: w + (α u) vᵀ
            matrix = weight.view(u.shape[0], v.shape[0])
            matrix.add_(((sign * rho) * u.to(weight.dtype)).unsqueeze(1) * v.to(weight.dtype).unsqueeze(0))

    def add_removably(weight, eps, capacity):
        e = eps.to(weight.dtype)
        perturbed = weight + e
        mismatch = torch.ne(perturbed - e, weight).reshape(-1)
        flat = torch.nonzero_static(mismatch, size=capacity, fill_value=0).squeeze(1)
        count = mismatch.sum()
        added = count <= capacity
        values = weight.reshape(-1).index_select(0, flat)
        index_dtype = torch.int32 if weight.numel() < 2**31 else torch.int64
        weight.copy_(torch.where(added, perturbed, weight))
        return (flat.to(index_dtype), values, added), count

    def add(weights, us, vs, rows, rhos, exact, capacities):
        exceptions, counts = [], []
        for group_weights, u, v, group_rows, rho, is_exact, group_capacities in zip(
                weights, us, vs, rows, rhos, exact, capacities, strict=True):
            group_exceptions, group_counts = [], []
            for i, (weight, row) in enumerate(zip(group_weights, group_rows, strict=True)):
                if is_exact:
                    found, count = add_removably(weight, epsilon(u[row], v[row], rho, weight),
                                                 group_capacities[i])
                    group_exceptions.append(found)
                    group_counts.append(count)
                else:
                    add_outer(weight, u[row], v[row], rho, 1)
            exceptions.append(group_exceptions)
            if is_exact:  # each row's count at its place (0 for rows not perturbed now)
                scattered = [torch.zeros((), dtype=torch.int64, device=u.device)] * u.shape[0]
                for row, count in zip(group_rows, group_counts, strict=True):
                    scattered[row] = count
                counts.append(torch.stack(scattered))
            else:
                counts.append(None)
        return exceptions, counts

    def remove(weights, us, vs, rows, rhos, exact, exceptions):
        for group_weights, u, v, group_rows, rho, is_exact, group_exceptions in zip(
                weights, us, vs, rows, rhos, exact, exceptions, strict=True):
            for i, (weight, row) in enumerate(zip(group_weights, group_rows, strict=True)):
                if not is_exact:
                    add_outer(weight, u[row], v[row], rho, -1)
                    continue
                index, values, added = group_exceptions[i]
                weight.sub_(epsilon(u[row], v[row], rho, weight).to(weight.dtype) * added)
                if weight.is_contiguous():
                    weight.view(-1).index_copy_(0, index.long(), values)
                else:
                    weight.index_put_(torch.unravel_index(index.long(), weight.shape), values)

    def perturb(grads, weights, us, vs, rows, skipped, rhos, exact, capacities):
        estimate(grads, us, vs, rows, skipped)
        return add(weights, us, vs, rows, rhos, exact, capacities)

    return {"estimate": estimate, "add": add, "remove": remove, "perturb": perturb}
