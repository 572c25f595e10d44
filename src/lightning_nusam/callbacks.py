"""Lightning callbacks: the sharpness-aware method, when it perturbs, and with which radius.

Put one callback on the ``Trainer``. On an ordinary LightningModule (its own ``training_step``,
automatic optimization) the callback runs the two-pass step itself around Lightning's
optimizer step (the *drop-in*); on a module that mixes in :class:`~lightning_nusam.SAMMixin`
the mixin runs it. Both use :mod:`lightning_nusam.step`; the callback decides, each step,
whether it perturbs and with which radius (:meth:`SharpnessAwareCallback.plan_step`).

The drop-in's driver is :class:`lightning_nusam.dropin.DropIn`; these hooks hand over to it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from lightning_nusam.checks import check_count, check_flag, check_fraction, check_rho
from lightning_nusam.dropin import DropIn
from lightning_nusam.perturbations import (
    DEFAULT_NUCLEAR_EXCLUDE,
    GaussianPerturbation,
    L2Perturbation,
    NormLayerPerturbation,
    NuclearNormalizedPerturbation,
    NuclearPerturbation,
    Perturbation,
)
from lightning_nusam.perturbations.selection import as_patterns
from lightning_nusam.step import (
    BatchNormUpdate,
    DrivesTheStep,
    SharpnessAwareStep,
    StepPlan,
    optimizer_needs_closure,
    planned_optimizer_steps,
)

RhoSchedule = Literal["constant", "linear", "cosine", "lr"]

#: Default interval (optimizer steps) at which m-SAM re-broadcasts rank 0's weights; see
#: :meth:`SharpnessAwareCallback.maybe_resynchronize`.
DEFAULT_RESYNC_EVERY = 100

#: Strategies that shard gradients: with gradient sync disabled they leave them empty (no m-SAM).
_SHARDED_STRATEGIES = ("ModelParallelStrategy", "FSDPStrategy", "DeepSpeedStrategy")


class SharpnessAwareCallback(Callback):
    """Base class of the sharpness-aware callbacks: start, schedules, DDP mode, state, drop-in.

    Args:
        rho: the perturbation radius ρ ≥ 0.
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
            ``"lr"``: ``rho · lr_t / lr_0``, the learning rate of the first parameter group
            over its value at the first step after the start.
        rho_final: the end point of the ``"linear"``/``"cosine"`` schedules (default 0).
        one_pass: experimental, νSAM/νSAM-Norm/GaussSAM only: a perturbed step runs one
            forward/backward pass at ``w + ε_t`` with ``ε_t`` from the direction estimated on
            the previous step's gradient (not the paper's algorithm; see the README).
        sync_first_pass: all-reduce the first-pass gradients under DDP (Algorithm 3, default), so
            every rank applies the same ε; ``False`` gives m-SAM (each rank perturbs with its
            own gradient; the second pass is always all-reduced).
        resync_every: under m-SAM with a restore by subtraction (νSAM/GaussSAM on fp32
            weights), ``w + ε − ε`` rounds differently on each rank; every ``resync_every``
            steps rank 0's weights are broadcast so the ranks stay identical. ``0`` disables it.
        batchnorm_update: which pass updates BatchNorm running statistics: ``"first"`` (the
            unperturbed weights, default), ``"second"`` or ``"both"``.
    """

    def __init__(
        self,
        rho: float,
        *,
        start_epoch: int | None = None,
        start_fraction: float | None = None,
        every_n_steps: int = 1,
        rho_schedule: RhoSchedule = "constant",
        rho_final: float | None = None,
        one_pass: bool = False,
        sync_first_pass: bool = True,
        resync_every: int = DEFAULT_RESYNC_EVERY,
        batchnorm_update: BatchNormUpdate = "first",
    ) -> None:
        self.rho = check_rho(rho)
        if start_epoch is not None and start_fraction is not None:
            raise ValueError("pass either `start_epoch` or `start_fraction`, not both")
        self.start_epoch = (None if start_epoch is None
                            else check_count("start_epoch", start_epoch, 0, whole_floats=True))
        self.start_fraction = (None if start_fraction is None
                               else check_fraction("start_fraction", start_fraction))
        self.every_n_steps = check_count("every_n_steps", every_n_steps, 1, whole_floats=True)
        if rho_schedule not in ("constant", "linear", "cosine", "lr"):
            raise ValueError(
                f"`rho_schedule` must be 'constant', 'linear', 'cosine' or 'lr', got {rho_schedule!r}"
            )
        if rho_final is not None and rho_schedule not in ("linear", "cosine"):
            raise ValueError(f"`rho_final` only applies to rho_schedule 'linear' or 'cosine', not "
                             f"{rho_schedule!r}")
        self.rho_schedule = rho_schedule
        self.rho_final = 0.0 if rho_final is None else check_rho(rho_final)
        self.one_pass = check_flag("one_pass", one_pass)
        self.sync_first_pass = check_flag("sync_first_pass", sync_first_pass)
        self.resync_every = check_count("resync_every", resync_every, 0, whole_floats=True)
        if batchnorm_update not in ("first", "second", "both"):
            raise ValueError(
                f"`batchnorm_update` must be 'first', 'second' or 'both', got {batchnorm_update!r}"
            )
        self.batchnorm_update = batchnorm_update
        if self.one_pass and not self.sync_first_pass:
            raise ValueError("`sync_first_pass` and `one_pass`: m-SAM (sync_first_pass=False) keeps the "
                             "first pass local, and a one-pass step has no first pass: drop one of them")
        if self.one_pass and batchnorm_update != "first":
            raise ValueError("`batchnorm_update` chooses between two passes; with `one_pass=True` "
                             "the statistics come from the only pass: leave it at 'first'")
        self._perturbation: Perturbation | None = None
        self._pending_state: Mapping[str, Any] | None = None
        self._pending_rng: list[dict[str, Any]] | None = None
        self._start_step = 0
        self._total_steps = math.inf
        self._first_step: int | None = None  # the first optimizer step after the start
        self._first_lr: float | None = None  # and its learning rate (rho_schedule="lr")
        self._drop_in: DropIn | None = None  # the driver, on an automatic-optimization module
        self.step = SharpnessAwareStep(self)
        self.resyncs = 0

    # ----------------------------------------------------------------------------- method
    def make_perturbation(self, module: nn.Module) -> Perturbation:
        """Build this method's perturbation for ``module`` (subclasses)."""
        raise NotImplementedError

    @property
    def perturbation(self) -> Perturbation:
        if self._perturbation is None:
            raise RuntimeError(f"{type(self).__name__} has no perturbation before `Trainer.fit` set it up")
        return self._perturbation

    @property
    def has_perturbation(self) -> bool:
        return self._perturbation is not None

    @property
    def start_step(self) -> int | None:
        """The first optimizer step that perturbs (known after the start of training)."""
        if self.start_epoch is not None:
            return self._first_step
        return self._start_step

    # ----------------------------------------------------------------------------- setup
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        name = type(self).__name__
        others = [cb for cb in trainer.callbacks if isinstance(cb, SharpnessAwareCallback)]
        if len(others) > 1:
            raise ValueError(
                "more than one sharpness-aware callback on the Trainer "
                f"({', '.join(type(cb).__name__ for cb in others)}): keep exactly one"
            )
        self._drop_in = None if isinstance(pl_module, DrivesTheStep) else DropIn(self, trainer, pl_module)
        if self._drop_in is None and pl_module.automatic_optimization:
            raise ValueError(
                f"{name} with SAMMixin needs manual optimization, but {type(pl_module).__name__}"
                ".automatic_optimization is True; SAMMixin sets it to False: do not set it back"
            )
        strategy = type(trainer.strategy).__name__
        if not self.sync_first_pass and strategy in _SHARDED_STRATEGIES:
            raise ValueError(
                f"`sync_first_pass=False` (m-SAM) is not possible under {strategy}: with gradient sync "
                "disabled a sharded strategy leaves the gradients empty; use DDP for m-SAM"
            )
        # Built here so that a model with nothing to perturb fails before training starts;
        # rebuilt in on_fit_start, once the strategy has moved (or sharded) the parameters.
        self._perturbation = self.make_perturbation(pl_module)
        if self.one_pass and not self._perturbation.supports_one_pass:
            raise ValueError(
                f"`one_pass=True` is not available for {name}: its direction is the whole gradient, "
                "which would have to be kept between steps (a copy of the weights); use NuSAM, "
                "NuSAMNorm or GaussSAM with one_pass"
            )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._perturbation = self.make_perturbation(pl_module)
        if self._pending_state is not None:
            self._perturbation.load_state_dict(self._pending_state)
            self._pending_state = None
        name = type(self).__name__
        if len(trainer.optimizers) != 1:
            raise ValueError(f"{name} needs exactly one optimizer; configure_optimizers returned "
                             f"{len(trainer.optimizers)}")
        optimizer = trainer.optimizers[0]
        if optimizer_needs_closure(optimizer):
            raise ValueError(
                f"{name} cannot wrap {type(optimizer).__name__}: it evaluates the loss several times "
                "per step through a closure (LBFGS and the like). Use a first-order optimizer "
                "(SGD, AdamW, ...)"
            )
        self.step = SharpnessAwareStep(self)
        if self._drop_in is not None:
            self.step.accumulate_grad_batches = trainer.accumulate_grad_batches
            self._drop_in.attach(optimizer)
        else:
            self.step.accumulate_grad_batches = pl_module.accumulate_grad_batches

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        name = type(self).__name__
        self._total_steps = planned_optimizer_steps(trainer, self.step.accumulate_grad_batches)
        unknown = not math.isfinite(self._total_steps)
        if self.start_fraction is not None:
            if unknown:
                raise ValueError(
                    f"{name}(start_fraction={self.start_fraction}) needs the number of training steps, "
                    "which is unknown here (an IterableDataset without max_steps, or max_time only): "
                    "pass `start_epoch` instead, or set Trainer(max_steps=...)"
                )
            self._start_step = math.ceil(self.start_fraction * self._total_steps)
            if self._start_step >= self._total_steps:
                rank_zero_warn(
                    f"{name}: the perturbation starts at step {self._start_step} "
                    f"(start_fraction={self.start_fraction}) but training has {self._total_steps} steps: "
                    "it never runs"
                )
        elif self.start_epoch is not None:
            max_epochs = trainer.max_epochs if trainer.max_epochs not in (None, -1) else None
            steps_per_epoch = math.ceil(trainer.num_training_batches / self.step.accumulate_grad_batches)
            never = max_epochs is not None and self.start_epoch >= max_epochs
            if not unknown and math.isfinite(steps_per_epoch):
                never = never or self.start_epoch * steps_per_epoch >= self._total_steps
            if never:
                rank_zero_warn(
                    f"{name}: start_epoch={self.start_epoch} is never reached "
                    f"(max_epochs={trainer.max_epochs}, max_steps={trainer.max_steps}): it never runs"
                )
        if self.rho_schedule in ("linear", "cosine") and unknown:
            raise ValueError(
                f"{name}(rho_schedule={self.rho_schedule!r}) needs the number of training steps, which "
                "is unknown here: set Trainer(max_steps=...) or max_epochs with a sized dataset, or "
                "use rho_schedule='constant' or 'lr'"
            )
        self._restore_rng(trainer)

    # ----------------------------------------------------------------------------- the plan
    def is_active(self, trainer: pl.Trainer) -> bool:
        """Whether the perturbation has started (it perturbs every ``every_n_steps`` from then)."""
        if self.start_epoch is not None:
            return trainer.current_epoch >= self.start_epoch
        return trainer.global_step >= self._start_step

    def plan_step(self, trainer: pl.Trainer) -> StepPlan:
        """What the optimizer step at ``trainer.global_step`` does (asked at its first micro-batch)."""
        if not self.is_active(trainer):
            return StepPlan()
        if self._first_step is None:
            self._first_step = trainer.global_step
            self._first_lr = float(trainer.optimizers[0].param_groups[0]["lr"])
        perturb = trainer.global_step % self.every_n_steps == 0
        if self.one_pass and not self.perturbation.has_direction:
            perturb = False  # the first one-pass step primes the direction with a plain step
        rho = self.radius(trainer) if perturb else 0.0
        return StepPlan(perturb=perturb, rho=rho, one_pass=self.one_pass, estimate_after=self.one_pass)

    def radius(self, trainer: pl.Trainer) -> float:
        """The radius in force at ``trainer.global_step`` under ``rho_schedule``."""
        if self.rho_schedule == "constant":
            return self.rho
        if self.rho_schedule == "lr":
            first_lr = self._first_lr or 0.0
            lr = float(trainer.optimizers[0].param_groups[0]["lr"])
            return self.rho * lr / first_lr if first_lr > 0 else self.rho
        first = self._first_step if self._first_step is not None else trainer.global_step
        last = self._total_steps - 1
        progress = min(1.0, max(0.0, (trainer.global_step - first) / max(1.0, last - first)))
        if self.rho_schedule == "linear":
            return self.rho + (self.rho_final - self.rho) * progress
        return self.rho_final + (self.rho - self.rho_final) * (1 + math.cos(math.pi * progress)) / 2

    def after_optimizer_step(self, trainer: pl.Trainer, module: pl.LightningModule, plan: StepPlan) -> None:
        if plan.two_pass and not self.sync_first_pass:
            self.maybe_resynchronize(trainer, module)

    # ----------------------------------------------------------------------------- m-SAM
    @torch.no_grad()
    def maybe_resynchronize(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
        """Broadcast rank 0's weights every ``resync_every`` steps under m-SAM.

        With per-rank ε, ``w + ε − ε`` leaves a different last-bit rounding on each rank; the
        all-reduced second-pass gradients do not amplify it (every rank applies the same
        update), so the difference is a random walk of about one ulp per step. One broadcast of
        the weights costs as much as one gradient all-reduce: every 100 steps it adds about 1%
        to m-SAM's communication and keeps the ranks within a few ulp of each other. Methods
        whose restore is exact (SAM, SAM-ON, and νSAM/GaussSAM on bf16/fp16 weights) skip it.
        """
        perturbation = self.perturbation
        if (
            self.resync_every == 0
            or perturbation.exact_restore
            or trainer.world_size == 1
            or not (dist.is_available() and dist.is_initialized())
            or trainer.global_step % self.resync_every != 0
        ):
            return False
        for parameter in pl_module.parameters():
            dist.broadcast(parameter.data, src=0)
        self.resyncs += 1
        return True

    # ----------------------------------------------------------------------------- drop-in
    # On an automatic-optimization module these hooks hand over to the DropIn driver; on a
    # SAMMixin module the mixin runs the step and they do nothing.
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self._drop_in is not None:
            self._drop_in.begin_micro_batch(trainer, pl_module, batch, batch_idx)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        if self._drop_in is not None:
            self._drop_in.before_clipping()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        if self._drop_in is not None:
            self._drop_in.end_micro_batch(trainer, pl_module, outputs)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._drop_in is not None:
            self.step.abandon()  # a window the epoch ended without stepping (nothing to replay)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                     exception: BaseException) -> None:
        if self._drop_in is not None:
            self._drop_in.close_contexts()
        if self._perturbation is not None:
            self.step.abandon()  # never leave ε in the weights

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._drop_in is not None and stage == "fit":
            self._drop_in.detach()

    # ----------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """The perturbation's state, the schedule's anchors and each rank's RNG states (dropout),
        for an exact resume. Under DDP every rank's RNG state is gathered (a collective call)."""
        state: dict[str, Any] = {
            "resyncs": self.resyncs,
            "start_step": self._start_step,
            "first_step": self._first_step,
            "first_lr": self._first_lr,
            "rng": self._gather_rng(),
        }
        if self._perturbation is not None:
            state["perturbation"] = self._perturbation.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.resyncs = int(state_dict.get("resyncs", 0))
        self._first_step = state_dict.get("first_step")
        self._first_lr = state_dict.get("first_lr")
        if "perturbation" in state_dict:
            if self._perturbation is not None:
                self._perturbation.load_state_dict(state_dict["perturbation"])
            self._pending_state = state_dict["perturbation"]  # re-applied after on_fit_start's rebuild
        # Restored only when a fit resumes (on_train_start), never for validate/test/predict.
        self._pending_rng = state_dict.get("rng")

    @staticmethod
    def _rng_state() -> dict[str, Any]:
        state: dict[str, Any] = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def _gather_rng(self) -> list[dict[str, Any]]:
        """``[rank 0's RNG states, rank 1's, ...]``."""
        local_state = self._rng_state()
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
        state = states[trainer.global_rank]
        torch.set_rng_state(state["cpu"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


class NuSAM(SharpnessAwareCallback):
    """νSAM (the paper's Algorithm 1): a rank-1 perturbation ``ρ u vᵀ`` per weight matrix.

    Args:
        rho: radius ρ (nuclear norm of each matrix's perturbation).
        power_iterations: T of Algorithm 2 (the paper: 1, warm-started).
        include: name patterns (or one pattern as a string): only matching matrices are
            perturbed (default: all 2-D weights), see
            :class:`~lightning_nusam.perturbations.NuclearPerturbation`.
        exclude: name patterns (or one pattern as a string) never perturbed (default:
            position embeddings and class tokens).
        include_conv: perturb convolution kernels too, as ``(out, in·kh·kw)`` matrices.
        include_embeddings: perturb embedding tables (``nn.Embedding``) too.
        batched: ``"auto"`` (batched ``bmm`` for small repeated shapes, a loop for the rest),
            ``True`` or ``False``; see :class:`~lightning_nusam.perturbations.NuclearPerturbation`.
        seed: seed of the initial vectors ``u``.
        **kwargs: the options of :class:`SharpnessAwareCallback` (start, ``every_n_steps``,
            ``rho_schedule``, ``one_pass``, DDP, BatchNorm).

    Example:
        >>> import lightning as L
        >>> trainer = L.Trainer(callbacks=[NuSAM(rho=0.1, start_fraction=0.1)], logger=False)

    In YAML (LightningCLI)::

        trainer:
          callbacks:
            - class_path: lightning_nusam.NuSAM
              init_args: {rho: 0.1, start_fraction: 0.1}
    """

    perturbation_class: type[NuclearPerturbation] = NuclearPerturbation

    def __init__(
        self,
        rho: float = 0.05,
        power_iterations: int = 1,
        *,
        include: Sequence[str] | str | None = None,
        exclude: Sequence[str] | str = DEFAULT_NUCLEAR_EXCLUDE,
        include_conv: bool = False,
        include_embeddings: bool = False,
        batched: bool | Literal["auto"] = "auto",
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(rho, **kwargs)
        self.power_iterations = check_count("power_iterations", power_iterations, 1, whole_floats=True)
        self.include = None if include is None else list(as_patterns("include", include))
        self.exclude = list(as_patterns("exclude", exclude))
        self.include_conv = check_flag("include_conv", include_conv)
        self.include_embeddings = check_flag("include_embeddings", include_embeddings)
        if batched not in (True, False, "auto"):
            raise ValueError(f"`batched` must be True, False or 'auto', got {batched!r}")
        self.batched = batched
        self.seed = seed

    def make_perturbation(self, module: nn.Module) -> Perturbation:
        return self.perturbation_class(
            module,
            rho=self.rho,
            power_iterations=self.power_iterations,
            include=self.include,
            exclude=self.exclude,
            include_conv=self.include_conv,
            include_embeddings=self.include_embeddings,
            batched=self.batched,
            seed=self.seed,
        )


class NuSAMNorm(NuSAM):
    """νSAM-Norm (Appendix C.1): matrix ``i`` perturbed by ``ρ σᵢ uᵢvᵢᵀ / √Σⱼσⱼ²``.

    Takes the same arguments as :class:`NuSAM`.

    Example:
        >>> callback = NuSAMNorm(rho=0.05, start_fraction=0.1)
    """

    perturbation_class = NuclearNormalizedPerturbation


class SAM(SharpnessAwareCallback):
    """SAM: ``ε = ρ g / ‖g‖₂`` over every parameter with a gradient (keeps a copy of them);
    with ``adaptive=True`` ASAM, ``ε = ρ T² g / ‖T g‖₂`` with ``T = |w| + adaptive_eta``.

    Args:
        rho: radius ρ of the ℓ2 ball.
        include: name patterns (or one pattern as a string): only matching parameters are
            perturbed (default: all).
        exclude: name patterns (or one pattern as a string) never perturbed.
        adaptive: ASAM, ``ε = ρ T² g / ‖T g‖₂`` with ``T = |w| + adaptive_eta``; see
            :class:`~lightning_nusam.perturbations.L2Perturbation`.
        adaptive_eta: η ≥ 0 of ASAM's ``T``.
        **kwargs: the options of :class:`SharpnessAwareCallback`.

    Example:
        >>> import lightning as L
        >>> trainer = L.Trainer(callbacks=[SAM(rho=0.05, start_epoch=1)], logger=False)
        >>> asam = SAM(rho=0.5, adaptive=True)
    """

    def __init__(
        self,
        rho: float = 0.05,
        *,
        include: Sequence[str] | str | None = None,
        exclude: Sequence[str] | str = (),
        adaptive: bool = False,
        adaptive_eta: float = 0.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(rho, **kwargs)
        self.include = None if include is None else list(as_patterns("include", include))
        self.exclude = list(as_patterns("exclude", exclude))
        self.adaptive = check_flag("adaptive", adaptive)
        if isinstance(adaptive_eta, bool) or not isinstance(adaptive_eta, int | float) \
                or not adaptive_eta >= 0:
            raise ValueError(f"`adaptive_eta` must be a number >= 0, got {adaptive_eta!r}")
        self.adaptive_eta = float(adaptive_eta)

    def make_perturbation(self, module: nn.Module) -> Perturbation:
        return L2Perturbation(module, rho=self.rho, include=self.include, exclude=self.exclude,
                              adaptive=self.adaptive, adaptive_eta=self.adaptive_eta)


class SAMON(SharpnessAwareCallback):
    """SAM-ON: SAM on the parameters of normalization layers only (found by module type).

    Args:
        rho: radius ρ of the ℓ2 ball over the normalisation parameters.
        **kwargs: the options of :class:`SharpnessAwareCallback`.

    Example:
        >>> import lightning as L
        >>> trainer = L.Trainer(callbacks=[SAMON(rho=0.5)], logger=False)
    """

    def __init__(self, rho: float = 0.5, **kwargs: Any) -> None:
        super().__init__(rho, **kwargs)

    def make_perturbation(self, module: nn.Module) -> Perturbation:
        return NormLayerPerturbation(module, rho=self.rho)


class GaussSAM(SharpnessAwareCallback):
    """GaussSAM (ablation, the paper's Figure 1): ``ε = ρ e / ‖e‖₂`` with Gaussian ``e``.

    The direction ignores the gradient, so ``one_pass=True`` gives the same method without the
    unneeded first pass.

    Args:
        rho: radius ρ.
        seed: seed of the noise (step ``k`` draws from ``seed·1000003 + k``).
        **kwargs: the options of :class:`SharpnessAwareCallback`.

    Example:
        >>> import lightning as L
        >>> trainer = L.Trainer(callbacks=[GaussSAM(rho=0.05, seed=1)], logger=False)
    """

    def __init__(self, rho: float = 0.05, *, seed: int = 0, **kwargs: Any) -> None:
        super().__init__(rho, **kwargs)
        self.seed = seed

    def make_perturbation(self, module: nn.Module) -> Perturbation:
        return GaussianPerturbation(module, rho=self.rho, seed=self.seed)
