"""The options of the sharpness-aware step, checked once where they are defined.

Every way in (the callbacks, :class:`~lightning_nusam.SAMMixin` through the callback,
:class:`~lightning_nusam.optim.SAMOptimizer`, the Fabric helpers, a plain
:class:`~lightning_nusam.engine.StepEngine`) takes them as a :class:`StepOptions`, so a mistake is
refused with the same message whichever way it comes in.

Example:
    >>> StepOptions(batchnorm_update="second").batchnorm_update
    'second'
    >>> StepOptions(batchnorm_update="firts")
    Traceback (most recent call last):
    ...
    ValueError: `batchnorm_update` must be one of 'first', 'second', 'both', got 'firts'
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from lightning_nusam.checks import check_choice, check_count, check_flag

#: Which pass updates BatchNorm running statistics.
BatchNormUpdate = Literal["first", "second", "both"]

#: How a synced first pass (``sync_first_pass=True``) is synchronised under data parallelism:
#: ``"auto"`` communicates only what the perturbation reads (νSAM: the power iteration's products;
#: SAM-ON: the normalisation layers' gradients; GaussSAM: nothing; SAM: the gradient);
#: ``"gradients"`` all-reduces the whole first-pass gradient as SAM does.
FirstPassReduction = Literal["auto", "gradients"]

#: Default interval (optimizer steps) at which m-SAM re-broadcasts rank 0's weights.
DEFAULT_RESYNC_EVERY = 100


@dataclass(frozen=True)
class StepOptions:
    """How the step runs, checked at construction (``ValueError``/``TypeError`` naming the option
    and what it takes).

    Args:
        sync_first_pass: under data parallelism every rank applies the ε of the mean first-pass
            gradient (Algorithm 3, default); ``False`` gives m-SAM (each rank perturbs with its
            own gradient; the second pass is always all-reduced).
        first_pass_reduction: how a synced first pass communicates: ``"auto"`` only what the
            perturbation reads, ``"gradients"`` the whole gradient (see :data:`FirstPassReduction`).
        batchnorm_update: which pass updates BatchNorm running statistics: ``"first"`` (at ``w``,
            default), ``"second"`` or ``"both"``.
        same_random_draws: both passes of a micro-batch draw the same random numbers (dropout
            masks, draws in the loss code) and the random stream after the step is that of a
            plain step; ``False`` lets the second pass draw new ones.
        resync_every: m-SAM only: every this many optimizer steps rank 0's weights are broadcast
            (``0``: never).
    """

    sync_first_pass: bool = True
    first_pass_reduction: FirstPassReduction = "auto"
    batchnorm_update: BatchNormUpdate = "first"
    same_random_draws: bool = True
    resync_every: int = DEFAULT_RESYNC_EVERY

    def __post_init__(self) -> None:
        checked = {
            "sync_first_pass": check_flag("sync_first_pass", self.sync_first_pass),
            "first_pass_reduction": check_choice("first_pass_reduction", self.first_pass_reduction,
                                                 ("auto", "gradients")),
            "batchnorm_update": check_choice("batchnorm_update", self.batchnorm_update,
                                             ("first", "second", "both")),
            "same_random_draws": check_flag("same_random_draws", self.same_random_draws),
            "resync_every": check_count("resync_every", self.resync_every, 0, whole_floats=True),
        }
        for name, value in checked.items():
            object.__setattr__(self, name, value)

    def replace(self, **changes: Any) -> StepOptions:
        """A copy with ``changes`` (checked again)."""
        return dataclasses.replace(self, **changes)


__all__ = ["DEFAULT_RESYNC_EVERY", "BatchNormUpdate", "FirstPassReduction", "StepOptions"]
