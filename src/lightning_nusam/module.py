"""Deprecated: :class:`~lightning_nusam.SAMMixin` moved to :mod:`lightning_nusam.lightning.mixin`
in 0.4.0; this module re-exports it for one release with a ``DeprecationWarning``. Import it from
``lightning_nusam`` (``from lightning_nusam import SAMMixin``)."""

from __future__ import annotations

import importlib
import warnings

#: old name → the module that defines it now
_MOVED = {"SAMMixin": "lightning_nusam.lightning.mixin", "LossOutput": "lightning_nusam.lightning.mixin"}


def __getattr__(name: str) -> object:
    if name not in _MOVED:
        raise AttributeError(f"module 'lightning_nusam.module' has no attribute {name!r}")
    warnings.warn(f"lightning_nusam.module.{name} moved to {_MOVED[name]}.{name} (import it from "
                  "lightning_nusam where it is public); lightning_nusam.module goes in 0.5.0",
                  DeprecationWarning, stacklevel=2)
    return getattr(importlib.import_module(_MOVED[name]), name)

