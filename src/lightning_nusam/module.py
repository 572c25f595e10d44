"""The two-pass training step as a LightningModule mixin (manual optimization).

One step of a sharpness-aware method (the paper's Algorithm 3)::

    loss = compute_loss(batch)            # first pass at w (all-reduced, or local for m-SAM)
    backward(loss)
    perturbation.perturb()                # w ← w + ε, in place
    zero grads
    backward(compute_loss(batch))         # second pass at w + ε, always all-reduced
    perturbation.restore()                # w ← w − ε, in place
    optimizer.step()                      # exactly once (clipping in on_before_optimizer_step)
    zero grads; step LR schedulers as configure_optimizers declares

Lightning's precision plugin scales and unscales (16-mixed), its strategy all-reduces (DDP);
this module only orders the calls. Without a sharpness-aware callback on the Trainer, or before
the callback's start, the step is a plain one-pass step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any, Literal

import torch
from lightning.pytorch.strategies import ParallelStrategy
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from lightning_nusam.callbacks import SharpnessAwareCallback

LossOutput = torch.Tensor | Mapping[str, torch.Tensor]


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


class SAMMixin:
    """Mix into a ``LightningModule`` to train it with a sharpness-aware callback.

    Implement ``compute_loss(batch, batch_idx)`` (a scalar loss, or a dict with ``"loss"`` and
    extra tensors to log) instead of ``training_step``; keep ``validation_step`` etc. as usual.
    The step uses manual optimization with exactly one optimizer from ``configure_optimizers``.

    Args (keyword-only, passed through ``super().__init__``):
        gradient_clip_val: clip the (unscaled) second-pass gradients to this value. Lightning
            rejects ``Trainer(gradient_clip_val=...)`` under manual optimization.
        gradient_clip_algorithm: ``"norm"`` or ``"value"``.

    Logged on step and epoch: ``train/loss`` (first pass), ``sam/loss_perturbed``,
    ``sam/sharpness`` (perturbed − clean loss), ``sam/active``, ``sam/rho`` and
    ``sam/skipped_steps`` (perturbations skipped for non-finite gradients).

    Example:
        >>> import lightning as L
        >>> from lightning_nusam import NuSAM
        >>> class Regressor(SAMMixin, L.LightningModule):
        ...     def __init__(self):
        ...         super().__init__(gradient_clip_val=1.0)
        ...         self.net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 1))
        ...     def compute_loss(self, batch, batch_idx):
        ...         x, y = batch
        ...         return nn.functional.mse_loss(self.net(x), y)
        ...     def configure_optimizers(self):
        ...         return torch.optim.AdamW(self.parameters(), lr=1e-3)
        >>> data = torch.utils.data.TensorDataset(torch.randn(32, 4), torch.randn(32, 1))
        >>> trainer = L.Trainer(max_epochs=1, callbacks=[NuSAM(rho=0.05)], logger=False,
        ...                     enable_checkpointing=False, enable_progress_bar=False,
        ...                     enable_model_summary=False)
        >>> trainer.fit(Regressor(), torch.utils.data.DataLoader(data, batch_size=8))
        >>> trainer.global_step
        4
    """

    def __init__(
        self,
        *args: Any,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: Literal["norm", "value"] = "norm",
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if gradient_clip_val is not None and not gradient_clip_val > 0:
            raise ValueError(f"`gradient_clip_val` must be > 0 or None, got {gradient_clip_val}")
        if gradient_clip_algorithm not in ("norm", "value"):
            raise ValueError(
                f"`gradient_clip_algorithm` must be 'norm' or 'value', got {gradient_clip_algorithm!r}"
            )
        self.gradient_clip_val = gradient_clip_val
        self.gradient_clip_algorithm = gradient_clip_algorithm
        self.automatic_optimization = False

    # ----------------------------------------------------------------------------- user API
    def compute_loss(self, batch: Any, batch_idx: int) -> LossOutput:
        """The training loss of a batch; called once per pass (twice when perturbing)."""
        raise NotImplementedError(
            f"{type(self).__name__} mixes in SAMMixin and must implement compute_loss(batch, batch_idx)"
        )

    def sharpness_aware_callback(self) -> SharpnessAwareCallback | None:
        """The Trainer's sharpness-aware callback, if any."""
        found = [cb for cb in self.trainer.callbacks if isinstance(cb, SharpnessAwareCallback)]
        return found[0] if found else None

    # ----------------------------------------------------------------------------- the step
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        optimizer = self.optimizers()
        if isinstance(optimizer, list):
            raise RuntimeError(
                f"SAMMixin supports exactly one optimizer; configure_optimizers returned {len(optimizer)}"
            )
        callback = self.sharpness_aware_callback()
        active = callback is not None and callback.is_active(self.trainer)

        if not active:
            loss, extras = self._forward_backward(batch, batch_idx)
            loss_perturbed = None
        else:
            assert callback is not None
            perturbation = callback.perturbation
            with self._first_pass_context(callback):
                loss, extras = self._forward_backward(batch, batch_idx)
            try:
                perturbation.perturb()
                self.zero_grad(set_to_none=True)
                with self._second_pass_context(callback):
                    loss_perturbed, _ = self._forward_backward(batch, batch_idx)
            finally:
                perturbation.restore()  # before anything can save or evaluate the weights

        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        self._step_lr_schedulers("step", batch_idx)
        if active and not callback.sync_first_pass:
            callback.maybe_resynchronize(self.trainer, self)
        self._log_step(loss, loss_perturbed, extras, callback, active)
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Clip here: Lightning has already unscaled the gradients (16-mixed) at this point."""
        if self.gradient_clip_val is not None:
            self.clip_gradients(
                optimizer,
                gradient_clip_val=self.gradient_clip_val,
                gradient_clip_algorithm=self.gradient_clip_algorithm,
            )

    def on_train_epoch_end(self) -> None:
        """Step ``interval="epoch"`` schedulers (after the epoch's validation, as Lightning does)."""
        self._step_lr_schedulers("epoch", None)

    # ----------------------------------------------------------------------------- helpers
    def _forward_backward(self, batch: Any, batch_idx: int) -> tuple[torch.Tensor, dict[str, Any]]:
        output = self.compute_loss(batch, batch_idx)
        if isinstance(output, Mapping):
            if "loss" not in output:
                raise KeyError("compute_loss returned a dict without a 'loss' entry")
            extras = {k: v for k, v in output.items() if k != "loss"}
            loss = output["loss"]
        else:
            loss, extras = output, {}
        self.manual_backward(loss)
        return loss.detach(), extras

    def _first_pass_context(self, callback: SharpnessAwareCallback) -> contextlib.AbstractContextManager:
        stack = contextlib.ExitStack()
        strategy = self.trainer.strategy
        if not callback.sync_first_pass and isinstance(strategy, ParallelStrategy):
            stack.enter_context(strategy.block_backward_sync())  # m-SAM: local first pass
        if callback.batchnorm_update == "second":
            stack.enter_context(frozen_running_stats(self))
        return stack

    def _second_pass_context(self, callback: SharpnessAwareCallback) -> contextlib.AbstractContextManager:
        if callback.batchnorm_update == "first":
            return frozen_running_stats(self)
        return contextlib.nullcontext()

    def _step_lr_schedulers(self, interval: str, batch_idx: int | None) -> None:
        """Lightning steps no scheduler under manual optimization; mirror what it does otherwise."""
        trainer = self.trainer
        for config in trainer.lr_scheduler_configs:
            if config.interval != interval:
                continue
            index = (batch_idx if interval == "step" else trainer.current_epoch) + 1
            if index % config.frequency != 0:
                continue
            monitor_value = None
            if config.reduce_on_plateau:
                monitor_value = trainer.callback_metrics.get(config.monitor)
                if monitor_value is None:
                    message = (
                        f"ReduceLROnPlateau monitors {config.monitor!r}, which is not logged; "
                        f"available: {sorted(trainer.callback_metrics)}"
                    )
                    if config.strict:
                        raise RuntimeError(message)
                    rank_zero_warn(message + ". Skipping this learning-rate update.")
                    continue
            self.lr_scheduler_step(config.scheduler, monitor_value)

    def _log_step(
        self,
        loss: torch.Tensor,
        loss_perturbed: torch.Tensor | None,
        extras: Mapping[str, Any],
        callback: SharpnessAwareCallback | None,
        active: bool,
    ) -> None:
        log = dict(on_step=True, on_epoch=True)
        self.log("train/loss", loss, prog_bar=True, **log)
        for name, value in extras.items():
            self.log(f"train/{name}", value, **log)
        if callback is None:
            return
        self.log("sam/active", float(active), **log)
        self.log("sam/rho", callback.rho, **log)
        if loss_perturbed is not None:
            self.log("sam/loss_perturbed", loss_perturbed, **log)
            self.log("sam/sharpness", loss_perturbed - loss, **log)
        if callback.has_perturbation:
            skipped = callback.perturbation.skipped_count  # a device tensor: no sync per step
            self.log("sam/skipped_steps", skipped, on_step=True, on_epoch=True, reduce_fx="max")
