"""The SAM-optimizer convention on top of any perturbation of this package.

``SAMOptimizer(perturbation, base_optimizer)`` is what users of davda54/sam and
``pytorch_optimizer.SAM`` know: ``first_step()`` after the first backward, ``second_step()`` after
the second, or ``step(closure)`` for both. It wraps an optimizer you built (the perturbation keeps
its own options), and shares that optimizer's ``param_groups`` and ``state``, so that a
``torch.optim.lr_scheduler`` built on the wrapper moves the base optimizer's learning rate and a
checkpoint of the wrapper holds both.

Migrating from davda54/sam::

    # before: optimizer = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    optimizer = SAMOptimizer(NuclearPerturbation(model, rho=0.05),
                             torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    loss_fn(model(x), y).backward()
    optimizer.first_step(zero_grad=True)    # w ← w + ε
    loss_fn(model(x), y).backward()
    optimizer.second_step(zero_grad=True)   # w ← w − ε, then the base optimizer's step

With a ``GradScaler`` (16-mixed): the first-pass gradients may stay scaled (ε does not depend on
their scale; non-finite ones skip the perturbation), and the scaler steps the wrapper::

    scaler.scale(loss_fn(model(x), y)).backward()
    optimizer.first_step(zero_grad=True)
    scaler.scale(loss_fn(model(x), y)).backward()
    optimizer.restore()                     # w ← w − ε before the scaler decides to step or skip
    scaler.step(optimizer)                  # optimizer.step(): the base step, if the gradients are finite
    scaler.update()
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

from lightning_nusam.engine import StepEngine, optimizer_needs_closure, optimizer_parameters
from lightning_nusam.perturbations import Perturbation
from lightning_nusam.plan import StepPlan
from lightning_nusam.step_options import BatchNormUpdate, StepOptions


def _signature_help(perturbation: Any, base_optimizer: Any, unexpected: dict[str, Any]) -> str:
    """What to write instead of the davda54/sam signature ``SAM(params, torch.optim.SGD, rho=...,
    adaptive=..., lr=...)``, with the values given."""
    if isinstance(perturbation, Perturbation):
        return f"SAMOptimizer got unexpected keyword arguments {sorted(unexpected)}"
    options = dict(unexpected)
    rho, adaptive = options.pop("rho", 0.05), options.pop("adaptive", False)
    method = f"L2Perturbation(model, rho={rho!r}, adaptive=True)" if adaptive else \
        f"NuclearPerturbation(model, rho={rho!r})"
    name = getattr(base_optimizer, "__name__", type(base_optimizer).__name__)
    module = getattr(base_optimizer, "__module__", "torch.optim")
    module = "torch.optim" if module.startswith("torch.optim") else module
    base = ", ".join(["model.parameters()", *(f"{key}={value!r}" for key, value in options.items())])
    return ("SAMOptimizer(params, OptimizerClass, rho=..., ...) is the signature of davda54/sam; here the "
            "method is built on the model and the base optimizer is an instance: "
            f"SAMOptimizer({method}, {module}.{name}({base})) (L2Perturbation(model, rho=...) is SAM's "
            "perturbation, adaptive=True ASAM)")


class SAMOptimizer(torch.optim.Optimizer):
    """A sharpness-aware optimizer: a perturbation around a base optimizer.

    Args:
        perturbation: the method (νSAM: ``NuclearPerturbation(model, rho=...)``; SAM:
            ``L2Perturbation``; ...), built on the model the base optimizer trains.
        base_optimizer: the optimizer that steps with the second-pass gradients (SGD, AdamW,
            ...); its ``param_groups``, ``defaults`` and ``state`` are this wrapper's.
        same_random_draws: in :meth:`step`, both calls of the closure see the same random draws
            (dropout masks) and the random stream afterwards is that of one call.
        batchnorm_update: in :meth:`step`, which call updates BatchNorm running statistics
            (``"first"``, ``"second"`` or ``"both"``).

    ``step(closure)`` calls the closure for both passes: it must run forward and backward and
    return the loss (zeroing gradients inside it is allowed, as for any torch closure). It
    returns the first pass's loss, at ``w``. Unlike davda54/sam and ``pytorch_optimizer.SAM``,
    whose closure computes only the second pass after a backward you ran yourself, the first
    backward is the closure's too: drop that first ``loss.backward()`` when moving to
    ``step(closure)``. ``step()`` without a closure is :meth:`second_step` (what a ``GradScaler``
    calls). ``step(closure)`` starts and ends with cleared gradients; gradients found when it
    starts (micro-batches accumulated before it, which its second pass cannot replay) are reported.
    What is perturbed is what the base optimizer updates (its groups' parameters that require
    grad). A closure that clips the gradients through the optimizer's groups (Lightning's
    ``gradient_clip_val``) clips only the second pass's: ε comes from the unclipped gradient.

    Example:
        >>> from torch import nn
        >>> from lightning_nusam.perturbations import NuclearPerturbation
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
        >>> optimizer = SAMOptimizer(NuclearPerturbation(model, rho=0.05),
        ...                          torch.optim.SGD(model.parameters(), lr=0.1))
        >>> scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
        >>> x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
        >>> def closure():
        ...     optimizer.zero_grad()
        ...     loss = nn.functional.cross_entropy(model(x), y)
        ...     loss.backward()
        ...     return loss
        >>> loss = optimizer.step(closure)
        >>> scheduler.step()
        >>> optimizer.base_optimizer.param_groups[0]["lr"]
        0.05
    """

    def __init__(self, perturbation: Perturbation, base_optimizer: torch.optim.Optimizer, *,
                 same_random_draws: bool = True, batchnorm_update: BatchNormUpdate = "first",
                 **unexpected: Any) -> None:
        if unexpected or (isinstance(base_optimizer, type) and not isinstance(perturbation, Perturbation)):
            raise TypeError(_signature_help(perturbation, base_optimizer, unexpected))
        if not isinstance(perturbation, Perturbation):
            raise TypeError("`perturbation` must be a lightning_nusam Perturbation (NuclearPerturbation, "
                            f"L2Perturbation, ...), got {type(perturbation).__name__}")
        if not isinstance(base_optimizer, torch.optim.Optimizer):
            raise TypeError("`base_optimizer` must be a torch.optim.Optimizer built on the model's "
                            f"parameters, got {type(base_optimizer).__name__} (an instance, not the class)")
        if isinstance(base_optimizer, SAMOptimizer):
            raise TypeError("`base_optimizer` is already a SAMOptimizer: wrap the base optimizer once")
        if optimizer_needs_closure(base_optimizer):
            raise ValueError(f"`base_optimizer` {type(base_optimizer).__name__} evaluates the loss several "
                             "times per step through a closure (LBFGS and the like); use a first-order "
                             "optimizer")
        super().__init__(base_optimizer.param_groups, base_optimizer.defaults)
        # one set of groups and state: what schedulers, GradScaler and checkpoints read and write
        self.param_groups = base_optimizer.param_groups
        self.defaults = base_optimizer.defaults
        self.state = base_optimizer.state
        self.base_optimizer = base_optimizer
        self.perturbation = perturbation
        options = StepOptions(same_random_draws=same_random_draws, batchnorm_update=batchnorm_update)
        self.engine = StepEngine(perturbation.model, perturbation, options)
        self._first_step_taken = False  # first_step() ran since the last base step
        self._warned_gradients = False

    # ----------------------------------------------------------------------------- the convention
    @torch.no_grad()
    def first_step(self, zero_grad: bool = False, rho: float | None = None) -> None:
        """``w ← w + ε`` from the gradients of the first backward (radius ``rho``, default the
        perturbation's); then clear the gradients if ``zero_grad``."""
        self.perturbation.restrict_to(optimizer_parameters(self.base_optimizer))
        self.perturbation.perturb(rho)
        self._first_step_taken = True
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def restore(self) -> None:
        """``w ← w − ε`` (nothing when no ``ε`` is applied); ``step()`` then takes the base step."""
        self.perturbation.restore()

    def second_step(self, zero_grad: bool = False) -> None:
        """``w ← w − ε``, then the base optimizer's step with the second-pass gradients (through
        :meth:`step`, which LR schedulers watch); then clear the gradients if ``zero_grad``."""
        self.step()
        if zero_grad:
            self.zero_grad()

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """The whole step with ``closure`` (called for both passes; see the class docstring), or,
        without one, ``w ← w − ε`` and the base optimizer's step (:meth:`second_step`). Returns the
        first pass's loss (None without a closure)."""
        if closure is None:
            if not self._first_step_taken:
                raise RuntimeError(
                    "SAMOptimizer.step() without a closure is the second half of a step, but first_step() "
                    "was not called since the last step: call first_step() after the first backward, or "
                    "step(closure). (Lightning's automatic optimization with 16-mixed steps a GradScaler "
                    "this way: there, use the NuSAM/SAM callbacks with SAMMixin and a plain optimizer)"
                )
            with torch.no_grad():
                self.perturbation.restore()
                self.base_optimizer.step()
            self._first_step_taken = False
            return None
        if not self._warned_gradients and any(p.grad is not None for group in self.param_groups
                                              for p in group["params"]):
            self._warned_gradients = True
            warnings.warn(
                "SAMOptimizer.step(closure) found gradients already present; the step starts from cleared "
                "gradients (both passes come from the closure). To accumulate micro-batches, pass them "
                "to StepEngine.step as a list, or in Lightning use the callbacks (NuSAM, SAM, ...) with "
                "a plain optimizer", UserWarning, stacklevel=2)
        passes = _ClosurePasses(closure, self._first_call_hides_parameters)
        self.engine.step(passes, [(None, 0)], self.base_optimizer, StepPlan(True, self.perturbation.rho))
        self.zero_grad()  # so that gradients found at the next step are someone's accumulation
        return passes.first_loss

    @contextlib.contextmanager
    def _first_call_hides_parameters(self) -> Iterator[None]:
        """While the closure runs the first pass, each of :attr:`param_groups` holds one empty
        placeholder parameter (with an empty gradient) instead of the model's (the other entries
        are the base optimizer's): what the closure does through the optimizer's groups after its
        backward, such as Lightning's gradient clipping (``gradient_clip_val``, by value or by
        norm), then leaves the first-pass gradient alone, and ε comes from the gradient backward
        gave. The second call's gradient is clipped as usual."""
        like = next(iter(optimizer_parameters(self.base_optimizer)), torch.zeros(0))
        placeholder = torch.nn.Parameter(torch.zeros(0, dtype=like.dtype, device=like.device))
        placeholder.grad = torch.zeros_like(placeholder)
        self.param_groups = [{**group, "params": [placeholder]} for group in self.base_optimizer.param_groups]
        try:
            yield
        finally:
            self.param_groups = self.base_optimizer.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if hasattr(self, "base_optimizer"):  # (Optimizer.__init__ adds the groups it was given)
            self.base_optimizer.add_param_group(param_group)
        else:
            super().add_param_group(param_group)

    # ----------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """The base optimizer's state and the perturbation's (νSAM's warm-start vectors)."""
        return {"base_optimizer": self.base_optimizer.state_dict(),
                "perturbation": self.perturbation.state_dict()}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:  # type: ignore[override]
        if "base_optimizer" not in state_dict:
            raise ValueError("not a SAMOptimizer state_dict (no 'base_optimizer' entry): a base optimizer's "
                             "state_dict goes to `optimizer.base_optimizer.load_state_dict`")
        self.base_optimizer.load_state_dict(state_dict["base_optimizer"])
        self.perturbation.load_state_dict(state_dict["perturbation"])

    def __repr__(self) -> str:
        return f"SAMOptimizer({self.perturbation!r}, {self.base_optimizer!r})"


class _ClosurePasses:
    """A torch closure as the engine's passes: each call runs one forward and backward."""

    def __init__(self, closure: Callable[[], Any],
                 first_call: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
                 ) -> None:
        self.closure, self.first_loss, self.first_call, self.calls = closure, None, first_call, 0

    def forward_backward(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
        self.calls += 1
        with torch.enable_grad(), self.first_call() if self.calls == 1 else contextlib.nullcontext():
            loss = self.closure()
        if self.first_loss is None:
            self.first_loss = loss
        return loss.detach() if isinstance(loss, torch.Tensor) else torch.zeros(())

    def no_sync(self) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext()


__all__ = ["SAMOptimizer"]
