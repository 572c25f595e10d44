"""The methods as callbacks: one preset per perturbation class, with its options spelled out.

Each preset's signature is its perturbation class's options (``model`` left out) followed by the
options common to all methods (:class:`~lightning_nusam.SharpnessAwareCallback`); Python, the
documentation and LightningCLI's ``--help`` read it as written here. A test keeps each signature
equal to its perturbation class's, so an option added there must be added here.

Example:
    >>> callback = NuSAM(rho=0.1, power_iterations=2, start_fraction=0.1)
    >>> callback.rho, callback.perturbation_options["power_iterations"]
    (0.1, 2)
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Literal

from torch import nn

from lightning_nusam import policy
from lightning_nusam.lightning.callback import SharpnessAwareCallback
from lightning_nusam.perturbations import (
    GaussianPerturbation,
    L2Perturbation,
    NormLayerPerturbation,
    NuclearNormalizedPerturbation,
    NuclearPerturbation,
)
from lightning_nusam.perturbations.base import DEFAULT_TAU, own_options
from lightning_nusam.perturbations.nuclear import DEFAULT_MAX_STACK_NUMEL
from lightning_nusam.step_options import DEFAULT_RESYNC_EVERY, BatchNormUpdate, FirstPassReduction

Patterns = Sequence[str] | str | None


class NuSAM(SharpnessAwareCallback):
    """νSAM (the paper's Algorithm 1): a rank-1 perturbation ``ρ u vᵀ`` per weight matrix.

    Takes the options of :class:`~lightning_nusam.perturbations.NuclearPerturbation` (``rho``,
    ``power_iterations``, ``include``, ``exclude``, ``include_conv``, ...), then the common ones
    of :class:`~lightning_nusam.SharpnessAwareCallback`.

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

    def __init__(
        self, rho: float = 0.05, power_iterations: int = 1, *, include: Patterns = None,
        exclude: Patterns = None, exclude_modules: Sequence[type[nn.Module]] | None = None,
        include_conv: bool = False, include_embeddings: bool = False,
        batched: bool | Literal["auto"] = "auto", foreach: bool = True,
        max_stack_numel: int = DEFAULT_MAX_STACK_NUMEL, tau: float = DEFAULT_TAU, seed: int = 0,
        exact_restore: bool | None = None, execution: Literal["eager", "compiled"] = "eager",
        start_epoch: int | None = None, start_fraction: float | None = None, every_n_steps: int = 1,
        rho_schedule: policy.RhoSchedule = "constant", rho_final: float | None = None, one_pass: bool = False,
        sync_first_pass: bool = True, first_pass_reduction: FirstPassReduction = "auto",
        resync_every: int = DEFAULT_RESYNC_EVERY, batchnorm_update: BatchNormUpdate = "first",
        same_random_draws: bool = True,
    ) -> None:
        super().__init__(**own_options(locals()))


class NuSAMNorm(SharpnessAwareCallback):
    """νSAM-Norm (Appendix C.1): matrix ``i`` perturbed by ``ρ σᵢ uᵢvᵢᵀ / √Σⱼσⱼ²``.

    Takes the options of :class:`~lightning_nusam.perturbations.NuclearNormalizedPerturbation`
    (those of νSAM), then the common ones.

    Example:
        >>> callback = NuSAMNorm(rho=0.05, start_fraction=0.1)
    """

    perturbation_class = NuclearNormalizedPerturbation

    def __init__(
        self, rho: float = 0.05, power_iterations: int = 1, *, include: Patterns = None,
        exclude: Patterns = None, exclude_modules: Sequence[type[nn.Module]] | None = None,
        include_conv: bool = False, include_embeddings: bool = False,
        batched: bool | Literal["auto"] = "auto", foreach: bool = True,
        max_stack_numel: int = DEFAULT_MAX_STACK_NUMEL, tau: float = DEFAULT_TAU, seed: int = 0,
        exact_restore: bool | None = None, execution: Literal["eager", "compiled"] = "eager",
        start_epoch: int | None = None, start_fraction: float | None = None, every_n_steps: int = 1,
        rho_schedule: policy.RhoSchedule = "constant", rho_final: float | None = None, one_pass: bool = False,
        sync_first_pass: bool = True, first_pass_reduction: FirstPassReduction = "auto",
        resync_every: int = DEFAULT_RESYNC_EVERY, batchnorm_update: BatchNormUpdate = "first",
        same_random_draws: bool = True,
    ) -> None:
        super().__init__(**own_options(locals()))


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

    def __init__(
        self, rho: float = 0.05, *, include: Patterns = None, exclude: Patterns = None,
        tau: float = DEFAULT_TAU, adaptive: bool = False, adaptive_eta: float = 0.0,
        start_epoch: int | None = None, start_fraction: float | None = None, every_n_steps: int = 1,
        rho_schedule: policy.RhoSchedule = "constant", rho_final: float | None = None, one_pass: bool = False,
        sync_first_pass: bool = True, first_pass_reduction: FirstPassReduction = "auto",
        resync_every: int = DEFAULT_RESYNC_EVERY, batchnorm_update: BatchNormUpdate = "first",
        same_random_draws: bool = True,
    ) -> None:
        super().__init__(**own_options(locals()))


class SAMON(SharpnessAwareCallback):
    """SAM-ON: SAM on the parameters of normalization layers only (found by module type).

    Takes the options of :class:`~lightning_nusam.perturbations.NormLayerPerturbation` (ρ
    defaults to 0.5 there), then the common ones.

    Example:
        >>> import lightning as L
        >>> trainer = L.Trainer(callbacks=[SAMON(rho=0.5)], logger=False)
    """

    perturbation_class = NormLayerPerturbation

    def __init__(
        self, rho: float = 0.5, *, extra_norm_types: Sequence[type[nn.Module]] | None = None,
        tau: float = DEFAULT_TAU,
        start_epoch: int | None = None, start_fraction: float | None = None, every_n_steps: int = 1,
        rho_schedule: policy.RhoSchedule = "constant", rho_final: float | None = None, one_pass: bool = False,
        sync_first_pass: bool = True, first_pass_reduction: FirstPassReduction = "auto",
        resync_every: int = DEFAULT_RESYNC_EVERY, batchnorm_update: BatchNormUpdate = "first",
        same_random_draws: bool = True,
    ) -> None:
        super().__init__(**own_options(locals()))


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

    def __init__(
        self, rho: float = 0.05, *, seed: int = 0, include: Patterns = None, exclude: Patterns = None,
        exact_restore: bool | None = None,
        start_epoch: int | None = None, start_fraction: float | None = None, every_n_steps: int = 1,
        rho_schedule: policy.RhoSchedule = "constant", rho_final: float | None = None, one_pass: bool = False,
        sync_first_pass: bool = True, first_pass_reduction: FirstPassReduction = "auto",
        resync_every: int = DEFAULT_RESYNC_EVERY, batchnorm_update: BatchNormUpdate = "first",
        same_random_draws: bool = True,
    ) -> None:
        super().__init__(**own_options(locals()))


#: The presets, by name: a method is one entry here and one class above.
PRESETS: dict[str, type[SharpnessAwareCallback]] = {
    cls.__name__: cls for cls in (NuSAM, NuSAMNorm, SAM, SAMON, GaussSAM)}


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


def _document(preset: type[SharpnessAwareCallback]) -> None:
    """The documentation of a preset's ``__init__``: its perturbation class's options (the method),
    then the common ones, as the docs and LightningCLI's ``--help`` show them."""
    method = preset.perturbation_class
    preset.__init__.__doc__ = (
        f"The options of :class:`{method.__module__}.{method.__name__}` (the method), then those of "
        ":class:`~lightning_nusam.SharpnessAwareCallback` (the schedule and the step).\n\n"
        "Args:\n" + _args_section(method.__doc__, skip=("model",))
        + _args_section(SharpnessAwareCallback.__doc__, skip=("**perturbation_options",))
    )


for _preset in PRESETS.values():
    _document(_preset)
