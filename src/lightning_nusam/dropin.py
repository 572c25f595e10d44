"""The drop-in: the sharpness-aware step around Lightning's automatic optimization.

A sharpness-aware callback on an ordinary LightningModule (its own ``training_step``, automatic
optimization) drives :mod:`lightning_nusam.step` through Lightning's public extension points
only:

- callback hooks: ``on_train_batch_start`` opens the step and keeps the micro-batch for the
  replay; ``on_before_optimizer_step`` (which Lightning calls before it clips) ends a one-pass
  step; ``on_train_batch_end`` closes the step and logs it;
- a ``torch.optim`` step pre-hook (``Optimizer.register_step_pre_hook``): on a two-pass step it
  hands the optimizer a closure that runs the first pass of the last micro-batch through
  ``Strategy.training_step``/``Strategy.backward``, ``perturb()``, the second pass of the earlier
  micro-batches the same way, and the second pass of the last one through Lightning's own
  closure, so that ``on_before_optimizer_step``, ``Trainer(gradient_clip_val=...)`` and the loss
  Lightning reports are Lightning's, on the gradients the optimizer uses; then ``restore()``.

The first passes of the earlier micro-batches are Lightning's own closures (it blocks their
gradient sync while accumulating). ``precision="16-mixed"`` is refused: Lightning's plugin runs
the closure before ``optimizer.step()`` there, where no second pass can be added.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch

from lightning_nusam.step import log_step

if TYPE_CHECKING:
    from lightning_nusam.callbacks import SharpnessAwareCallback


class DropIn:
    """Runs the callback's step for an automatic-optimization module (see the module docstring).

    Built by the callback's ``setup``, which this constructor checks: refuses what cannot work
    before the first step, naming what to use instead.
    """

    def __init__(self, callback: SharpnessAwareCallback, trainer: pl.Trainer,
                 module: pl.LightningModule) -> None:
        self.callback, self.trainer = callback, trainer
        self._check(module)
        self._hook_handle: Any = None
        self._stepped = False  # the optimizer stepped during the current batch
        self._contexts: list[ExitStack] = []

    @property
    def step(self):
        return self.callback.step

    def _check(self, module: pl.LightningModule) -> None:
        name, module_name, trainer = type(self.callback).__name__, type(module).__name__, self.trainer
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

    # ----------------------------------------------------------------------------- lifecycle
    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        self._hook_handle = optimizer.register_step_pre_hook(self._before_optimizer_step)

    def detach(self) -> None:
        if self._hook_handle is not None:
            self._hook_handle.remove()
            self._hook_handle = None

    def close_contexts(self) -> None:
        while self._contexts:
            self._contexts.pop().close()

    # ----------------------------------------------------------------------------- hooks
    def begin_micro_batch(self, trainer: pl.Trainer, module: pl.LightningModule, batch: Any,
                          batch_idx: int) -> None:
        # read at every micro-batch: GradientAccumulationScheduler changes it between epochs
        self.step.accumulate_grad_batches = accumulate = trainer.accumulate_grad_batches
        plan = self.step.begin_micro_batch(trainer, batch, batch_idx)
        last = (batch_idx + 1) % accumulate == 0 or trainer.is_last_batch
        if plan.two_pass and not last:  # Lightning runs this micro-batch's first pass itself
            context = self.step.pass_context(trainer.strategy, module, "first", last_micro_batch=False,
                                             manage_sync=False)
            self._contexts.append(context.__enter__())

    def before_clipping(self) -> None:
        """A plain or one-pass step: remove ``ε`` and estimate the next direction from the
        unclipped gradient (``on_before_optimizer_step`` runs before Lightning clips)."""
        if not self.step.plan.two_pass:
            self.step.after_backward()

    def end_micro_batch(self, trainer: pl.Trainer, module: pl.LightningModule, outputs: Any) -> None:
        self.close_contexts()
        plan = self.step.plan
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else None
        if isinstance(loss, torch.Tensor) and not (plan.two_pass and self._stepped):
            self.step.record_loss(None, loss * self.step.accumulate_grad_batches)
        if not self._stepped:
            self.step.end_micro_batch()
            return
        self._stepped = False
        first, second = self.step.losses()
        self.step.finish(trainer, module)
        log_step(module, plan, self.callback, first, second)

    # ----------------------------------------------------------------------------- the passes
    def _before_optimizer_step(self, optimizer: torch.optim.Optimizer, args: tuple,
                               kwargs: dict) -> tuple[tuple, dict] | None:
        """``torch.optim`` step pre-hook: on a two-pass step, hand the optimizer our closure."""
        self._stepped = True
        if not self.step.plan.two_pass:
            return None
        closure = kwargs.get("closure", args[0] if args else None)
        if closure is None:
            raise RuntimeError(
                f"{type(self.callback).__name__}: optimizer.step() was called without a closure, so "
                "the second pass cannot run (a precision plugin that steps outside the closure, such "
                "as 16-mixed); mix lightning_nusam.SAMMixin into the module instead"
            )

        def sharpness_aware_closure() -> Any:
            return self._two_passes(optimizer, closure)

        if "closure" in kwargs or not args:
            return args, {**kwargs, "closure": sharpness_aware_closure}
        return (sharpness_aware_closure, *args[1:]), kwargs

    def _two_passes(self, optimizer: torch.optim.Optimizer, lightning_closure: Callable[[], Any]) -> Any:
        trainer = self.trainer
        module, strategy, step = trainer.lightning_module, trainer.strategy, self.step
        batch, batch_idx = step.micro_batches[-1]
        accumulate = step.accumulate_grad_batches
        if len(step.micro_batches) == 1:  # the step starts here: clear the previous gradients
            module.optimizer_zero_grad(trainer.current_epoch, batch_idx, optimizer)
        with step.pass_context(strategy, module, "first", last_micro_batch=True):
            loss = self._forward_backward(optimizer, batch, batch_idx, accumulate)
        if loss is None:  # training_step skipped this batch: no perturbation
            return lightning_closure()
        step.record_loss("first", loss)
        step.perturb()
        try:
            optimizer.zero_grad(set_to_none=True)
            for replay_batch, replay_idx in step.micro_batches[:-1]:
                with step.pass_context(strategy, module, "second", last_micro_batch=False):
                    replay_loss = self._forward_backward(optimizer, replay_batch, replay_idx, accumulate)
                if replay_loss is not None:
                    step.record_loss("second", replay_loss)
            with step.pass_context(strategy, module, "second", last_micro_batch=True, manage_sync=False):
                result = lightning_closure()  # training_step, backward, hooks, clipping
            if isinstance(result, torch.Tensor):
                step.record_loss("second", result.detach() * accumulate)
        finally:
            step.restore()
        return result

    def _forward_backward(self, optimizer: torch.optim.Optimizer, batch: Any, batch_idx: int,
                          accumulate: int) -> torch.Tensor | None:
        """One pass of the user's ``training_step`` through the strategy (DDP forward, precision)."""
        strategy = self.trainer.strategy
        output = strategy.training_step(batch, batch_idx)
        loss = output.get("loss") if isinstance(output, Mapping) else output
        if loss is None:
            return None
        strategy.backward(loss / accumulate, optimizer)
        return loss.detach()
