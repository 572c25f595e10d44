"""Deprecated: the callbacks moved to :mod:`lightning_nusam.lightning` in 0.4.0; this module
re-exports them for one release with a ``DeprecationWarning``. Import them from ``lightning_nusam``
(``from lightning_nusam import NuSAM``)."""

from __future__ import annotations

import importlib
import warnings

#: old name → the module that defines it now
_MOVED = {
    "SharpnessAwareCallback": "lightning_nusam.lightning.callback",
    "sam_pass": "lightning_nusam.lightning.callback",
    "log_step": "lightning_nusam.lightning.callback",
    "NuSAM": "lightning_nusam.lightning.presets",
    "NuSAMNorm": "lightning_nusam.lightning.presets",
    "SAM": "lightning_nusam.lightning.presets",
    "SAMON": "lightning_nusam.lightning.presets",
    "GaussSAM": "lightning_nusam.lightning.presets",
    "SHARDED_STRATEGIES": "lightning_nusam.lightning.trainer",
    "data_parallel_group": "lightning_nusam.lightning.trainer",
    "planned_optimizer_steps": "lightning_nusam.lightning.trainer",
    "optimizer_needs_closure": "lightning_nusam.engine",
}


def __getattr__(name: str) -> object:
    if name not in _MOVED:
        raise AttributeError(f"module 'lightning_nusam.callbacks' has no attribute {name!r}")
    warnings.warn(f"lightning_nusam.callbacks.{name} moved to {_MOVED[name]}.{name} (import it from "
                  "lightning_nusam where it is public); lightning_nusam.callbacks goes in 0.5.0",
                  DeprecationWarning, stacklevel=2)
    return getattr(importlib.import_module(_MOVED[name]), name)

