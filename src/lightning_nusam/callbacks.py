"""Lightning callbacks: the sharpness-aware methods, their schedule, and the drop-in.

Put one callback on the ``Trainer``. Its options are the method's, declared once on its
perturbation class (:class:`NuSAM` takes those of
:class:`~lightning_nusam.perturbations.NuclearPerturbation`), followed by the options common to
all methods (the start, ``every_n_steps``, ρ schedules, DDP, BatchNorm, random draws). Each
step is planned by :func:`lightning_nusam.policy.plan_step` and run by a
:class:`~lightning_nusam.engine.StepEngine`:

- on an ordinary LightningModule (its own ``training_step``, automatic optimization) this
  callback runs the step around Lightning's own (the *drop-in*), through public extension points
  only: ``on_train_batch_start`` opens the micro-batch's first pass, a ``torch.optim`` step
  pre-hook hands the optimizer a closure that runs the remaining first pass, ``perturb()`` and
  the second passes (the last one through Lightning's own closure, so that its hooks, clipping
  and reported loss are Lightning's), ``on_after_backward`` removes ``ε`` right after the last
  backward, and ``on_train_batch_end`` closes the step and logs it;
- on a module that mixes in :class:`~lightning_nusam.SAMMixin` the mixin runs the same engine.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import (
    DDPStrategy,
    DeepSpeedStrategy,
    FSDPStrategy,
    ModelParallelStrategy,
    ParallelStrategy,
)
from lightning.pytorch.trainer.call import _call_strategy_hook
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from typing_extensions import override

from lightning_nusam import policy
from lightning_nusam.engine import (
    DEFAULT_RESYNC_EVERY,
    PLAIN_STEP,
    BatchNormUpdate,
    FirstPassReduction,
    PassName,
    RandomState,
    StepEngine,
    StepPlan,
    StepResult,
    check_step_options,
    optimizer_needs_closure,
    optimizer_parameters,
)
from lightning_nusam.perturbations import (
    GaussianPerturbation,
    L2Perturbation,
    NormLayerPerturbation,
    NuclearNormalizedPerturbation,
    NuclearPerturbation,
    Perturbation,
)
from lightning_nusam.radius_watch import RadiusWarning, RadiusWatch

#: Strategies that shard gradients: with gradient sync disabled they leave them empty (no m-SAM).
SHARDED_STRATEGIES = (ModelParallelStrategy, FSDPStrategy, DeepSpeedStrategy)


class SharpnessAwareCallback(Callback):
    """Base class of the sharpness-aware callbacks: the schedule, the step options, checkpoint
    state and the drop-in. A method is a subclass naming its perturbation class::

        class NuSAM(SharpnessAwareCallback):
            perturbation_class = NuclearPerturbation

    and takes that class's options (everything but ``model``) followed by these.

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
        options = check_step_options(
            sync_first_pass=sync_first_pass, first_pass_reduction=first_pass_reduction,
            batchnorm_update=batchnorm_update, same_random_draws=same_random_draws, resync_every=resync_every)
        self.sync_first_pass = options["sync_first_pass"]
        self.first_pass_reduction = options["first_pass_reduction"]
        self.resync_every = options["resync_every"]
        self.batchnorm_update = options["batchnorm_update"]
        self.same_random_draws = options["same_random_draws"]
        if one_pass and not sync_first_pass:
            raise ValueError("`sync_first_pass` and `one_pass`: m-SAM (sync_first_pass=False) keeps the "
                             "first pass local, and a one-pass step has no first pass: drop one of them")
        if one_pass and batchnorm_update != "first":
            raise ValueError("`batchnorm_update` chooses between two passes; with `one_pass=True` "
                             "the statistics come from the only pass: leave it at 'first'")
        self._perturbation: Perturbation | None = None
        self._engine: StepEngine | None = None
        self._pending_state: Mapping[str, Any] | None = None
        self._pending_rng: list[dict[str, Any]] | None = None
        self._planned_steps = math.inf
        self._first_step: int | None = None  # the first optimizer step after the start
        self._first_lr: float | None = None  # and its learning rate
        self._restored_resyncs = self._restored_last_resync = 0
        self._trainer: pl.Trainer | None = None
        self._drop_in = False  # this callback drives the step (an automatic-optimization module)
        self._inert = False  # nothing to do in this fit (no optimizer)
        self._hook_handle: Any = None
        self._optimizer: torch.optim.Optimizer | None = None  # Lightning's, hooked by the drop-in
        self._stepped = False  # the optimizer stepped during the current micro-batch
        self._own_pass = False  # a pass run by this callback (not by Lightning's closure) is running
        self._window_ends = False  # the current micro-batch is the last of its optimizer step
        self._lightning_ran_first_pass = False  # Lightning's closure ran this micro-batch's first pass
        self._radius_watch = RadiusWatch()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "perturbation_class" in cls.__dict__ and "__init__" not in cls.__dict__:
            cls.__init__ = _preset_init(cls)  # type: ignore[method-assign]

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
        from lightning_nusam.module import SAMMixin

        # state restored outside this fit (the Tuner's restore after lr_find) does not carry
        # over; a resumed fit restores its checkpoint after setup
        self._pending_state = self._pending_rng = None
        self._restored_resyncs, self._restored_last_resync, self._engine, self._trainer = 0, 0, None, None
        self._first_step = self._first_lr = None  # the schedule's anchors of this fit
        name = type(self).__name__
        others = [cb for cb in trainer.callbacks if isinstance(cb, SharpnessAwareCallback)]
        if len(others) > 1:
            raise ValueError(
                "more than one sharpness-aware callback on the Trainer "
                f"({', '.join(type(cb).__name__ for cb in others)}): keep exactly one"
            )
        self._drop_in = not isinstance(pl_module, SAMMixin)
        if self._drop_in:
            self._check_drop_in(trainer, pl_module)
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

    def _check_drop_in(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        """Refuse, before the first step, what the drop-in cannot run, naming what to use instead."""
        name, module_name = type(self).__name__, type(module).__name__
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

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._perturbation = self.make_perturbation(pl_module)
        self._radius_watch.reset()
        if self._pending_state is not None:
            self._load_perturbation_state(self._pending_state, trainer)
            self._pending_state = None
        self._engine = StepEngine(pl_module, self._perturbation, sync_first_pass=self.sync_first_pass,
                                  first_pass_reduction=self._first_pass_reduction(trainer),
                                  replicas=data_parallel_group(trainer),
                                  batchnorm_update=self.batchnorm_update,
                                  same_random_draws=self.same_random_draws, resync_every=self.resync_every)
        self._engine.resyncs, self._trainer = self._restored_resyncs, trainer
        self._engine.last_resync_step = self._restored_last_resync
        self._optimizer = None
        self._take_optimizer(trainer, pl_module)

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
        if not getattr(model, "static_graph", False):
            return self.first_pass_reduction
        if not self.sync_first_pass:
            raise ValueError(f"{name}(sync_first_pass=False) (m-SAM) keeps the first pass's gradient "
                             "local, which DDP's static_graph=True does not allow (its reducer expects every "
                             "backward to all-reduce): drop static_graph=True from DDPStrategy, or use "
                             "sync_first_pass=True")
        if self.first_pass_reduction == "auto" and data_parallel_group(trainer) is not None:
            rank_zero_info(f"{name}: DDPStrategy(static_graph=True) all-reduces every backward, so the first "
                           "pass all-reduces the gradient (first_pass_reduction='gradients')")
        return "gradients"

    def _take_optimizer(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Check Lightning's optimizer and hook the drop-in's step into it; the perturbation covers
        what it updates. At the start of fit, and again when a new one was installed during fit
        (a fine-tuning schedule calling ``trainer.strategy.setup_optimizers``)."""
        name = type(self).__name__
        if len(trainer.optimizers) != 1:
            raise ValueError(f"{name} needs exactly one optimizer; configure_optimizers returned "
                             f"{len(trainer.optimizers)}")
        optimizer = self._optimizer = trainer.optimizers[0]
        own = {id(p) for p in pl_module.parameters()}
        self._inert = not any(id(p) in own for p in optimizer_parameters(optimizer))
        if self._inert:  # Lightning's no-optimizer mode (configure_optimizers returned None)
            rank_zero_warn(f"{name}: there is no optimizer of {type(pl_module).__name__}'s parameters "
                           "(configure_optimizers returned None?), so this fit takes no steps and "
                           f"{name} does nothing")
        elif optimizer_needs_closure(optimizer):
            raise ValueError(
                f"{name} cannot wrap {type(optimizer).__name__}: it evaluates the loss several times "
                "per step through a closure (LBFGS and the like). Use a first-order optimizer "
                "(SGD, AdamW, ...)"
            )
        from lightning_nusam.optim import SAMOptimizer

        if isinstance(optimizer, SAMOptimizer):
            raise ValueError(f"{name} and a SAMOptimizer would each run a sharpness-aware step (four "
                             "passes): return the base optimizer from configure_optimizers and keep the "
                             "callback, or drop the callback and keep SAMOptimizer")
        if not self._inert:
            self.perturbation.restrict_to(optimizer_parameters(optimizer))
        self._remove_hook()
        if self._drop_in and not self._inert:
            self._hook_handle = optimizer.register_step_pre_hook(self._before_optimizer_step)

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
        return not self._inert and policy.has_started(self.schedule, counters)

    def plan(self, trainer: pl.Trainer) -> StepPlan:
        """The plan of the optimizer step at ``trainer.global_step`` (asked at its first
        micro-batch), from :func:`lightning_nusam.policy.plan_step`."""
        if self._inert or getattr(trainer.fit_loop, "_skip_backward", False):
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

    # ----------------------------------------------------------------------------- drop-in
    def _passes(self, trainer: pl.Trainer, optimizer: torch.optim.Optimizer) -> _LightningPasses:
        return _LightningPasses(self, trainer, optimizer)

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if not self._drop_in:
            return
        engine = self.engine
        if not engine.in_step and trainer.optimizers[:1] != [self._optimizer]:
            self._take_optimizer(trainer, pl_module)  # replaced during fit
        if self._inert:
            return
        accumulate = trainer.accumulate_grad_batches  # read each time: GradientAccumulationScheduler
        last = (batch_idx + 1) % accumulate == 0 or trainer.is_last_batch
        if not engine.in_step:
            engine.begin(self.plan(trainer), self._optimizer)
        self._stepped = self._lightning_ran_first_pass = False
        self._window_ends = last
        engine.open_first_pass(batch, batch_idx, last=last, no_sync=_no_sync(trainer.strategy))

    @override
    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._drop_in or self._engine is None or not self._engine.in_step:
            return
        if not self._own_pass and self._engine.current_pass != "second":
            self._lightning_ran_first_pass = True
        self._engine.after_backward()  # the last backward of the second pass removes ε at once

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        if self._drop_in and self._engine is not None and self._engine.in_step:
            self._engine.before_optimizer_step()

    def _before_optimizer_step(self, optimizer: torch.optim.Optimizer, args: tuple,
                               kwargs: dict) -> tuple[tuple, dict] | None:
        """``torch.optim`` step pre-hook: on a two-pass step, hand the optimizer our closure."""
        self._stepped = True
        engine = self._engine
        if engine is None or not engine.in_step or not engine.plan.two_pass:
            return None
        closure = kwargs.get("closure", args[0] if args else None)
        if closure is None:
            raise RuntimeError(
                f"{type(self).__name__}: optimizer.step() was called without a closure, so "
                "the second pass cannot run (a precision plugin that steps outside the closure, such "
                "as 16-mixed); mix lightning_nusam.SAMMixin into the module instead"
            )

        def sharpness_aware_closure() -> Any:
            return self._two_passes(optimizer, closure)

        if "closure" in kwargs or not args:
            return args, {**kwargs, "closure": sharpness_aware_closure}
        return (sharpness_aware_closure, *args[1:]), kwargs

    def _two_passes(self, optimizer: torch.optim.Optimizer, lightning_closure: Callable[[], Any]) -> Any:
        """The rest of a two-pass step, inside ``optimizer.step``: the last micro-batch's first pass
        (unless the module's ``optimizer_step`` ran Lightning's closure itself), ``perturb()``, the
        second passes, the last one through Lightning's closure, and ``restore()``."""
        trainer, engine = self._trainer, self.engine
        passes = self._passes(trainer, optimizer)
        if self._lightning_ran_first_pass:
            # optimizer_step ran the closure and then called optimizer.step() (without it, or with
            # one already consumed): the first pass is done, so all second passes are ours and what
            # is left of the closure (its hooks and clipping) runs after them
            engine.close_pass()
            engine.second_pass(passes, optimizer)
            return lightning_closure()
        kept = engine.micro_batches
        if len(kept) == 1:  # the step starts here: clear the previous gradients
            trainer.lightning_module.optimizer_zero_grad(trainer.current_epoch, kept[-1][1], optimizer)
        engine.run_open_pass(passes, replayed_by_caller=True)  # the closure replays its own batch
        result = engine.second_pass(passes, optimizer, last_pass=lightning_closure)
        if isinstance(result, torch.Tensor):
            engine.record_loss(result.detach() * trainer.accumulate_grad_batches, "second")
        return result

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        if not self._drop_in or self._engine is None or not self._engine.in_step:
            return
        engine = self._engine
        engine.close_pass()
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else None
        if isinstance(loss, torch.Tensor) and self._lightning_ran_first_pass:
            engine.record_loss(loss.detach() * trainer.accumulate_grad_batches)
        if self._stepped:
            self.report_step(pl_module, engine.end(trainer.global_step))
        elif self._window_ends:  # an optimizer_step override that did not step: nothing to replay
            engine.abandon()

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
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._drop_in and self._engine is not None:
            self._engine.abandon()  # a window the epoch ended without stepping (nothing to replay)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                     exception: BaseException) -> None:
        if self._engine is not None:
            self._engine.abandon()  # never leave ε in the weights
        elif self._perturbation is not None:
            self._perturbation.restore()
        self._remove_hook()  # teardown is not called after an exception

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._remove_hook()

    def _remove_hook(self) -> None:
        if self._hook_handle is not None:
            self._hook_handle.remove()
            self._hook_handle = None

    # ----------------------------------------------------------------------------- state
    @override
    def state_dict(self) -> dict[str, Any]:
        """The perturbation's state, the schedule's anchors and each rank's RNG states (dropout),
        for an exact resume. Under DDP every rank's RNG state is gathered (a collective call)."""
        state: dict[str, Any] = {
            "resyncs": self.resyncs,
            "last_resync_step": self._engine.last_resync_step if self._engine is not None else 0,
            "first_step": self._first_step,
            "first_lr": self._first_lr,
            "rng": self._gather_rng(),
        }
        if self._perturbation is not None:
            state["perturbation"] = self._perturbation.state_dict()
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored_resyncs = int(state_dict.get("resyncs", 0))
        self._restored_last_resync = int(state_dict.get("last_resync_step", 0))
        if self._engine is not None:
            self._engine.resyncs = self._restored_resyncs
            self._engine.last_resync_step = self._restored_last_resync
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


class _LightningPasses:
    """The drop-in's passes: the user's ``training_step`` through the strategy (its DDP forward and
    precision) and ``Strategy.backward`` (Lightning's backward hooks), the loss divided by ``k``."""

    def __init__(self, callback: SharpnessAwareCallback, trainer: pl.Trainer,
                 optimizer: torch.optim.Optimizer) -> None:
        self.callback, self.trainer, self.optimizer = callback, trainer, optimizer

    def forward_backward(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
        strategy, self.callback._own_pass = self.trainer.strategy, True
        try:
            # as Lightning's own closure calls it: under training_step's name (self.log keeps one
            # series) and its profiler section; we are inside optimizer.step here
            # with the arguments Lightning passes (batch_idx only when training_step takes it)
            arguments = self.trainer.fit_loop.epoch_loop._build_kwargs(OrderedDict(), batch, batch_idx)
            output = _call_strategy_hook(self.trainer, "training_step", *arguments.values())
            loss = output.get("loss") if isinstance(output, Mapping) else output
            if loss is None:
                return None
            strategy.backward(loss / self.trainer.accumulate_grad_batches, self.optimizer)
            return loss.detach()
        finally:
            self.callback._own_pass = False

    def no_sync(self) -> contextlib.AbstractContextManager[Any]:
        return _no_sync(self.trainer.strategy)()


def data_parallel_group(trainer: pl.Trainer) -> dist.ProcessGroup | None:
    """The process group DDP averages gradients over, when there is more than one process (a
    sharded strategy reduces its gradients itself: None)."""
    strategy = trainer.strategy
    if not isinstance(strategy, DDPStrategy) or strategy.world_size < 2:
        return None
    return getattr(strategy.model, "process_group", None) or dist.group.WORLD


def _no_sync(strategy: pl.strategies.Strategy) -> Callable[[], contextlib.AbstractContextManager[Any]]:
    """The strategy's context without gradient all-reduce (nothing to block without one)."""
    if isinstance(strategy, ParallelStrategy):
        return strategy.block_backward_sync
    return contextlib.nullcontext


def _preset_init(cls: type[SharpnessAwareCallback]) -> Callable[..., None]:
    """``__init__`` of a method preset: its perturbation class's options (with their kinds and
    defaults, ``model`` left out), then the common ones, as one signature that Python, the docs and
    LightningCLI's ``--help`` read; the documentation of both, joined."""
    # annotations evaluated where they were written (they are strings under postponed evaluation)
    own = [p for name, p in inspect.signature(cls.perturbation_class, eval_str=True).parameters.items()
           if name != "model"]
    common = [p for p in inspect.signature(SharpnessAwareCallback.__init__, eval_str=True).parameters.values()
              if p.kind is inspect.Parameter.KEYWORD_ONLY]
    self_parameter = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    signature = inspect.Signature([self_parameter, *own, *common])

    def __init__(self: SharpnessAwareCallback, *args: Any, **kwargs: Any) -> None:
        arguments = signature.bind(self, *args, **kwargs).arguments
        arguments.pop("self")
        SharpnessAwareCallback.__init__(self, **arguments)

    __init__.__signature__ = signature  # type: ignore[attr-defined]
    __init__.__qualname__ = f"{cls.__name__}.__init__"
    __init__.__doc__ = (
        f"The options of :class:`{cls.perturbation_class.__module__}.{cls.perturbation_class.__name__}` "
        "(the method), then those of :class:`SharpnessAwareCallback` (the schedule and the step).\n\n"
        "Args:\n" + _args_section(cls.perturbation_class.__doc__, skip=("model",))
        + _args_section(SharpnessAwareCallback.__doc__, skip=("**perturbation_options",))
    )
    return __init__


def _args_section(doc: str | None, skip: tuple[str, ...] = ()) -> str:
    """The entries of a Google-style ``Args:`` section, without those named in ``skip``."""
    lines = inspect.cleandoc(doc or "").splitlines()
    if "Args:" not in lines:
        return ""
    entries: list[list[str]] = []
    for line in lines[lines.index("Args:") + 1:]:
        if not line.strip():
            break
        if line.startswith("    ") and not line.startswith("        "):
            entries.append([line])
        elif entries:
            entries[-1].append(line)
    kept = [entry for entry in entries if entry[0].strip().split(":")[0].split(" ")[0] not in skip]
    return "".join(line + "\n" for entry in kept for line in entry)


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
    for callback in trainer.callbacks:
        if isinstance(callback, SharpnessAwareCallback) and callback._engine is not None:
            return callback._engine.current_pass
    return None


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


class NuSAM(SharpnessAwareCallback):
    """νSAM (the paper's Algorithm 1): a rank-1 perturbation ``ρ u vᵀ`` per weight matrix.

    Takes the options of :class:`~lightning_nusam.perturbations.NuclearPerturbation` (``rho``,
    ``power_iterations``, ``include``, ``exclude``, ``include_conv``, ...), then the common ones
    of :class:`SharpnessAwareCallback`.

    Example:
        >>> import lightning as L
        >>> trainer = L.Trainer(callbacks=[NuSAM(rho=0.1, start_fraction=0.1)], logger=False)

    In YAML (LightningCLI)::

        trainer:
          callbacks:
            - class_path: lightning_nusam.NuSAM
              init_args: {rho: 0.1, start_fraction: 0.1}
    """

    perturbation_class = NuclearPerturbation


class NuSAMNorm(SharpnessAwareCallback):
    """νSAM-Norm (Appendix C.1): matrix ``i`` perturbed by ``ρ σᵢ uᵢvᵢᵀ / √Σⱼσⱼ²``.

    Takes the options of :class:`~lightning_nusam.perturbations.NuclearNormalizedPerturbation`
    (those of νSAM), then the common ones.

    Example:
        >>> callback = NuSAMNorm(rho=0.05, start_fraction=0.1)
    """

    perturbation_class = NuclearNormalizedPerturbation


class SAM(SharpnessAwareCallback):
    """SAM: ``ε = ρ g / ‖g‖₂`` over every parameter with a gradient (keeps a copy of them);
    with ``adaptive=True`` ASAM, ``ε = ρ T² g / ‖T g‖₂`` with ``T = |w| + adaptive_eta``.

    Takes the options of :class:`~lightning_nusam.perturbations.L2Perturbation`, then the common
    ones.

    Example:
        >>> import lightning as L
        >>> trainer = L.Trainer(callbacks=[SAM(rho=0.05, start_epoch=1)], logger=False)
        >>> asam = SAM(rho=0.5, adaptive=True)
    """

    perturbation_class = L2Perturbation


class SAMON(SharpnessAwareCallback):
    """SAM-ON: SAM on the parameters of normalization layers only (found by module type).

    Takes the options of :class:`~lightning_nusam.perturbations.NormLayerPerturbation` (ρ
    defaults to 0.5 there), then the common ones.

    Example:
        >>> import lightning as L
        >>> trainer = L.Trainer(callbacks=[SAMON(rho=0.5)], logger=False)
    """

    perturbation_class = NormLayerPerturbation


class GaussSAM(SharpnessAwareCallback):
    """GaussSAM (ablation, the paper's Figure 1): ``ε = ρ e / ‖e‖₂`` with Gaussian ``e``.

    The direction ignores the gradient, so ``one_pass=True`` gives the same method without the
    unneeded first pass. Takes the options of
    :class:`~lightning_nusam.perturbations.GaussianPerturbation`, then the common ones.

    Example:
        >>> import lightning as L
        >>> trainer = L.Trainer(callbacks=[GaussSAM(rho=0.05, seed=1)], logger=False)
    """

    perturbation_class = GaussianPerturbation
