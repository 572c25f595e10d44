"""SAMMixin: the sharpness-aware step under manual optimization, for explicit control.

The mixin runs the step of :class:`~lightning_nusam.engine.StepEngine` with ``compute_loss`` and
``manual_backward``: it supports everything the drop-in does plus ``precision="16-mixed"``
(Lightning's precision plugin scales and unscales; the mixin only orders the calls), and takes
the options Lightning refuses under manual optimization (``gradient_clip_val``,
``accumulate_grad_batches``) in its ``__init__``. Without a sharpness-aware callback on the
Trainer, or before its start, the step is a plain one-pass step.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from lightning_nusam.checks import check_count
from lightning_nusam.engine import LossPasses, StepEngine
from lightning_nusam.lightning.callback import SharpnessAwareCallback, sam_pass, sharpness_aware_callback
from lightning_nusam.lightning.lr_schedulers import ManualLRSchedulers
from lightning_nusam.lightning.trainer import (
    backward_sync_blocker,
    is_last_of_window,
    planned_optimizer_steps,
)
from lightning_nusam.plan import PLAIN_STEP, PassName

LossOutput = torch.Tensor | Mapping[str, torch.Tensor] | None
#: hooks a subclass may override without ``super()``: the mixin's part of them runs anyway
_MIXIN_HOOKS = {"on_before_optimizer_step": "_clip_second_pass_gradients",
                "on_train_epoch_end": "_step_epoch_schedulers"}


class SAMMixin:
    """Mix into a ``LightningModule`` to run the sharpness-aware step with explicit control.

    Implement ``compute_loss(batch, batch_idx)`` (a scalar loss, a dict with ``"loss"`` and
    extra tensors to log, or None to skip the micro-batch) instead of ``training_step``; keep
    ``validation_step`` etc. as usual. Put ``SAMMixin`` first in the bases:
    ``class Model(SAMMixin, LightningModule)`` (or ``(SAMMixin, YourModule)``).
    The step uses manual optimization with exactly one optimizer from ``configure_optimizers``.
    (An unmodified module gets the same step from the callback alone; the mixin is for
    ``precision="16-mixed"`` and for code that wants the passes in its own hands.)

    Args (keyword-only, passed through ``super().__init__``):
        gradient_clip_val: clip the (unscaled) second-pass gradients to this value. Lightning
            rejects ``Trainer(gradient_clip_val=...)`` under manual optimization.
        gradient_clip_algorithm: ``"norm"`` or ``"value"``.
        accumulate_grad_batches: micro-batches per optimizer step (Lightning rejects the
            Trainer's flag under manual optimization). The first pass runs over every micro-
            batch as it arrives, each loss divided by ``k``; after the last one the perturbation
            is computed once from the accumulated gradient and the kept micro-batches are
            replayed at ``w + ε``. A last, partial window steps at the end of the epoch.

    Logged on step and epoch: ``train/loss`` (first pass), the extra entries of
    ``compute_loss``'s dict as ``train/<key>``, and the callback's ``sam/active``, ``sam/rho``,
    ``sam/loss_perturbed``, ``sam/sharpness`` (perturbed − clean loss) and ``sam/skipped_steps``.
    ``compute_loss`` runs once per pass: ``self.log`` inside it logs both passes (their mean on
    epoch); check ``self.sam_pass`` (``"first"``, ``"second"`` or None for a step's only pass)
    to log once.

    ``ReduceLROnPlateau`` is stepped with the metric named by ``"monitor"`` in the scheduler
    dict that ``configure_optimizers`` returns (Lightning drops that key under manual
    optimization; the mixin reads it), at the declared interval, after validation.

    Example:
        >>> import lightning as L
        >>> from torch import nn
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

    #: the callback plans and reports this module's steps; the mixin runs them
    runs_its_own_sharpness_aware_step: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        mro = cls.__mro__
        if nn.Module in mro and mro.index(SAMMixin) > mro.index(nn.Module):
            base = next(b for b in cls.__bases__ if issubclass(b, nn.Module))
            raise TypeError(
                f"{cls.__name__}: SAMMixin comes after {base.__name__} in the bases, so "
                f"{base.__name__}'s methods replace the mixin's (its __init__ never runs). Put SAMMixin "
                f"before it: class {cls.__name__}(SAMMixin, {base.__name__})"
            )
        configure = cls.__dict__.get("configure_optimizers")
        if configure is not None and not getattr(configure, "_reads_plateau_monitors", False):
            cls.configure_optimizers = _reading_plateau_monitors(configure)  # type: ignore[attr-defined]
        for hook, part in _MIXIN_HOOKS.items():
            override = cls.__dict__.get(hook)
            if override is not None and not getattr(override, "_runs_the_mixin_part", False):
                setattr(cls, hook, _running_the_mixin_part(override, part))

    def __init__(
        self,
        *args: Any,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: Literal["norm", "value"] = "norm",
        accumulate_grad_batches: int = 1,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if type(self).training_step is not SAMMixin.training_step:
            raise TypeError(
                f"{type(self).__name__} mixes in SAMMixin and defines training_step, which would replace "
                "the mixin's two-pass step (and train nothing under its manual optimization). Implement "
                "compute_loss(batch, batch_idx) instead, returning the loss (or a dict with 'loss'); or "
                "drop SAMMixin and keep training_step: the callback alone then drives the step"
            )
        if gradient_clip_val is not None and (isinstance(gradient_clip_val, bool)
                                              or not isinstance(gradient_clip_val, int | float)
                                              or not gradient_clip_val > 0):
            raise ValueError(f"`gradient_clip_val` must be > 0 or None, got {gradient_clip_val!r}")
        if gradient_clip_algorithm not in ("norm", "value"):
            raise ValueError(
                f"`gradient_clip_algorithm` must be 'norm' or 'value', got {gradient_clip_algorithm!r}"
            )
        self.gradient_clip_val = gradient_clip_val
        self.gradient_clip_algorithm = gradient_clip_algorithm
        self.accumulate_grad_batches = check_count("accumulate_grad_batches", accumulate_grad_batches, 1,
                                                   whole_floats=True)
        self.automatic_optimization = False
        self._lr_schedulers = ManualLRSchedulers()
        self._plain_engine: StepEngine | None = None
        self._mixin_parts_done: dict[str, bool] = {}

    # ----------------------------------------------------------------------------- user API
    def compute_loss(self, batch: Any, batch_idx: int) -> LossOutput:
        """The training loss of a batch (None skips it); called once per pass (twice when perturbing)."""
        raise NotImplementedError(
            f"{type(self).__name__} mixes in SAMMixin and must implement compute_loss(batch, batch_idx)"
        )

    def sharpness_aware_callback(self) -> SharpnessAwareCallback | None:
        """The Trainer's sharpness-aware callback, if any."""
        return sharpness_aware_callback(self.trainer)

    @property
    def sam_pass(self) -> PassName | None:
        """The pass running now: ``"first"`` (at ``w``), ``"second"`` (at ``w + ε``), or None
        (the only pass of a plain or one-pass step)."""
        return sam_pass(self)  # type: ignore[arg-type]

    @property
    def estimated_optimizer_steps(self) -> float:
        """Optimizer steps of this fit with the mixin's accumulation (``inf`` when unknown); use
        it instead of ``trainer.estimated_stepping_batches``, which counts micro-batches here."""
        return planned_optimizer_steps(self.trainer, self.accumulate_grad_batches)

    # ----------------------------------------------------------------------------- the step
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
        optimizer = self.optimizers()
        if isinstance(optimizer, list):
            raise RuntimeError(
                f"SAMMixin supports exactly one optimizer; configure_optimizers returned {len(optimizer)}"
            )
        trainer, callback = self.trainer, self.sharpness_aware_callback()
        engine = callback.engine if callback is not None else self._engine_without_callback()
        last = is_last_of_window(trainer, batch_idx, self.accumulate_grad_batches)
        extras: dict[str, Any] = {}
        passes = LossPasses(functools.partial(self._loss_of, extras), self.accumulate_grad_batches,
                            backward=self.manual_backward, no_sync=backward_sync_blocker(trainer.strategy))
        plan = functools.partial(callback.plan, trainer) if callback is not None else lambda: PLAIN_STEP
        loss = engine.feed(passes, batch, batch_idx, last=last, plan=plan, optimizer=optimizer)
        if not last:
            return loss
        engine.complete_passes(passes, optimizer)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        self._lr_schedulers.step(self, "step", batch_idx)
        result = engine.end(trainer.global_step)
        shown = result.first_loss if result.first_loss is not None else loss
        if shown is not None:
            self.log("train/loss", shown, prog_bar=True, on_step=True, on_epoch=True)
        for key, value in extras.items():
            self.log(f"train/{key}", value, on_step=True, on_epoch=True)
        if callback is not None:
            callback.report_step(self, result)
        return loss

    def _loss_of(self, extras: dict[str, Any], batch: Any, batch_idx: int) -> torch.Tensor | None:
        """``compute_loss``'s loss; the extra entries of the first pass's dict go to ``extras``."""
        output = self.compute_loss(batch, batch_idx)
        if not isinstance(output, Mapping):
            return output
        if "loss" not in output:
            raise KeyError("compute_loss returned a dict without a 'loss' entry")
        if not extras and self.sam_pass != "second":
            extras.update((k, v) for k, v in output.items() if k != "loss")
        return output["loss"]

    def on_validation_model_zero_grad(self) -> None:
        """Lightning clears the gradients before a validation in the middle of an epoch. Under the
        mixin's own accumulation that validation can fall inside an optimizer step, whose first
        passes' gradients it would drop: they are kept while a step is open."""
        callback = self.sharpness_aware_callback()
        engine = callback._engine if callback is not None else self._plain_engine
        if engine is not None and engine.in_step:
            return
        super().on_validation_model_zero_grad()  # type: ignore[misc]

    def _engine_without_callback(self) -> StepEngine:
        """Plain steps (no sharpness-aware callback): the same engine, never a perturbation."""
        if self._plain_engine is None:
            self._plain_engine = StepEngine(self, None)  # type: ignore[arg-type]
        return self._plain_engine

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Clip here: Lightning has already unscaled the gradients (16-mixed) at this point. (An
        override need not call ``super()``: the clipping runs anyway.)"""
        self._clip_second_pass_gradients(optimizer)

    def _clip_second_pass_gradients(self, optimizer: torch.optim.Optimizer) -> None:
        if "on_before_optimizer_step" in self._mixin_parts_done:  # inside an override's wrapper
            self._mixin_parts_done["on_before_optimizer_step"] = True
        if self.gradient_clip_val is not None:
            self.clip_gradients(
                optimizer,
                gradient_clip_val=self.gradient_clip_val,
                gradient_clip_algorithm=self.gradient_clip_algorithm,
            )

    def on_train_epoch_end(self) -> None:
        """Step ``interval="epoch"`` schedulers (after the epoch's validation, as Lightning does).
        (An override need not call ``super()``: the schedulers step anyway.)"""
        self._step_epoch_schedulers()

    def _step_epoch_schedulers(self) -> None:
        if "on_train_epoch_end" in self._mixin_parts_done:
            self._mixin_parts_done["on_train_epoch_end"] = True
        self._lr_schedulers.step(self, "epoch", None)


def _reading_plateau_monitors(configure: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a subclass's ``configure_optimizers`` so the mixin learns the plateau monitors."""
    @functools.wraps(configure)
    def configure_optimizers(self: SAMMixin, *args: Any, **kwargs: Any) -> Any:
        return self._lr_schedulers.remember(configure(self, *args, **kwargs))

    configure_optimizers._reads_plateau_monitors = True  # type: ignore[attr-defined]
    return configure_optimizers


def _running_the_mixin_part(hook: Callable[..., Any], part: str) -> Callable[..., Any]:
    """Wrap a subclass's override of a mixin hook so that the mixin's part of it (clipping,
    epoch schedulers) runs once per call, whether or not the override calls ``super()``."""
    name = hook.__name__

    @functools.wraps(hook)
    def wrapper(self: SAMMixin, *args: Any, **kwargs: Any) -> Any:
        done = self._mixin_parts_done
        outermost = name not in done
        if outermost:
            done[name] = False
        try:
            result = hook(self, *args, **kwargs)
            if outermost and not done[name]:
                getattr(self, part)(*args, **kwargs)
        finally:
            if outermost:
                del done[name]
        return result

    wrapper._runs_the_mixin_part = True  # type: ignore[attr-defined]
    return wrapper
