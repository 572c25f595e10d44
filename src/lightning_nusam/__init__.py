"""lightning-nusam: νSAM (nuclear-norm sharpness-aware minimization) for PyTorch and Lightning.

The pure-PyTorch core (``lightning_nusam.perturbations``) does not import Lightning: the names
below that need it (the callbacks, the mixin) are imported on first use (PEP 562). ``dir()`` and
``__all__`` list the public names only; the rest lives in the submodules (``lightning_nusam.optim``,
``.fabric``, ``.models``, ``.data``, ``.perturbations``, ``.cli``, ``.memory``).

Example:
    >>> import lightning_nusam
    >>> dir(lightning_nusam) == sorted(lightning_nusam.__all__)
    True
"""

from __future__ import annotations

import importlib as _importlib
from typing import TYPE_CHECKING

__version__ = "0.3.0"

#: public name → the module that defines it
_LAZY = {
    "SAM": "lightning_nusam.lightning",
    "SAMON": "lightning_nusam.lightning",
    "GaussSAM": "lightning_nusam.lightning",
    "NuSAM": "lightning_nusam.lightning",
    "NuSAMNorm": "lightning_nusam.lightning",
    "SharpnessAwareCallback": "lightning_nusam.lightning",
    "SAMMixin": "lightning_nusam.lightning",
    "sam_pass": "lightning_nusam.lightning",
    "GaussianPerturbation": "lightning_nusam.perturbations",
    "L2Perturbation": "lightning_nusam.perturbations",
    "NormLayerPerturbation": "lightning_nusam.perturbations",
    "NuclearNormalizedPerturbation": "lightning_nusam.perturbations",
    "NuclearPerturbation": "lightning_nusam.perturbations",
    "Perturbation": "lightning_nusam.perturbations",
}

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
    "sam_pass",
]

if TYPE_CHECKING:
    from lightning_nusam.lightning import (
        SAM,
        SAMON,
        GaussSAM,
        NuSAM,
        NuSAMNorm,
        SAMMixin,
        SharpnessAwareCallback,
        sam_pass,
    )
    from lightning_nusam.perturbations import (
        GaussianPerturbation,
        L2Perturbation,
        NormLayerPerturbation,
        NuclearNormalizedPerturbation,
        NuclearPerturbation,
        Perturbation,
    )


def __getattr__(name: str) -> object:
    if name not in _LAZY:
        raise AttributeError(f"module 'lightning_nusam' has no attribute {name!r}")
    value = getattr(_importlib.import_module(_LAZY[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    """The public names (not the helpers of this file, nor the submodules imported so far)."""
    return sorted(__all__)
