"""When a step perturbs and with which radius: a pure function of the step counters.

The options of a sharpness-aware callback that decide this (:class:`Schedule`) and the counters
of the step at hand (:class:`Counters`: global step, epoch, planned steps, learning rate) give
the :class:`~lightning_nusam.plan.StepPlan` of that step through :func:`plan_step`. Nothing
here reads a Trainer or an optimizer, so the policy is tested by calling it.

Example:
    >>> schedule = Schedule(rho=0.1, start_fraction=0.5, every_n_steps=2)
    >>> [plan_step(schedule, Counters(global_step=t, epoch=0, planned_steps=8)).perturb
    ...  for t in range(8)]
    [False, False, False, False, True, False, True, False]
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from lightning_nusam.checks import check_count, check_flag, check_fraction, check_rho
from lightning_nusam.plan import PLAIN_STEP, StepPlan

RhoSchedule = Literal["constant", "linear", "cosine", "lr"]


@dataclass(frozen=True)
class Schedule:
    """When and how far to perturb (the options are checked when it is made).

    Args:
        rho: the radius ρ ≥ 0 (the perturbation's).
        start_epoch: first epoch (0-based) with perturbation. Exclusive with ``start_fraction``.
        start_fraction: start after this fraction of the planned optimizer steps.
        every_n_steps: after the start, perturb the steps with ``global_step % every_n_steps == 0``.
        rho_schedule: ``"constant"``; ``"linear"`` or ``"cosine"`` from ``rho`` at the first step
            after the start to ``rho_final`` at the last planned step; ``"lr"``:
            ``rho · min(1, lr_t / lr_base)``, ``lr_base`` the optimizer's base learning rate.
        rho_final: the end point of the ``"linear"``/``"cosine"`` schedules (default 0).
        one_pass: perturbed steps use the direction estimated on the previous step; the first
            one after the start is a plain step that primes it.
    """

    rho: float
    start_epoch: int | None = None
    start_fraction: float | None = None
    every_n_steps: int = 1
    rho_schedule: RhoSchedule = "constant"
    rho_final: float | None = None
    one_pass: bool = False

    def __post_init__(self) -> None:
        check_rho(self.rho)
        if self.start_epoch is not None and self.start_fraction is not None:
            raise ValueError("pass either `start_epoch` or `start_fraction`, not both")
        if self.start_epoch is not None:
            object.__setattr__(self, "start_epoch",
                               check_count("start_epoch", self.start_epoch, 0, whole_floats=True))
        if self.start_fraction is not None:
            object.__setattr__(self, "start_fraction", check_fraction("start_fraction", self.start_fraction))
        object.__setattr__(self, "every_n_steps",
                           check_count("every_n_steps", self.every_n_steps, 1, whole_floats=True))
        if self.rho_schedule not in ("constant", "linear", "cosine", "lr"):
            raise ValueError(
                f"`rho_schedule` must be 'constant', 'linear', 'cosine' or 'lr', got {self.rho_schedule!r}"
            )
        if self.rho_final is not None and self.rho_schedule not in ("linear", "cosine"):
            raise ValueError(f"`rho_final` only applies to rho_schedule 'linear' or 'cosine', not "
                             f"{self.rho_schedule!r}")
        if self.rho_final is not None:
            check_rho(self.rho_final)
        check_flag("one_pass", self.one_pass)


@dataclass(frozen=True)
class Counters:
    """Where training is when an optimizer step begins.

    Attributes:
        global_step: optimizer steps taken so far.
        epoch: the current epoch.
        planned_steps: optimizer steps the fit will take (``inf`` when unknown).
        lr: the learning rate of the first parameter group now.
        base_lr: its base value: the schedulers' peak or initial value (``max_lr`` or
            ``initial_lr`` in the group), else the learning rate at the first perturbed step.
        first_step: the first optimizer step after the start, once known (the anchor of the
            linear and cosine schedules).
    """

    global_step: int
    epoch: int
    planned_steps: float = math.inf
    lr: float = 0.0
    base_lr: float = 0.0
    first_step: int | None = None


def start_step(schedule: Schedule, planned_steps: float) -> int | None:
    """The first optimizer step that may perturb, when the start is given as a fraction of the
    planned steps (or not at all: 0); None for ``start_epoch``, which counts epochs."""
    if schedule.start_fraction is not None:
        return math.ceil(schedule.start_fraction * planned_steps)
    return None if schedule.start_epoch is not None else 0


def has_started(schedule: Schedule, counters: Counters) -> bool:
    """Whether the perturbation has started (it perturbs every ``every_n_steps`` from then)."""
    if schedule.start_epoch is not None:
        return counters.epoch >= schedule.start_epoch
    return counters.global_step >= start_step(schedule, counters.planned_steps)


def radius(schedule: Schedule, counters: Counters) -> float:
    """The radius in force at ``counters.global_step`` under ``schedule.rho_schedule``."""
    rho = schedule.rho
    if schedule.rho_schedule == "constant":
        return rho
    if schedule.rho_schedule == "lr":  # relative to the base: a warm-up never makes it larger
        if counters.base_lr <= 0:
            return rho if counters.lr > 0 else 0.0
        return rho * min(1.0, counters.lr / counters.base_lr)
    final = schedule.rho_final or 0.0
    first = counters.first_step if counters.first_step is not None else counters.global_step
    last = counters.planned_steps - 1
    progress = min(1.0, max(0.0, (counters.global_step - first) / max(1.0, last - first)))
    if schedule.rho_schedule == "linear":
        return rho + (final - rho) * progress
    return final + (rho - final) * (1 + math.cos(math.pi * progress)) / 2


def plan_step(schedule: Schedule, counters: Counters, *, has_direction: bool = True) -> StepPlan:
    """What the optimizer step at ``counters.global_step`` does.

    ``has_direction``: whether a one-pass direction has been estimated (the first one-pass step
    after the start has none and primes it with a plain step).
    """
    if not has_started(schedule, counters):
        return PLAIN_STEP
    perturb = counters.global_step % schedule.every_n_steps == 0
    if schedule.one_pass and not has_direction:
        perturb = False
    return StepPlan(perturb=perturb, rho=radius(schedule, counters) if perturb else 0.0,
                    one_pass=schedule.one_pass, estimate=schedule.one_pass)
