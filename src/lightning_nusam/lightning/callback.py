"""The sharpness-aware callback: options, fit checks, the schedule's anchors and checkpoint state.

Put one callback on the ``Trainer`` (a preset: :class:`~lightning_nusam.NuSAM`,
:class:`~lightning_nusam.SAM`, ...). Its options are the method's (those of its perturbation
class) followed by the options common to all methods (the start, ``every_n_steps``, ρ
schedules, the step's :class:`~lightning_nusam.step_options.StepOptions`). At the start of fit it
builds the perturbation and the :class:`~lightning_nusam.engine.StepEngine`, and plans each step
with :func:`lightning_nusam.policy.plan_step`. Who runs the step depends on the module:

- an ordinary LightningModule (automatic optimization): the callback's
  :class:`~lightning_nusam.lightning.dropin.DropInDriver` (the *drop-in*);
- a module that mixes in :class:`~lightning_nusam.SAMMixin` (it declares
  ``runs_its_own_sharpness_aware_step``): the mixin, which asks the callback for its engine,
  plan and step report.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Mapping
from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from typing_extensions import override

from lightning_nusam import policy
from lightning_nusam.engine import StepEngine, optimizer_needs_closure, optimizer_parameters
from lightning_nusam.lightning.dropin import DropInDriver, check_drop_in
from lightning_nusam.lightning.trainer import SHARDED_STRATEGIES, data_parallel_group, planned_optimizer_steps
from lightning_nusam.optim import SAMOptimizer
from lightning_nusam.pass_state import RandomState
from lightning_nusam.perturbations import Perturbation
from lightning_nusam.plan import PLAIN_STEP, PassName, StepPlan, StepResult
from lightning_nusam.radius_watch import RadiusWarning, RadiusWatch
from lightning_nusam.step_options import (
    DEFAULT_RESYNC_EVERY,
    BatchNormUpdate,
    FirstPassReduction,
    StepOptions,
)

#: A module class attribute: True when the module runs the sharpness-aware step itself (SAMMixin),
#: so that the callback plans and reports its steps but does not drive them.
RUNS_ITS_OWN_STEP = "runs_its_own_sharpness_aware_step"


class SharpnessAwareCallback(Callback):
    """Base class of the sharpness-aware callbacks: the schedule, the step options, checkpoint
    state. A method is a subclass naming its perturbation class::

        class MySAM(SharpnessAwareCallback):
            perturbation_class = MyPerturbation

    and takes that class's options (everything but ``model``, as keywords) followed by these;
    the presets (:class:`~lightning_nusam.NuSAM`, ...) spell their options out in their signatures.

    Args:
        start_epoch: first epoch (0-based) with perturbation; before it steps are plain
            one-pass steps. Exclusive with ``start_fraction``.
        start_fraction: start after this fraction of the planned optimizer steps (from
            ``max_epochs``/``max_steps``); the paper starts after 10 % (``0.1``). The number of
            steps must be known: with an ``IterableDataset`` and no ``max_steps``, or
            ``max_time`` only, use ``start_epoch`` (or set ``max_steps``).
        every_n_steps: after the start, perturb the optimizer steps with
            ``global_step % every_n_steps == 0`` and take plain one-pass steps in between (the
            warm-start vectors are kept); ``1`` perturbs every step.
        rho_schedule: the radius in force at each perturbed step: ``"constant"`` (``rho``);
            ``"linear"`` or ``"cosine"`` from ``rho`` at the first step after the start to
            ``rho_final`` at the last planned step (the number of steps must be known);
            ``"lr"``: ``rho · min(1, lr_t / lr_base)`` for the first parameter group, ``lr_base``
            its base learning rate (the scheduler's ``max_lr`` or ``initial_lr``, else the
            learning rate at the first perturbed step), so a warm-up never enlarges it.
        rho_final: the end point of the ``"linear"``/``"cosine"`` schedules (default 0).
        one_pass: experimental, νSAM/νSAM-Norm/GaussSAM only: a perturbed step runs one
            forward/backward pass at ``w + ε_t`` with ``ε_t`` from the direction estimated on
            the previous step's gradient (not the paper's algorithm; see the guide, "One pass per step").
        sync_first_pass: under DDP every rank applies the ε of the mean first-pass gradient
            (Algorithm 3, default); ``False`` gives m-SAM (each rank perturbs with its own
            gradient; the second pass is always all-reduced).
        first_pass_reduction: how a synced first pass communicates under DDP: ``"auto"``
            (default) only what the perturbation reads: νSAM and νSAM-Norm all-reduce the power
            iteration's products (Σ(n+m) numbers per iteration instead of the gradient), SAM-ON
            the normalisation layers' gradients, GaussSAM nothing, SAM the whole gradient;
            ``"gradients"`` all-reduces the whole first-pass gradient for every method. Sharded
            strategies (FSDP2's ModelParallelStrategy, FSDPStrategy) always reduce the gradient.
        resync_every: under m-SAM with a restore by subtraction (νSAM/GaussSAM on fp32
            weights), ``w + ε − ε`` rounds differently on each rank; every ``resync_every``
            steps rank 0's weights are broadcast so the ranks stay identical. ``0`` disables it.
        batchnorm_update: which pass updates BatchNorm running statistics: ``"first"`` (the
            unperturbed weights, default), ``"second"`` or ``"both"``.
        same_random_draws: both passes of a micro-batch see the same random draws (dropout
            masks, ``torch.rand`` or numpy/random draws in ``training_step``), and the random
            stream after the step is that of a plain step; ``False`` lets the second pass draw
            new ones.
        **perturbation_options: the options of ``perturbation_class`` (``rho`` and the method's).
    """

    #: The method: built for the module with ``perturbation_class(module, **perturbation_options)``.
    perturbation_class: ClassVar[type[Perturbation]]

    def __init__(
        self,
        *,
        start_epoch: int | None = None,
        start_fraction: float | None = None,
        every_n_steps: int = 1,
        rho_schedule: policy.RhoSchedule = "constant",
        rho_final: float | None = None,
        one_pass: bool = False,
        sync_first_pass: bool = True,
        first_pass_reduction: FirstPassReduction = "auto",
        resync_every: int = DEFAULT_RESYNC_EVERY,
        batchnorm_update: BatchNormUpdate = "first",
        same_random_draws: bool = True,
        **perturbation_options: Any,
    ) -> None:
        if not hasattr(type(self), "perturbation_class"):
            raise TypeError(f"{type(self).__name__} names no perturbation_class: subclass "
                            "SharpnessAwareCallback with `perturbation_class = ...`, or use NuSAM, SAM, ...")
        #: the perturbation's options as given (checked); its own defaults apply to the others
        self.perturbation_options = self.perturbation_class.check_options(perturbation_options)
        rho = self.perturbation_options.get(
            "rho", inspect.signature(self.perturbation_class).parameters["rho"].default)
        self.schedule = policy.Schedule(rho=rho, start_epoch=start_epoch, start_fraction=start_fraction,
                                        every_n_steps=every_n_steps, rho_schedule=rho_schedule,
                                        rho_final=rho_final, one_pass=one_pass)
        #: the step's options, checked (every way in takes the same object)
        self.step_options = StepOptions(
            sync_first_pass=sync_first_pass, first_pass_reduction=first_pass_reduction,
            batchnorm_update=batchnorm_update, same_random_draws=same_random_draws, resync_every=resync_every)
        if one_pass and not sync_first_pass:
            raise ValueError("`sync_first_pass` and `one_pass`: m-SAM (sync_first_pass=False) keeps the "
                             "first pass local, and a one-pass step has no first pass: drop one of them")
        if one_pass and batchnorm_update != "first":
            raise ValueError("`batchnorm_update` chooses between two passes; with `one_pass=True` "
                             "the statistics come from the only pass: leave it at 'first'")
        self._perturbation: Perturbation | None = None
        self._engine: StepEngine | None = None
        #: drives the step of an automatic-optimization module (None for a SAMMixin module)
        self._driver: DropInDriver | None = None
        self._drop_in = False  # this fit's module has automatic optimization (no SAMMixin)
        #: no optimizer updates the module's parameters in this fit: nothing to do
        self.inert = False
        self._pending_state: Mapping[str, Any] | None = None
        self._pending_engine_state: Mapping[str, Any] = {}
        self._pending_rng: list[dict[str, Any]] | None = None
        self._planned_steps = math.inf
        self._first_step: int | None = None  # the first optimizer step after the start
        self._first_lr: float | None = None  # and its learning rate
        self._trainer: pl.Trainer | None = None
        self._radius_watch = RadiusWatch()

    # ----------------------------------------------------------------------------- the options
    @property
    def sync_first_pass(self) -> bool:
        return self.step_options.sync_first_pass

    @property
    def first_pass_reduction(self) -> FirstPassReduction:
        return self.step_options.first_pass_reduction

    @property
    def batchnorm_update(self) -> BatchNormUpdate:
        return self.step_options.batchnorm_update

    @property
    def same_random_draws(self) -> bool:
        return self.step_options.same_random_draws

    @property
    def resync_every(self) -> int:
        return self.step_options.resync_every

    # ----------------------------------------------------------------------------- the method
    @property
    def rho(self) -> float:
        """The radius ρ (before any schedule)."""
        return self.schedule.rho

    def make_perturbation(self, module: nn.Module) -> Perturbation:
        """Build this method's perturbation for ``module``."""
        return self.perturbation_class(module, **self.perturbation_options)

    @property
    def perturbation(self) -> Perturbation:
        if self._perturbation is None:
            raise RuntimeError(f"{type(self).__name__} has no perturbation before `Trainer.fit` set it up")
        return self._perturbation

    @property
    def engine(self) -> StepEngine:
        """The engine that runs this fit's steps (set up by ``on_fit_start``)."""
        if self._engine is None:
            raise RuntimeError(f"{type(self).__name__} has no step engine before `Trainer.fit` set it up")
        return self._engine

    @property
    def resyncs(self) -> int:
        """m-SAM re-synchronisations of the weights so far."""
        return self._engine.resyncs if self._engine is not None else 0

    @property
    def start_step(self) -> int | None:
        """The first optimizer step that perturbs (known after the start of training)."""
        if self.schedule.start_epoch is not None:
            return self._first_step
        return policy.start_step(self.schedule, self._planned_steps)

    # ----------------------------------------------------------------------------- setup
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        # state restored outside this fit (the Tuner's restore after lr_find) does not carry
        # over; a resumed fit restores its checkpoint after setup
        self._pending_state = self._pending_rng = None
        self._pending_engine_state, self._engine, self._driver, self._trainer = {}, None, None, None
        self._first_step = self._first_lr = None  # the schedule's anchors of this fit
        name = type(self).__name__
        others = sharpness_aware_callbacks(trainer)
        if len(others) > 1:
            raise ValueError(
                "more than one sharpness-aware callback on the Trainer "
                f"({', '.join(type(cb).__name__ for cb in others)}): keep exactly one"
            )
        self._drop_in = not getattr(pl_module, RUNS_ITS_OWN_STEP, False)
        if self._drop_in:
            check_drop_in(type(self).__name__, trainer, pl_module)
        elif pl_module.automatic_optimization:
            raise ValueError(
                f"{name} with SAMMixin needs manual optimization, but {type(pl_module).__name__}"
                ".automatic_optimization is True; SAMMixin sets it to False: do not set it back"
            )
        if not self.sync_first_pass and isinstance(trainer.strategy, SHARDED_STRATEGIES):
            raise ValueError(
                f"`sync_first_pass=False` (m-SAM) is not possible under {type(trainer.strategy).__name__}: "
                "with gradient sync disabled a sharded strategy leaves the gradients empty; use DDP for m-SAM"
            )
        # The perturbation is built in on_fit_start, after configure_model built the layers and
        # the strategy moved (or sharded) them, still before the first step.
        self._perturbation = None
        if self.schedule.one_pass and not self.perturbation_class.supports_one_pass:
            raise ValueError(
                f"`one_pass=True` is not available for {name}: its direction is the whole gradient, "
                "which would have to be kept between steps (a copy of the weights); use NuSAM, "
                "NuSAMNorm or GaussSAM with one_pass"
            )

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._perturbation = self.make_perturbation(pl_module)
        self._radius_watch.reset()
        if self._pending_state is not None:
            self._load_perturbation_state(self._pending_state, trainer)
            self._pending_state = None
        options = self.step_options.replace(first_pass_reduction=self._first_pass_reduction(trainer))
        self._engine = StepEngine(pl_module, self._perturbation, options,
                                  replicas=data_parallel_group(trainer))
        self._engine.load_state_dict(self._pending_engine_state)
        self._trainer = trainer
        self._driver = DropInDriver(self, self._engine, trainer) if self._drop_in else None
        self.take_optimizer(trainer, pl_module)

    def _first_pass_reduction(self, trainer: pl.Trainer) -> FirstPassReduction:
        """The option, except for two DDP settings, where the first pass all-reduces the gradient
        (``"gradients"``):

        - ``static_graph=True``: its reducer expects every backward to all-reduce, so a first pass
          that communicates only what the perturbation reads (a backward without the all-reduce,
          then one with it) is not possible there (and m-SAM is refused);
        - ``find_unused_parameters=True`` for a method whose ε does not read the gradient
          (GaussSAM): which parameters get noise depends on which ones have a gradient on any
          rank, which only the all-reduce tells (a parameter no rank used keeps none).
        """
        model = trainer.strategy.model if isinstance(trainer.strategy, DDPStrategy) else None
        name = type(self).__name__
        static = getattr(model, "static_graph", False)
        unused = (getattr(model, "find_unused_parameters", False)
                  and self.perturbation_class.replica_reduction == "nothing")
        if static and not self.sync_first_pass:
            raise ValueError(f"{name}(sync_first_pass=False) (m-SAM) keeps the first pass's gradient "
                             "local, which DDP's static_graph=True does not allow (its reducer expects every "
                             "backward to all-reduce): drop static_graph=True from DDPStrategy, or use "
                             "sync_first_pass=True")
        if self.first_pass_reduction == "gradients" or not (static or unused):
            return self.first_pass_reduction
        if data_parallel_group(trainer) is not None:
            why = ("DDPStrategy(static_graph=True) all-reduces every backward" if static else
                   "with find_unused_parameters=True, the noise covers the parameters some rank used")
            rank_zero_info(f"{name}: {why}, so the first pass all-reduces the gradient "
                           "(first_pass_reduction='gradients')")
        return "gradients"

    def take_optimizer(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Check Lightning's optimizer and hook the drop-in's step into it; the perturbation covers
        what it updates. At the start of fit, and again when a new one was installed during fit
        (a fine-tuning schedule calling ``trainer.strategy.setup_optimizers``)."""
        name = type(self).__name__
        if len(trainer.optimizers) != 1:
            raise ValueError(f"{name} needs exactly one optimizer; configure_optimizers returned "
                             f"{len(trainer.optimizers)}")
        optimizer = trainer.optimizers[0]
        own = {id(p) for p in pl_module.parameters()}
        self.inert = not any(id(p) in own for p in optimizer_parameters(optimizer))
        if self.inert:  # Lightning's no-optimizer mode (configure_optimizers returned None)
            rank_zero_warn(f"{name}: there is no optimizer of {type(pl_module).__name__}'s parameters "
                           "(configure_optimizers returned None?), so this fit takes no steps and "
                           f"{name} does nothing")
        elif optimizer_needs_closure(optimizer):
            raise ValueError(
                f"{name} cannot wrap {type(optimizer).__name__}: it evaluates the loss several times "
                "per step through a closure (LBFGS and the like). Use a first-order optimizer "
                "(SGD, AdamW, ...)"
            )
        if isinstance(optimizer, SAMOptimizer):
            raise ValueError(f"{name} and a SAMOptimizer would each run a sharpness-aware step (four "
                             "passes): return the base optimizer from configure_optimizers and keep the "
                             "callback, or drop the callback and keep SAMOptimizer")
        if not self.inert:
            self.perturbation.restrict_to(optimizer_parameters(optimizer))
        if self._driver is not None:
            self._driver.install(optimizer, hook=not self.inert)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        name = type(self).__name__
        accumulate = trainer.accumulate_grad_batches if self._drop_in else pl_module.accumulate_grad_batches
        self._planned_steps = planned_optimizer_steps(trainer, accumulate)
        unknown = not math.isfinite(self._planned_steps)
        schedule = self.schedule
        if schedule.start_fraction is not None and unknown:
            raise ValueError(
                f"{name}(start_fraction={schedule.start_fraction}) needs the number of training steps, "
                "which is unknown here (an IterableDataset without max_steps, or max_time only): "
                "pass `start_epoch` instead, or set Trainer(max_steps=...)"
            )
        if schedule.rho_schedule in ("linear", "cosine") and unknown:
            raise ValueError(
                f"{name}(rho_schedule={schedule.rho_schedule!r}) needs the number of training steps, which "
                "is unknown here: set Trainer(max_steps=...) or max_epochs with a sized dataset, or "
                "use rho_schedule='constant' or 'lr'"
            )
        start = policy.start_step(schedule, self._planned_steps)
        if start is not None and start >= self._planned_steps:
            rank_zero_warn(f"{name}: the perturbation starts at step {start} (start_fraction="
                           f"{schedule.start_fraction}) but training has {self._planned_steps} steps: "
                           "it never runs")
        if schedule.start_epoch is not None:
            max_epochs = trainer.max_epochs if trainer.max_epochs not in (None, -1) else None
            steps_per_epoch = math.ceil(trainer.num_training_batches / accumulate)
            never = max_epochs is not None and schedule.start_epoch >= max_epochs
            if not unknown and math.isfinite(steps_per_epoch):
                never = never or schedule.start_epoch * steps_per_epoch >= self._planned_steps
            if never:
                rank_zero_warn(f"{name}: start_epoch={schedule.start_epoch} is never reached "
                               f"(max_epochs={trainer.max_epochs}, max_steps={trainer.max_steps}): "
                               "it never runs")
        self._restore_rng(trainer)

    # ----------------------------------------------------------------------------- the plan
    def has_started(self, trainer: pl.Trainer) -> bool:
        """Whether the perturbation has started at ``trainer``'s current step (it perturbs every
        ``every_n_steps`` from then)."""
        counters = policy.Counters(trainer.global_step, trainer.current_epoch, self._planned_steps)
        return not self.inert and policy.has_started(self.schedule, counters)

    def plan(self, trainer: pl.Trainer) -> StepPlan:
        """The plan of the optimizer step at ``trainer.global_step`` (asked at its first
        micro-batch), from :func:`lightning_nusam.policy.plan_step`."""
        if self.inert or getattr(trainer.fit_loop, "_skip_backward", False):
            # no optimizer, or an epoch in which Lightning runs no backward (SWA's BatchNorm update)
            return PLAIN_STEP
        group = trainer.optimizers[0].param_groups[0]
        lr = float(group["lr"])
        counters = policy.Counters(trainer.global_step, trainer.current_epoch, self._planned_steps, lr)
        if self._first_step is None and policy.has_started(self.schedule, counters):
            self._first_step, self._first_lr = trainer.global_step, lr
        base_lr = float(group.get("max_lr", group.get("initial_lr", self._first_lr or 0.0)))
        counters = dataclasses.replace(counters, base_lr=base_lr, first_step=self._first_step)
        return policy.plan_step(self.schedule, counters, has_direction=self.perturbation.has_direction)

    # ----------------------------------------------------------------------------- the drop-in
    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self._driver is not None:
            self._driver.on_train_batch_start(trainer, pl_module, batch, batch_idx)

    @override
    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._driver is not None:
            self._driver.on_after_backward()

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        if self._driver is not None:
            self._driver.on_before_optimizer_step()

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        if self._driver is not None:
            self._driver.on_train_batch_end(pl_module, outputs)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._driver is not None:
            self._driver.on_train_epoch_end()

    def report_step(self, module: pl.LightningModule, result: StepResult) -> None:
        """Log what a step did (:func:`log_step`) and watch its losses for a radius that keeps the
        model from learning (:class:`~lightning_nusam.radius_watch.RadiusWatch`: warned once per fit,
        with the figures, as a :class:`~lightning_nusam.radius_watch.RadiusWarning`)."""
        log_step(module, result, self.perturbation)
        if result.plan.one_pass and result.perturbed:  # no clean loss to compare with
            return
        two_pass = result.perturbed and result.plan.two_pass
        message = self._radius_watch.observe(result.first_loss, result.second_loss if two_pass else None,
                                             result.plan.rho if two_pass else None)
        if message is not None:
            rank_zero_warn(f"{type(self).__name__}: {message}", category=RadiusWarning)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                     exception: BaseException) -> None:
        if self._driver is not None:
            self._driver.abandon()  # never leave ε in the weights
            self._driver.remove()  # teardown is not called after an exception
        elif self._engine is not None:
            self._engine.abandon()
        elif self._perturbation is not None:
            self._perturbation.restore()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and self._driver is not None:
            self._driver.remove()

    # ----------------------------------------------------------------------------- state
    @override
    def state_dict(self) -> dict[str, Any]:
        """The perturbation's state, the schedule's anchors and each rank's RNG states (dropout),
        for an exact resume. Under DDP every rank's RNG state is gathered (a collective call)."""
        engine_state = self._engine.state_dict() if self._engine is not None else {
            "resyncs": 0, "last_resync_step": 0, **self._pending_engine_state}
        state: dict[str, Any] = {
            **engine_state,
            "first_step": self._first_step,
            "first_lr": self._first_lr,
            "rng": self._gather_rng(),
        }
        if self._perturbation is not None:
            state["perturbation"] = self._perturbation.state_dict()
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending_engine_state = {k: state_dict[k] for k in ("resyncs", "last_resync_step")
                                      if k in state_dict}
        if self._engine is not None:
            self._engine.load_state_dict(self._pending_engine_state)
        self._first_step = state_dict.get("first_step")
        self._first_lr = state_dict.get("first_lr")
        if "perturbation" in state_dict:
            if self._engine is not None:  # restored after on_fit_start (some strategies do)
                self._load_perturbation_state(state_dict["perturbation"], self._trainer)
            else:
                self._pending_state = state_dict["perturbation"]  # applied by on_fit_start
        # Restored only when a fit resumes (on_train_start), never for validate/test/predict.
        self._pending_rng = state_dict.get("rng")

    def _load_perturbation_state(self, state: Mapping[str, Any], trainer: pl.Trainer | None) -> None:
        try:
            self._perturbation.load_state_dict(state)
        except ValueError as error:
            checkpoint = trainer.ckpt_path if trainer is not None else None
            where = f"the checkpoint {checkpoint}" if checkpoint else "the checkpoint"
            raise ValueError(f"{type(self).__name__} cannot resume from {where}: {error}. Resume with "
                             "the options it was written with") from error

    def _gather_rng(self) -> list[dict[str, Any]]:
        """``[rank 0's random states, rank 1's, ...]`` (a collective call under DDP)."""
        local_state = RandomState.capture_all().as_dict()
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return [local_state]
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, local_state)
        return gathered

    def _restore_rng(self, trainer: pl.Trainer) -> None:
        states, self._pending_rng = self._pending_rng, None
        if not states:
            return
        if len(states) != trainer.world_size:
            rank_zero_warn(f"{type(self).__name__}: the checkpoint holds the RNG states of {len(states)} "
                           f"ranks and this run has {trainer.world_size}; the RNG is not restored")
            return
        RandomState.from_dict(states[trainer.global_rank]).restore()


def sharpness_aware_callbacks(trainer: pl.Trainer) -> list[SharpnessAwareCallback]:
    """The sharpness-aware callbacks on ``trainer`` (a fit accepts exactly one)."""
    return [callback for callback in trainer.callbacks if isinstance(callback, SharpnessAwareCallback)]


def sharpness_aware_callback(trainer: pl.Trainer | None) -> SharpnessAwareCallback | None:
    """The sharpness-aware callback of ``trainer``, if any."""
    found = sharpness_aware_callbacks(trainer) if trainer is not None else []
    return found[0] if found else None


def sam_pass(module: pl.LightningModule) -> PassName | None:
    """Which pass of a two-pass step is running: ``"first"`` (at ``w``), ``"second"`` (at
    ``w + ε``), or None (the only pass of a plain or one-pass step, or no sharpness-aware
    callback). For ``training_step``/``compute_loss`` code that should run once per step, e.g.
    ``if sam_pass(self) != "second": self.samples_seen += len(batch)`` (``self.log`` needs no
    guard: it records nothing in the second pass)."""
    try:
        trainer = module.trainer
    except RuntimeError:  # not attached to a Trainer
        return None
    if trainer is None:
        return None
    callback = sharpness_aware_callback(trainer)
    return callback._engine.current_pass if callback is not None and callback._engine is not None else None


def log_step(module: pl.LightningModule, result: StepResult, perturbation: Perturbation) -> None:
    """Log what a step did, on step and epoch: ``sam/active`` (ε was applied), ``sam/rho`` (the
    radius applied, 0 when none), ``sam/loss_perturbed`` and ``sam/sharpness`` (second − first
    pass loss, two-pass steps) and ``sam/skipped_steps`` (non-finite gradients)."""
    log: dict[str, Any] = {"on_step": True, "on_epoch": True}
    module.log("sam/active", float(result.perturbed), **log)
    module.log("sam/rho", float(result.plan.rho) if result.perturbed else 0.0, **log)
    if result.plan.two_pass and result.first_loss is not None and result.second_loss is not None:
        module.log("sam/loss_perturbed", result.second_loss, **log)
        module.log("sam/sharpness", result.second_loss - result.first_loss, **log)
    module.log("sam/skipped_steps", perturbation.skipped_count, reduce_fx="max", **log)
