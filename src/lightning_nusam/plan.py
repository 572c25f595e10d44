"""What one optimizer step does and what it did: the types the policy, the engine and every way
in share (pure Python and PyTorch, no Lightning).

Example:
    >>> StepPlan(perturb=True, rho=0.05).two_pass
    True
    >>> PLAIN_STEP.two_pass
    False
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

#: The pass of a two-pass step: ``"first"`` at ``w``, ``"second"`` at ``w + ε``.
PassName = Literal["first", "second"]


@dataclass(frozen=True)
class StepPlan:
    """What one optimizer step does; decided at its first micro-batch (see ``policy.plan_step``).

    Attributes:
        perturb: the step perturbs (two passes, or one pass at ``w + ε`` when ``one_pass``).
        rho: the radius in force (0 when not perturbing).
        one_pass: ``ε`` comes from the previous step's direction; a single pass.
        estimate: estimate the direction for the next step after the last backward (one-pass
            mode from its start on; the first such step only primes it).
    """

    perturb: bool = False
    rho: float = 0.0
    one_pass: bool = False
    estimate: bool = False

    @property
    def two_pass(self) -> bool:
        return self.perturb and not self.one_pass


#: A plain step: one pass at ``w`` (before the start, between ``every_n_steps``).
PLAIN_STEP = StepPlan()


@dataclass(frozen=True)
class StepResult:
    """What a step did: its plan, whether ε was applied, and the mean losses of its passes."""

    plan: StepPlan
    perturbed: bool
    first_loss: torch.Tensor | None
    second_loss: torch.Tensor | None


__all__ = ["PLAIN_STEP", "PassName", "StepPlan", "StepResult"]
