"""Lightning Fabric: the step engine in a Fabric training loop.

A perturbation works on a Fabric model whether it is built before or after ``fabric.setup``: it
unwraps Fabric's module (the names and ``state_dict`` keys are yours) and follows the model when
``setup`` moves or casts it (``bf16-true``: the exact low-precision restore is chosen then).
:func:`fabric_engine` gives the step engine with Fabric's data-parallel group, :func:`fabric_passes`
the passes with ``fabric.backward`` and ``fabric.no_backward_sync``::

    fabric = Fabric(precision="bf16-mixed", strategy="ddp", devices=2)
    fabric.launch()
    nusam = NuclearPerturbation(model, rho=0.05)          # before or after setup: the same
    model, optimizer = fabric.setup(model, optimizer)
    engine = fabric_engine(fabric, model, nusam)
    passes = fabric_passes(fabric, model, lambda batch, index: loss_fn(model(batch[0]), batch[1]))
    for index, batch in enumerate(loader):
        engine.step(passes, [(batch, index)], optimizer)

Under DDP the first pass then communicates only what the perturbation reads (νSAM: the power
iteration's products), and every rank applies the same ``ε``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from lightning_nusam.engine import LossPasses, StepEngine, data_parallel_replicas

if TYPE_CHECKING:
    from lightning.fabric import Fabric

    from lightning_nusam.perturbations import Perturbation


def data_parallel_group(fabric: Fabric) -> dist.ProcessGroup | None:
    """The process group Fabric's DDP averages gradients over (None on one process, and for
    sharded strategies, which reduce the gradients themselves)."""
    from lightning.fabric.strategies import DDPStrategy

    if not isinstance(fabric.strategy, DDPStrategy):
        return None
    return data_parallel_replicas(fabric.world_size)


def fabric_engine(fabric: Fabric, model: nn.Module, perturbation: Perturbation | None,
                  **options: Any) -> StepEngine:
    """A :class:`~lightning_nusam.engine.StepEngine` for ``model`` (set up by ``fabric``), with
    Fabric's data-parallel group; ``options`` are the engine's (``sync_first_pass``, ...)."""
    return StepEngine(model, perturbation, replicas=data_parallel_group(fabric), **options)


def fabric_passes(fabric: Fabric, model: nn.Module, loss: Callable[[Any, int], torch.Tensor | None],
                  micro_batches_per_step: int = 1) -> LossPasses:
    """The engine's passes in a Fabric loop: ``loss(batch, batch_idx)`` (None skips a micro-batch),
    ``fabric.backward`` (precision scaling) and ``fabric.no_backward_sync(model)``."""
    return LossPasses(loss, micro_batches_per_step, backward=fabric.backward,
                      no_sync=lambda: fabric.no_backward_sync(model))
