"""Lightning callbacks that choose the sharpness-aware method and when it is active.

The callback owns the method's hyper-parameters and its :class:`~lightning_nusam.perturbations.
Perturbation`; the :class:`~lightning_nusam.SAMMixin` owns the step and asks the callback, each
step, whether to perturb. One callback per Trainer.
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

from lightning_nusam.perturbations import (
    DEFAULT_NUCLEAR_EXCLUDE,
    GaussianPerturbation,
    L2Perturbation,
    NormLayerPerturbation,
    NuclearNormalizedPerturbation,
    NuclearPerturbation,
    Perturbation,
)

BatchNormUpdate = Literal["first", "second", "both"]

#: Default interval (optimizer steps) at which m-SAM re-broadcasts rank 0's weights; see
#: :meth:`SharpnessAwareCallback.maybe_resynchronize`.
DEFAULT_RESYNC_EVERY = 100


class SharpnessAwareCallback(Callback):
    """Base class of the sharpness-aware callbacks: start of the perturbation, DDP mode, state.

    Args:
        rho: the perturbation radius ρ ≥ 0.
        start_epoch: first epoch (0-based) with perturbation; before it steps are plain
            one-pass steps. Exclusive with ``start_fraction``.
        start_fraction: start after this fraction of the planned optimizer steps
            (``trainer.estimated_stepping_batches``, from ``max_epochs``/``max_steps``); the
            paper starts after 10% (``0.1``).
        sync_first_pass: all-reduce the first-pass gradients under DDP (Algorithm 3, default), so
            every rank applies the same ε; ``False`` gives m-SAM (each rank perturbs with its
            own gradient; the second pass is always all-reduced).
        resync_every: under m-SAM with a subtractive restore (νSAM, GaussSAM), ``w + ε − ε``
            rounds differently on each rank; every ``resync_every`` steps rank 0's weights are
            broadcast so the ranks stay identical. ``0`` disables it.
        batchnorm_update: which pass updates BatchNorm running statistics: ``"first"`` (the
            unperturbed weights, default), ``"second"`` or ``"both"``.
    """

    def __init__(
        self,
        rho: float,
        *,
        start_epoch: int | None = None,
        start_fraction: float | None = None,
        sync_first_pass: bool = True,
        resync_every: int = DEFAULT_RESYNC_EVERY,
        batchnorm_update: BatchNormUpdate = "first",
    ) -> None:
        if not (isinstance(rho, int | float) and math.isfinite(rho) and rho >= 0):
            raise ValueError(f"`rho` must be a finite number >= 0, got {rho!r}")
        if start_epoch is not None and start_fraction is not None:
            raise ValueError("pass either `start_epoch` or `start_fraction`, not both")
        if start_epoch is not None and (int(start_epoch) != start_epoch or start_epoch < 0):
            raise ValueError(f"`start_epoch` must be an integer >= 0, got {start_epoch!r}")
        if start_fraction is not None and not 0 <= start_fraction <= 1:
            raise ValueError(f"`start_fraction` must be in [0, 1], got {start_fraction!r}")
        if int(resync_every) != resync_every or resync_every < 0:
            raise ValueError(f"`resync_every` must be an integer >= 0, got {resync_every!r}")
        if batchnorm_update not in ("first", "second", "both"):
            raise ValueError(
                f"`batchnorm_update` must be 'first', 'second' or 'both', got {batchnorm_update!r}"
            )
        self.rho = float(rho)
        self.start_epoch = None if start_epoch is None else int(start_epoch)
        self.start_fraction = start_fraction
        self.sync_first_pass = bool(sync_first_pass)
        self.resync_every = int(resync_every)
        self.batchnorm_update = batchnorm_update
        self._perturbation: Perturbation | None = None
        self._start_step = 0
        self._pending_state: Mapping[str, Any] | None = None
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

    # ----------------------------------------------------------------------------- hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        from lightning_nusam.module import SAMMixin

        name = type(self).__name__
        if not isinstance(pl_module, SAMMixin):
            raise TypeError(
                f"{name} needs a LightningModule that mixes in lightning_nusam.SAMMixin "
                f"(`class {type(pl_module).__name__}(SAMMixin, LightningModule)`) and implements "
                "compute_loss(batch, batch_idx); the two-pass step lives in the mixin"
            )
        if pl_module.automatic_optimization:
            raise ValueError(
                f"{name} needs manual optimization, but {type(pl_module).__name__}.automatic_optimization "
                "is True; SAMMixin sets it to False: do not set it back"
            )
        others = [cb for cb in trainer.callbacks if isinstance(cb, SharpnessAwareCallback)]
        if len(others) > 1:
            raise ValueError(
                "more than one sharpness-aware callback on the Trainer "
                f"({', '.join(type(cb).__name__ for cb in others)}): keep exactly one"
            )
        if trainer.accumulate_grad_batches != 1:
            raise ValueError(
                f"{name} does not support `Trainer(accumulate_grad_batches="
                f"{trainer.accumulate_grad_batches})`: the perturbation needs the first-pass gradient "
                "of the whole batch. Increase the batch size (or lower its memory) instead"
            )
        if not self.sync_first_pass and type(trainer.strategy).__name__ == "ModelParallelStrategy":
            raise ValueError(
                "`sync_first_pass=False` (m-SAM) is not possible under ModelParallelStrategy (FSDP2): "
                "with gradient sync disabled FSDP2 leaves the sharded gradients empty"
            )
        # Built here so that a model with nothing to perturb fails before training starts;
        # rebuilt in on_fit_start, once the strategy has moved (or sharded) the parameters.
        self._perturbation = self.make_perturbation(pl_module)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._perturbation = self.make_perturbation(pl_module)
        if self._pending_state is not None:
            self._perturbation.load_state_dict(self._pending_state)
            self._pending_state = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        total = trainer.estimated_stepping_batches
        if self.start_fraction is not None:
            self._start_step = math.ceil(self.start_fraction * total) if math.isfinite(total) else 0
            if math.isfinite(total) and self._start_step >= total:
                rank_zero_warn(
                    f"{type(self).__name__}: the perturbation starts at step {self._start_step} "
                    f"(start_fraction={self.start_fraction}) but training has {total} steps: it never runs"
                )
        elif self.start_epoch is not None:
            max_epochs = trainer.max_epochs if trainer.max_epochs not in (None, -1) else None
            steps_per_epoch = trainer.num_training_batches
            never = max_epochs is not None and self.start_epoch >= max_epochs
            if math.isfinite(total) and math.isfinite(steps_per_epoch):
                never = never or self.start_epoch * steps_per_epoch >= total
            if never:
                rank_zero_warn(
                    f"{type(self).__name__}: start_epoch={self.start_epoch} is never reached "
                    f"(max_epochs={trainer.max_epochs}, max_steps={trainer.max_steps}): it never runs"
                )

    def is_active(self, trainer: pl.Trainer) -> bool:
        """Whether the current step perturbs (after the start epoch or step)."""
        if self.start_epoch is not None:
            return trainer.current_epoch >= self.start_epoch
        return trainer.global_step >= self._start_step

    # ----------------------------------------------------------------------------- m-SAM
    @torch.no_grad()
    def maybe_resynchronize(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
        """Broadcast rank 0's weights every ``resync_every`` steps under m-SAM.

        With per-rank ε, ``w + ε − ε`` leaves a different last-bit rounding on each rank; the
        all-reduced second-pass gradients do not amplify it (every rank applies the same
        update), so the difference is a random walk of about one ulp per step. One broadcast of
        the weights costs as much as one gradient all-reduce: every 100 steps it adds about 1%
        to m-SAM's communication and keeps the ranks within a few ulp of each other. SAM and
        SAM-ON restore from a copy and never drift, so they skip it.
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

    # ----------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """The perturbation's state and the RNG states (dropout) for an exact resume."""
        state: dict[str, Any] = {"resyncs": self.resyncs, "start_step": self._start_step}
        if self._perturbation is not None:
            state["perturbation"] = self._perturbation.state_dict()
        state["rng_cpu"] = torch.get_rng_state()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["rng_cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.resyncs = int(state_dict.get("resyncs", 0))
        if "perturbation" in state_dict:
            if self._perturbation is not None:
                self._perturbation.load_state_dict(state_dict["perturbation"])
            self._pending_state = state_dict["perturbation"]  # re-applied after on_fit_start's rebuild
        if "rng_cpu" in state_dict:
            torch.set_rng_state(state_dict["rng_cpu"])
        if "rng_cuda" in state_dict and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state_dict["rng_cuda"])


class NuSAM(SharpnessAwareCallback):
    """νSAM (the paper's Algorithm 1): a rank-1 perturbation ``ρ u vᵀ`` per weight matrix.

    Args:
        rho: radius ρ (nuclear norm of each matrix's perturbation).
        power_iterations: T of Algorithm 2 (the paper: 1, warm-started).
        include, exclude, include_conv: parameter selection, see
            :class:`~lightning_nusam.perturbations.NuclearPerturbation`.
        batched: ``"auto"`` (batched ``bmm`` for small repeated shapes, a loop for the rest),
            ``True`` or ``False``; see :class:`~lightning_nusam.perturbations.NuclearPerturbation`.
        seed: seed of the initial vectors ``u``.
        **kwargs: the start, DDP and BatchNorm options of :class:`SharpnessAwareCallback`.

    Example:
        >>> import lightning as L
        >>> trainer = L.Trainer(callbacks=[NuSAM(rho=0.1, start_fraction=0.1)], logger=False)

    In YAML (LightningCLI)::

        trainer:
          callbacks:
            - class_path: lightning_nusam.NuSAM
              init_args: {rho: 0.1, start_fraction: 0.1}
    """

    def __init__(
        self,
        rho: float = 0.05,
        power_iterations: int = 1,
        *,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] = DEFAULT_NUCLEAR_EXCLUDE,
        include_conv: bool = False,
        batched: bool | Literal["auto"] = "auto",
        seed: int = 0,
        start_epoch: int | None = None,
        start_fraction: float | None = None,
        sync_first_pass: bool = True,
        resync_every: int = DEFAULT_RESYNC_EVERY,
        batchnorm_update: BatchNormUpdate = "first",
    ) -> None:
        super().__init__(
            rho,
            start_epoch=start_epoch,
            start_fraction=start_fraction,
            sync_first_pass=sync_first_pass,
            resync_every=resync_every,
            batchnorm_update=batchnorm_update,
        )
        if int(power_iterations) != power_iterations or power_iterations < 1:
            raise ValueError(f"`power_iterations` must be an integer >= 1, got {power_iterations!r}")
        self.power_iterations = int(power_iterations)
        self.include = None if include is None else list(include)
        self.exclude = list(exclude)
        self.include_conv = include_conv
        self.batched = batched
        self.seed = seed

    perturbation_class: type[NuclearPerturbation] = NuclearPerturbation

    def make_perturbation(self, module: nn.Module) -> Perturbation:
        return self.perturbation_class(
            module,
            rho=self.rho,
            power_iterations=self.power_iterations,
            include=self.include,
            exclude=self.exclude,
            include_conv=self.include_conv,
            batched=self.batched,
            seed=self.seed,
        )


class NuSAMNorm(NuSAM):
    """νSAM-Norm (Appendix C.1): matrix ``i`` perturbed by ``ρ σᵢ uᵢvᵢᵀ / √Σⱼσⱼ²``.

    Takes the same arguments as :class:`NuSAM`.
    """

    perturbation_class = NuclearNormalizedPerturbation


class SAM(SharpnessAwareCallback):
    """SAM: ``ε = ρ g / ‖g‖₂`` over every parameter with a gradient (keeps a copy of them).

    Args:
        rho: radius ρ of the ℓ2 ball.
        include, exclude: name patterns selecting the perturbed parameters.
        **kwargs: the start, DDP and BatchNorm options of :class:`SharpnessAwareCallback`.

    Example:
        >>> import lightning as L
        >>> trainer = L.Trainer(callbacks=[SAM(rho=0.05, start_epoch=1)], logger=False)
    """

    def __init__(
        self,
        rho: float = 0.05,
        *,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] = (),
        start_epoch: int | None = None,
        start_fraction: float | None = None,
        sync_first_pass: bool = True,
        batchnorm_update: BatchNormUpdate = "first",
    ) -> None:
        super().__init__(
            rho,
            start_epoch=start_epoch,
            start_fraction=start_fraction,
            sync_first_pass=sync_first_pass,
            batchnorm_update=batchnorm_update,
        )
        self.include = None if include is None else list(include)
        self.exclude = list(exclude)

    def make_perturbation(self, module: nn.Module) -> Perturbation:
        return L2Perturbation(module, rho=self.rho, include=self.include, exclude=self.exclude)


class SAMON(SharpnessAwareCallback):
    """SAM-ON: SAM on the parameters of normalization layers only (found by module type).

    Example:
        >>> import lightning as L
        >>> trainer = L.Trainer(callbacks=[SAMON(rho=0.5)], logger=False)
    """

    def __init__(
        self,
        rho: float = 0.5,
        *,
        start_epoch: int | None = None,
        start_fraction: float | None = None,
        sync_first_pass: bool = True,
        batchnorm_update: BatchNormUpdate = "first",
    ) -> None:
        super().__init__(
            rho,
            start_epoch=start_epoch,
            start_fraction=start_fraction,
            sync_first_pass=sync_first_pass,
            batchnorm_update=batchnorm_update,
        )

    def make_perturbation(self, module: nn.Module) -> Perturbation:
        return NormLayerPerturbation(module, rho=self.rho)


class GaussSAM(SharpnessAwareCallback):
    """GaussSAM (ablation, the paper's Figure 1): ``ε = ρ e / ‖e‖₂`` with Gaussian ``e``.

    Example:
        >>> import lightning as L
        >>> trainer = L.Trainer(callbacks=[GaussSAM(rho=0.05, seed=1)], logger=False)
    """

    def __init__(
        self,
        rho: float = 0.05,
        *,
        seed: int = 0,
        start_epoch: int | None = None,
        start_fraction: float | None = None,
        sync_first_pass: bool = True,
        resync_every: int = DEFAULT_RESYNC_EVERY,
        batchnorm_update: BatchNormUpdate = "first",
    ) -> None:
        super().__init__(
            rho,
            start_epoch=start_epoch,
            start_fraction=start_fraction,
            sync_first_pass=sync_first_pass,
            resync_every=resync_every,
            batchnorm_update=batchnorm_update,
        )
        self.seed = seed

    def make_perturbation(self, module: nn.Module) -> Perturbation:
        return GaussianPerturbation(module, rho=self.rho, seed=self.seed)
