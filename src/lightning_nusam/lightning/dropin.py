"""The drop-in: the sharpness-aware step around Lightning's own, on an unmodified module.

On a LightningModule with automatic optimization the Trainer runs ``training_step``, the
backward and ``optimizer.step(closure)`` itself. :class:`DropInDriver` adds the second pass
through public extension points only, one engine call per event (the second call order of
:mod:`lightning_nusam.engine`):

==============================  ===================================================
Lightning event                 engine call
==============================  ===================================================
``on_train_batch_start``        :meth:`~lightning_nusam.engine.StepEngine.open_micro_batch`
``on_after_backward``           :meth:`~lightning_nusam.engine.StepEngine.after_backward`
                                (a backward Lightning ran, not one of the engine's passes)
``optimizer.step`` pre-hook     hands the optimizer a closure that calls
                                :meth:`~lightning_nusam.engine.StepEngine.finish_in_closure`
                                (two-pass steps): the rest of the first pass, ``perturb()``, the
                                second passes, the last through Lightning's closure (its hooks,
                                clipping and reported loss), ``restore()``
``on_before_optimizer_step``    :meth:`~lightning_nusam.engine.StepEngine.before_optimizer_step`
``on_train_batch_end``          :meth:`~lightning_nusam.engine.StepEngine.close_micro_batch`
==============================  ===================================================

The driver is made and held by the callback (:class:`~lightning_nusam.SharpnessAwareCallback`)
for one fit; the optimizer pre-hook is installed with :meth:`DropInDriver.install` and removed
with :meth:`DropInDriver.remove` (at teardown and after an exception).
"""

from __future__ import annotations

import inspect
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any, Protocol

import lightning.pytorch as pl
import torch
from lightning.pytorch.trainer.call import _call_strategy_hook

from lightning_nusam.engine import LossPasses, StepEngine
from lightning_nusam.lightning.trainer import backward_sync_blocker, is_last_of_window
from lightning_nusam.plan import PLAIN_STEP, StepPlan, StepResult


class StepOwner(Protocol):
    """What the driver asks of the callback that holds it."""

    #: no optimizer updates the module's parameters in this fit: nothing to drive
    inert: bool

    def plan(self, trainer: pl.Trainer) -> StepPlan:
        """The plan of the step that starts at ``trainer.global_step``."""

    def take_optimizer(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        """Check a new optimizer and :meth:`DropInDriver.install` it."""

    def report_step(self, module: pl.LightningModule, result: StepResult) -> None:
        """Log what a step did."""


def check_drop_in(name: str, trainer: pl.Trainer, module: pl.LightningModule) -> None:
    """Refuse, before the first step, what the drop-in cannot run, naming what to use instead
    (``name``: the callback's, for the messages)."""
    module_name = type(module).__name__
    if not module.automatic_optimization:
        raise ValueError(
            f"{name} drives the step of a module with automatic optimization (the drop-in), or "
            f"of one that mixes in lightning_nusam.SAMMixin; {module_name} uses manual optimization "
            f"without the mixin. Write `class {module_name}(SAMMixin, LightningModule)` with "
            "compute_loss(batch, batch_idx), or return the loss from training_step and let "
            "Lightning optimize"
        )
    if getattr(trainer.precision_plugin, "scaler", None) is not None:
        raise ValueError(
            f"{name} on a module without SAMMixin cannot use precision='16-mixed': Lightning runs "
            "the closure before optimizer.step() there, so the second pass cannot be added "
            "without patching Lightning. Use precision='bf16-mixed', or mix "
            "lightning_nusam.SAMMixin into the module (compute_loss instead of training_step), "
            "which supports 16-mixed"
        )
    if trainer.strategy.handles_gradient_accumulation:
        raise ValueError(f"{name} cannot drive the step of {type(trainer.strategy).__name__}, which "
                         "runs its own optimizer step; use DDP or ModelParallelStrategy")
    if "dataloader_iter" in inspect.signature(module.training_step).parameters:
        raise ValueError(f"{name} replays batches and cannot drive a training_step that takes "
                         "`dataloader_iter`; take (batch, batch_idx)")


class DropInDriver:
    """Drives the :class:`~lightning_nusam.engine.StepEngine` from Lightning's hooks for one fit.

    Args:
        owner: the callback (its plan, optimizer checks and step report).
        engine: the engine of this fit.
        trainer: the Trainer of this fit.
    """

    def __init__(self, owner: StepOwner, engine: StepEngine, trainer: pl.Trainer) -> None:
        self.owner, self.engine, self.trainer = owner, engine, trainer
        #: Lightning's optimizer, hooked while :attr:`inert` is False
        self.optimizer: torch.optim.Optimizer | None = None
        self._hook_handle: Any = None
        self._plan = PLAIN_STEP  # the plan of the step in progress (remembered when it begins)
        # the micro-batch in progress
        self._batch_idx = 0
        self._window_ends = False  # it is the last of its optimizer step
        self._stepped = False  # the optimizer stepped during it
        self._host_ran_first_pass = False  # Lightning's closure ran its first pass
        self._own_pass = False  # a backward of the engine's passes is running

    # ----------------------------------------------------------------------------- install
    def install(self, optimizer: torch.optim.Optimizer, *, hook: bool = True) -> None:
        """Drive ``optimizer``'s steps (a ``torch.optim`` step pre-hook); ``hook=False`` only
        remembers it (an optimizer of nothing the module trains)."""
        self.remove()
        self.optimizer = optimizer
        if hook:
            self._hook_handle = optimizer.register_step_pre_hook(self._before_optimizer_step)

    def remove(self) -> None:
        """Remove the optimizer pre-hook (nothing when none is installed)."""
        if self._hook_handle is not None:
            self._hook_handle.remove()
            self._hook_handle = None

    # ----------------------------------------------------------------------------- hooks
    def on_train_batch_start(self, trainer: pl.Trainer, module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if trainer.optimizers[:1] != [self.optimizer] and not self.engine.in_step:
            self.owner.take_optimizer(trainer, module)  # replaced during fit
        if self.owner.inert:
            return
        # the accumulation is read each time: GradientAccumulationScheduler changes it
        last = is_last_of_window(trainer, batch_idx, trainer.accumulate_grad_batches)
        self._batch_idx, self._window_ends = batch_idx, last
        self._stepped = self._host_ran_first_pass = False
        self.engine.open_micro_batch(batch, batch_idx, last=last, plan=self._begin_plan,
                                     optimizer=self.optimizer,
                                     no_sync=backward_sync_blocker(trainer.strategy))

    def on_after_backward(self) -> None:
        if self._own_pass or self.owner.inert:  # the engine follows the backward of its own passes
            return
        if self.engine.after_backward() != "second":
            self._host_ran_first_pass = True

    def on_before_optimizer_step(self) -> None:
        if not self.owner.inert:
            self.engine.before_optimizer_step()

    def on_train_batch_end(self, module: pl.LightningModule, outputs: Any) -> None:
        if self.owner.inert:
            return
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else None
        host_loss = None
        if isinstance(loss, torch.Tensor) and self._host_ran_first_pass:
            host_loss = loss.detach() * self.trainer.accumulate_grad_batches
        result = self.engine.close_micro_batch(stepped=self._stepped, window_ends=self._window_ends,
                                               host_loss=host_loss, global_step=self.trainer.global_step)
        if self._stepped or self._window_ends:  # the step is over (ended, or dropped unstepped)
            self._plan = PLAIN_STEP
        if result is not None:
            self.owner.report_step(module, result)

    def on_train_epoch_end(self) -> None:
        self.abandon()  # a window the epoch ended without stepping (nothing to replay)

    def abandon(self) -> None:
        """Drop the step in progress (no ``ε`` left in the weights)."""
        self._plan = PLAIN_STEP
        self.engine.abandon()

    # ----------------------------------------------------------------------------- the step
    def _begin_plan(self) -> StepPlan:
        self._plan = self.owner.plan(self.trainer)
        return self._plan

    def _before_optimizer_step(self, optimizer: torch.optim.Optimizer, args: tuple,
                               kwargs: dict) -> tuple[tuple, dict] | None:
        """``torch.optim`` step pre-hook: on a two-pass step, hand the optimizer our closure."""
        self._stepped = True
        if not self._plan.two_pass:  # no step open, or one of a single pass
            return None
        closure = kwargs.get("closure", args[0] if args else None)
        if closure is None:
            raise RuntimeError(
                f"{type(self.owner).__name__}: optimizer.step() was called without a closure, so "
                "the second pass cannot run (a precision plugin that steps outside the closure, such "
                "as 16-mixed); mix lightning_nusam.SAMMixin into the module instead"
            )

        def sharpness_aware_closure() -> Any:
            trainer = self.trainer
            return self.engine.finish_in_closure(
                self._passes(optimizer), optimizer, closure, host_ran_first_pass=self._host_ran_first_pass,
                zero_grad=lambda: trainer.lightning_module.optimizer_zero_grad(
                    trainer.current_epoch, self._batch_idx, optimizer),
                host_loss_scale=trainer.accumulate_grad_batches)

        if "closure" in kwargs or not args:
            return args, {**kwargs, "closure": sharpness_aware_closure}
        return (sharpness_aware_closure, *args[1:]), kwargs

    def _passes(self, optimizer: torch.optim.Optimizer) -> LossPasses:
        """The engine's passes: the user's ``training_step`` through the strategy (its DDP forward
        and precision) and ``Strategy.backward`` (Lightning's backward hooks), the loss divided
        by ``k``."""
        trainer = self.trainer

        def backward(loss: torch.Tensor) -> None:
            self._own_pass = True
            try:
                trainer.strategy.backward(loss, optimizer)
            finally:
                self._own_pass = False

        return LossPasses(self._training_step, trainer.accumulate_grad_batches, backward=backward,
                          no_sync=backward_sync_blocker(trainer.strategy))

    def _training_step(self, batch: Any, batch_idx: int) -> Any:
        """``training_step`` as Lightning's own closure calls it: under its name (``self.log`` keeps
        one series) and profiler section, with the arguments Lightning passes (``batch_idx`` only
        when ``training_step`` takes it)."""
        arguments = self.trainer.fit_loop.epoch_loop._build_kwargs(OrderedDict(), batch, batch_idx)
        return _call_strategy_hook(self.trainer, "training_step", *arguments.values())
