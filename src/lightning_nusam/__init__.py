"""lightning-nusam: νSAM (nuclear-norm sharpness-aware minimization) for PyTorch and Lightning."""

from lightning_nusam.callbacks import SAM, SAMON, GaussSAM, NuSAM, NuSAMNorm, SharpnessAwareCallback
from lightning_nusam.module import SAMMixin
from lightning_nusam.perturbations import (
    GaussianPerturbation,
    L2Perturbation,
    NormLayerPerturbation,
    NuclearNormalizedPerturbation,
    NuclearPerturbation,
    Perturbation,
)

__version__ = "0.1.0"

__all__ = [
    "SAM",
    "SAMON",
    "GaussSAM",
    "GaussianPerturbation",
    "L2Perturbation",
    "NormLayerPerturbation",
    "NuSAM",
    "NuSAMNorm",
    "NuclearNormalizedPerturbation",
    "NuclearPerturbation",
    "Perturbation",
    "SAMMixin",
    "SharpnessAwareCallback",
    "__version__",
]
