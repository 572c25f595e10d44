"""The sharpness-aware step: one home for both ways in (the drop-in callback and SAMMixin).

One optimizer step over ``k`` micro-batches (``k = 1`` without gradient accumulation), the
paper's Algorithm 3 with accumulation::

    first pass:   for each micro-batch j: forward + backward(loss_j / k)   at w
                  (gradient sync on the last micro-batch only; never for m-SAM)
    perturb(ρ_t)  w ← w + ε from the accumulated first-pass gradient
    zero grads
    second pass:  for each kept micro-batch j: forward + backward(loss_j / k)   at w + ε
                  (gradient sync on the last micro-batch only)
    restore()     w ← w − ε
    optimizer.step() on the second-pass gradients; LR schedulers; m-SAM re-synchronisation

A *one-pass* step (``one_pass=True``) applies ``ε_t`` from the direction estimated at the end of
the previous step, runs the single pass at ``w + ε_t``, restores, estimates the direction for the
next step from this gradient, and steps. A *plain* step (before the start, between
``every_n_steps``) is one pass at ``w``.

This module holds what both ways in share: the plan of a step (:class:`StepPlan`, decided by
the callback, the *policy*), the micro-batches kept for the replay, the contexts of each pass
(gradient sync, BatchNorm statistics), the losses of both passes, and which pass is running
(:func:`sam_pass`). The mixin runs the passes through ``compute_loss``/``manual_backward``; the
drop-in callback through ``Strategy.training_step``/``Strategy.backward`` and Lightning's own
closure. Nothing here imports the callbacks or the mixin.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import ParallelStrategy
from torch import nn

if TYPE_CHECKING:
    from lightning_nusam.perturbations import Perturbation

PassName = Literal["first", "second"]
BatchNormUpdate = Literal["first", "second", "both"]


@dataclass(frozen=True)
class StepPlan:
    """What one optimizer step does; decided once, at its first micro-batch.

    Attributes:
        perturb: the step perturbs (two passes, or one pass at ``w + ε`` when ``one_pass``).
        rho: the radius in force (0 when not perturbing).
        one_pass: ``ε`` comes from the previous step's direction; a single pass.
        estimate_after: estimate the direction for the next step after the last backward
            (one-pass mode, from its start on: the first started step only primes it).
    """

    perturb: bool = False
    rho: float = 0.0
    one_pass: bool = False
    estimate_after: bool = False

    @property
    def two_pass(self) -> bool:
        return self.perturb and not self.one_pass


PLAIN_STEP = StepPlan()


class DrivesTheStep:
    """Marks a LightningModule that runs the sharpness-aware step itself (``SAMMixin``); the
    callback then only plans the steps. Any other module gets the drop-in: the callback runs
    the passes around Lightning's automatic optimization."""


class StepPolicy(Protocol):
    """What the step asks the sharpness-aware callback (see ``SharpnessAwareCallback``)."""

    sync_first_pass: bool
    batchnorm_update: BatchNormUpdate

    @property
    def perturbation(self) -> Perturbation: ...

    def plan_step(self, trainer: pl.Trainer) -> StepPlan: ...

    def after_optimizer_step(
        self, trainer: pl.Trainer, module: pl.LightningModule, plan: StepPlan
    ) -> None: ...


@contextlib.contextmanager
def frozen_running_stats(module: nn.Module) -> Iterator[None]:
    """Run BatchNorm layers on batch statistics without updating their running statistics.

    ``track_running_stats=False`` in training mode normalises with the batch statistics, as
    before, but passes no running buffers to ``batch_norm`` and does not count the batch, so
    ``running_mean``, ``running_var`` and ``num_batches_tracked`` stay exactly as they are.
    """
    layers = [
        m
        for m in module.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.training
    ]
    for layer in layers:
        layer.track_running_stats = False
    try:
        yield
    finally:
        for layer in layers:
            layer.track_running_stats = True


def planned_optimizer_steps(trainer: pl.Trainer, accumulate_grad_batches: int = 1) -> float:
    """Optimizer steps this fit will take, ``inf`` when unknown.

    Lightning's ``estimated_stepping_batches`` (which loads the training data when it has not
    yet, so it works inside ``configure_optimizers``) with two differences: the accumulation is
    the given one (the mixin accumulates under manual optimization, where the Trainer's is 1),
    and an unknown total (an ``IterableDataset`` without ``max_steps``, ``max_time`` only) is
    ``inf``, never ``max_steps = -1``.
    """
    estimate = trainer.estimated_stepping_batches
    if estimate == -1:
        return math.inf
    unlimited_epochs = trainer.max_epochs in (None, -1)  # then the estimate is max_steps (or inf)
    if accumulate_grad_batches == trainer.accumulate_grad_batches or unlimited_epochs \
            or not math.isfinite(estimate):
        return estimate
    max_steps = trainer.max_steps if trainer.max_steps not in (None, -1) else math.inf
    batches = trainer.num_training_batches  # known now: estimated_stepping_batches loaded the data
    if not math.isfinite(batches):
        return max_steps
    per_epoch = math.ceil(batches / accumulate_grad_batches)
    return min(per_epoch * max(trainer.max_epochs or 1, 1), max_steps)


def optimizer_needs_closure(optimizer: torch.optim.Optimizer) -> bool:
    """Closure-driven optimizers (LBFGS) evaluate the loss several times per ``step``."""
    if isinstance(optimizer, torch.optim.LBFGS):
        return True
    closure = inspect.signature(type(optimizer).step).parameters.get("closure")
    return closure is not None and closure.default is inspect.Parameter.empty


@dataclass
class _Window:
    """The micro-batches of the optimizer step at hand and the losses of its passes."""

    plan: StepPlan = PLAIN_STEP
    micro_batches: list[tuple[Any, int]] = field(default_factory=list)
    losses: dict[str, list[torch.Tensor]] = field(default_factory=lambda: {"first": [], "second": []})


class SharpnessAwareStep:
    """The state of the step in progress, and the pieces both ways in run it with.

    One instance per sharpness-aware callback (``callback.step``). A way in calls
    :meth:`begin_micro_batch` for every micro-batch, runs each pass inside
    :meth:`pass_context`, calls :meth:`perturb` / :meth:`restore` around the second pass and
    :meth:`finish` once the optimizer has stepped.
    """

    def __init__(self, policy: StepPolicy) -> None:
        self.policy = policy
        self.current_pass: PassName | None = None
        self._window: _Window | None = None
        #: micro-batches per optimizer step of the way in (1, the Trainer's, or the mixin's)
        self.accumulate_grad_batches = 1

    # ----------------------------------------------------------------------------- window
    @property
    def plan(self) -> StepPlan:
        """The plan of the step in progress (a plain step between steps)."""
        return self._window.plan if self._window is not None else PLAIN_STEP

    @property
    def micro_batches(self) -> list[tuple[Any, int]]:
        """``(batch, batch_idx)`` of the micro-batches kept for the second pass."""
        return self._window.micro_batches if self._window is not None else []

    def begin_micro_batch(self, trainer: pl.Trainer, batch: Any, batch_idx: int) -> StepPlan:
        """Open the step at its first micro-batch (plan it), keep the micro-batch when the second
        pass will replay it, and on a one-pass step apply ``ε`` for this micro-batch's pass."""
        opening = self._window is None
        if opening:
            self._window = _Window(self.policy.plan_step(trainer))
        plan = self._window.plan
        if plan.two_pass:
            self._window.micro_batches.append((batch, batch_idx))
        if plan.perturb and plan.one_pass:
            # applied per micro-batch and removed after it (end_micro_batch), so that nothing
            # between two micro-batches (validation, a checkpoint) ever sees w + ε
            self.policy.perturbation.apply(plan.rho, repeat=not opening)
        return plan

    def end_micro_batch(self) -> None:
        """After a micro-batch that does not end the step: remove a one-pass ``ε``."""
        if self.plan.one_pass:
            self.policy.perturbation.restore()

    def finish(self, trainer: pl.Trainer, module: pl.LightningModule) -> StepPlan:
        """Close the step after the optimizer stepped (m-SAM re-synchronisation, bookkeeping)."""
        plan = self.plan
        self._window = None
        self.current_pass = None
        self.policy.after_optimizer_step(trainer, module, plan)
        return plan

    def abandon(self) -> None:
        """Drop the step in progress (an exception, the end of the epoch): remove ``ε``."""
        self.policy.perturbation.restore()
        self._window = None
        self.current_pass = None

    # ----------------------------------------------------------------------------- passes
    def pass_context(
        self,
        strategy: pl.strategies.Strategy,
        module: nn.Module,
        name: PassName | None,
        *,
        last_micro_batch: bool,
        manage_sync: bool = True,
    ) -> contextlib.ExitStack:
        """Gradient sync and BatchNorm statistics of one micro-batch's pass.

        ``name`` is ``"first"``/``"second"`` in a two-pass step and None for the only pass of a
        plain or one-pass step. Gradients are all-reduced on the last micro-batch only, and for
        m-SAM (``sync_first_pass=False``) never in the first pass. ``batchnorm_update`` picks the
        pass that updates BatchNorm running statistics. ``manage_sync=False`` leaves the sync to
        Lightning (its own accumulation already blocks it before the last micro-batch).
        """
        stack = contextlib.ExitStack()
        sync = last_micro_batch and (name != "first" or self.policy.sync_first_pass)
        if manage_sync and not sync and isinstance(strategy, ParallelStrategy):
            stack.enter_context(strategy.block_backward_sync())
        update = self.policy.batchnorm_update
        if (name == "first" and update == "second") or (name == "second" and update == "first"):
            stack.enter_context(frozen_running_stats(module))
        stack.enter_context(self._naming(name))
        return stack

    @contextlib.contextmanager
    def _naming(self, name: PassName | None) -> Iterator[None]:
        previous, self.current_pass = self.current_pass, name
        try:
            yield
        finally:
            self.current_pass = previous

    def record_loss(self, name: PassName | None, loss: torch.Tensor) -> None:
        """Keep a micro-batch's loss (unscaled by ``1/k``) for logging."""
        if self._window is not None:
            self._window.losses["second" if name == "second" else "first"].append(loss.detach())

    def losses(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Mean loss of the first (or only) and of the second pass over the step's micro-batches."""
        if self._window is None:
            return None, None
        means = [torch.stack(v).float().mean() if v else None for v in self._window.losses.values()]
        return means[0], means[1]

    # ----------------------------------------------------------------------------- perturbation
    def perturb(self) -> None:
        """``w ← w + ε`` from the accumulated first-pass gradients (two-pass steps)."""
        self.policy.perturbation.perturb(self.plan.rho)

    def restore(self) -> None:
        self.policy.perturbation.restore()

    def after_backward(self) -> None:
        """After the last backward of a plain or one-pass step: remove a one-pass ``ε`` and
        estimate the direction of the next step from this (unscaled, unclipped) gradient."""
        plan = self.plan
        if plan.one_pass and plan.perturb:
            self.policy.perturbation.restore()
        if plan.estimate_after:
            self.policy.perturbation.estimate()


def sam_pass(module: pl.LightningModule) -> PassName | None:
    """Which pass of a two-pass step is running: ``"first"`` (at ``w``), ``"second"`` (at
    ``w + ε``), or None (the only pass of a plain or one-pass step, or no sharpness-aware
    callback). For ``training_step``/``compute_loss`` code that should run once per step, e.g.
    ``if sam_pass(self) != "second": self.log("train_loss", loss)``."""
    try:
        trainer = module.trainer
    except RuntimeError:  # not attached to a Trainer
        return None
    if trainer is None:
        return None
    for callback in trainer.callbacks:
        step = getattr(callback, "step", None)
        if isinstance(step, SharpnessAwareStep):
            return step.current_pass
    return None


def log_step(
    module: pl.LightningModule,
    plan: StepPlan,
    policy: StepPolicy,
    first: torch.Tensor | None,
    second: torch.Tensor | None,
) -> None:
    """Log what a step did, on step and epoch: ``sam/active`` (it perturbed), ``sam/rho`` (the
    radius applied, 0 when none), ``sam/loss_perturbed`` and ``sam/sharpness`` (second − first
    pass loss, two-pass steps) and ``sam/skipped_steps`` (non-finite gradients)."""
    log: dict[str, Any] = {"on_step": True, "on_epoch": True}
    module.log("sam/active", float(plan.perturb), **log)
    module.log("sam/rho", float(plan.rho), **log)
    if plan.two_pass and first is not None and second is not None:
        module.log("sam/loss_perturbed", second, **log)
        module.log("sam/sharpness", second - first, **log)
    perturbation = policy.perturbation
    module.log("sam/skipped_steps", perturbation.skipped_count, reduce_fx="max", **log)
