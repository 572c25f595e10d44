"""The Lightning layer: everything here imports ``lightning.pytorch``; nothing below it does.

One module per job:

- :mod:`~lightning_nusam.lightning.callback`: :class:`SharpnessAwareCallback` (options, fit
  checks, the plan of each step, checkpoint state), :func:`sam_pass`;
- :mod:`~lightning_nusam.lightning.presets`: the methods (:class:`NuSAM`, :class:`NuSAMNorm`,
  :class:`SAM`, :class:`SAMON`, :class:`GaussSAM`) with their options spelled out;
- :mod:`~lightning_nusam.lightning.dropin`: the drop-in's driver (the step around Lightning's own);
- :mod:`~lightning_nusam.lightning.mixin`: :class:`SAMMixin` (the step under manual optimization);
- :mod:`~lightning_nusam.lightning.lr_schedulers`: the mixin's scheduler stepping;
- :mod:`~lightning_nusam.lightning.trainer`: what they read from a ``Trainer``.

Import the public names from ``lightning_nusam`` (``from lightning_nusam import NuSAM``).
"""

from lightning_nusam.lightning.callback import SharpnessAwareCallback, sam_pass
from lightning_nusam.lightning.mixin import SAMMixin
from lightning_nusam.lightning.presets import SAM, SAMON, GaussSAM, NuSAM, NuSAMNorm

__all__ = ["SAM", "SAMON", "GaussSAM", "NuSAM", "NuSAMNorm", "SAMMixin", "SharpnessAwareCallback", "sam_pass"]
