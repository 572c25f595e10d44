"""Sharpness-aware perturbations in pure PyTorch (no Lightning import).

Each class is built from an ``nn.Module`` and offers ``perturb()`` / ``restore()`` around the
second forward/backward pass, ``state_dict()`` / ``load_state_dict()`` and ``held_numel()``.
"""

from lightning_nusam.perturbations.base import Perturbation
from lightning_nusam.perturbations.gaussian import GaussianPerturbation
from lightning_nusam.perturbations.l2 import L2Perturbation, NormLayerPerturbation
from lightning_nusam.perturbations.nuclear import (
    NuclearNormalizedPerturbation,
    NuclearPerturbation,
)
from lightning_nusam.perturbations.power_iteration import (
    batched_power_iteration,
    power_iteration,
)
from lightning_nusam.perturbations.selection import (
    DEFAULT_NUCLEAR_EXCLUDE,
    NORM_LAYER_TYPES,
    select_all,
    select_matrices,
    select_norm_layers,
)

__all__ = [
    "DEFAULT_NUCLEAR_EXCLUDE",
    "NORM_LAYER_TYPES",
    "GaussianPerturbation",
    "L2Perturbation",
    "NormLayerPerturbation",
    "NuclearNormalizedPerturbation",
    "NuclearPerturbation",
    "Perturbation",
    "batched_power_iteration",
    "power_iteration",
    "select_all",
    "select_matrices",
    "select_norm_layers",
]
