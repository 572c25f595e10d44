"""lightning-nusam: νSAM (nuclear-norm sharpness-aware minimization) for PyTorch and Lightning."""

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
    "GaussianPerturbation",
    "L2Perturbation",
    "NormLayerPerturbation",
    "NuclearNormalizedPerturbation",
    "NuclearPerturbation",
    "Perturbation",
    "__version__",
]
