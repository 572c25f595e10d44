"""Notice a radius ρ that keeps the model from learning, and say so once.

ρ is the radius of every perturbed weight matrix (νSAM: ``‖ε_i‖_* = ρ`` per matrix), not of
the whole model, and its useful range is narrow: a radius too large for the model leaves the
clean loss where it was, or lets it climb back once the perturbation starts, while every
``sam/*`` metric looks normal. :class:`RadiusWatch` follows the steps' clean (first-pass) and
perturbed (second-pass) losses in windows of ``window`` steps and returns one message when,
at least two windows after the perturbation started, either

- the clean loss *rose* by more than ``rise`` (10 %) above its level at the start (the mean of
  the last window of plain steps before it; without plain steps, of the first perturbed
  window), or
- the clean loss *has not fallen* since the start while the perturbed loss stays more than
  ``gap`` (25 %) above it.

The losses are summed on their device; the watch reads them back once per window (one
host synchronisation every ``window`` steps), never inside a step.

Example:
    >>> import torch
    >>> watch = RadiusWatch(window=2)
    >>> for clean in [2.0, 1.8, 1.6, 1.5]:                      # plain steps: the loss falls
    ...     watch.observe(torch.tensor(clean), None, rho=None)
    >>> messages = [watch.observe(torch.tensor(2.3), torch.tensor(2.4), rho=0.05)
    ...             for _ in range(4)]                        # perturbed: it climbs back
    >>> print(messages[-1].splitlines()[0][:41])
    rho=0.05 may be too large for this model:
    >>> "the clean loss rose from 1.55 before the perturbation started to 2.30" in messages[-1]
    True
"""

from __future__ import annotations

import math

import torch

__all__ = ["RadiusWarning", "RadiusWatch"]


class RadiusWarning(UserWarning):
    """Warned once per fit when the radius ρ seems to keep the model from learning
    (:class:`RadiusWatch`). Silence it with ``warnings.filterwarnings("ignore",
    category=RadiusWarning)``."""


class RadiusWatch:
    """Follows clean and perturbed losses in windows; see the module docstring.

    Args:
        window: steps per window (the losses are read back once per window).
        rise: relative rise of the clean loss above its level at the start that is reported.
        gap: relative excess of the perturbed over the clean loss that, with a clean loss that
            has not fallen since the start, is reported.
    """

    def __init__(self, window: int = 50, rise: float = 0.1, gap: float = 0.25) -> None:
        if window < 1:
            raise ValueError(f"window must be a positive number of steps, got {window}")
        self.window, self.rise, self.gap = window, rise, gap
        self.reset()

    def reset(self) -> None:
        """Forget everything seen (a new fit)."""
        self._clean_sum: torch.Tensor | None = None
        self._perturbed_sum: torch.Tensor | None = None
        self._count = 0
        self._window_perturbed = False
        self._before: float | None = None  # mean clean loss of the last plain window
        self._start: float | None = None  # the reference: before the start, or the first window after
        self._windows_after = 0
        self.warned = False

    def observe(self, clean: torch.Tensor | None, perturbed: torch.Tensor | None,
                rho: float | None) -> str | None:
        """Take one step's mean clean loss, its perturbed loss (None on a plain step) and the radius
        applied (None on a plain step); the message to warn with, once, or None."""
        if self.warned or clean is None:
            return None
        is_perturbed = perturbed is not None and rho is not None
        if is_perturbed != self._window_perturbed:  # a window holds plain or perturbed steps only
            self._clean_sum, self._perturbed_sum, self._count = None, None, 0
            self._window_perturbed = is_perturbed
        clean = clean.detach().float()
        self._clean_sum = clean if self._clean_sum is None else self._clean_sum + clean
        if is_perturbed:
            perturbed = perturbed.detach().float()
            previous = self._perturbed_sum
            self._perturbed_sum = perturbed if previous is None else previous + perturbed
        self._count += 1
        if self._count < self.window:
            return None
        sums = [self._clean_sum] + ([self._perturbed_sum] if is_perturbed else [])
        means = [value / self._count for value in torch.stack(sums).tolist()]  # once per window
        self._clean_sum, self._perturbed_sum, self._count = None, None, 0
        if not all(math.isfinite(value) for value in means):
            return None
        if not is_perturbed:
            self._before = means[0]
            return None
        return self._judge(means[0], means[1], rho)

    def _judge(self, clean: float, perturbed: float, rho: float) -> str | None:
        self._windows_after += 1
        if self._start is None:
            self._start = self._before if self._before is not None else clean
            if self._before is None:
                return None
        if self._windows_after < 2:
            return None
        start, when = self._start, ("before the perturbation started" if self._before is not None
                                    else "in the first steps after it started")
        if clean > start * (1 + self.rise):
            detail = (f"the clean loss rose from {start:.2f} {when} to {clean:.2f} "
                      f"(perturbed loss {perturbed:.2f})")
        elif clean >= start * 0.99 and perturbed > clean * (1 + self.gap):
            detail = (f"the clean loss has not fallen since the start ({start:.2f} {when}, {clean:.2f} now) "
                      f"while the perturbed loss is {perturbed:.2f}")
        else:
            return None
        self.warned = True
        return (
            f"rho={rho:g} may be too large for this model: {detail}.\n"
            "rho is the radius of every perturbed weight matrix, not of the whole model, and its useful "
            f"range is narrow: try rho={rho / 5:g} (or smaller), and compare with the same run without "
            "the callback."
        )
