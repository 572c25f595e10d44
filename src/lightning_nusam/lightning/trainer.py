"""What the callback, the drop-in and the mixin read from a Lightning ``Trainer``: the
data-parallel group, the context without gradient all-reduce, and the number of optimizer steps.

Example:
    >>> import lightning as L
    >>> trainer = L.Trainer(max_epochs=2, logger=False, enable_checkpointing=False)
    >>> data_parallel_group(trainer) is None  # one process
    True
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch.distributed as dist
from lightning.pytorch.strategies import (
    DDPStrategy,
    DeepSpeedStrategy,
    FSDPStrategy,
    ModelParallelStrategy,
    ParallelStrategy,
)

from lightning_nusam.engine import data_parallel_replicas

#: Strategies that shard gradients: with gradient sync disabled they leave them empty (no m-SAM).
SHARDED_STRATEGIES = (ModelParallelStrategy, FSDPStrategy, DeepSpeedStrategy)


def data_parallel_group(trainer: pl.Trainer) -> dist.ProcessGroup | None:
    """The process group DDP averages gradients over, when there is more than one process (a
    sharded strategy reduces its gradients itself: None)."""
    strategy = trainer.strategy
    if not isinstance(strategy, DDPStrategy):
        return None
    return data_parallel_replicas(strategy.world_size, strategy.model)


def backward_sync_blocker(
        strategy: pl.strategies.Strategy) -> Callable[[], contextlib.AbstractContextManager[Any]]:
    """The strategy's context without gradient all-reduce (nothing to block without one)."""
    if isinstance(strategy, ParallelStrategy):
        return strategy.block_backward_sync
    return contextlib.nullcontext


def is_last_of_window(trainer: pl.Trainer, batch_idx: int, accumulate_grad_batches: int) -> bool:
    """Whether micro-batch ``batch_idx`` ends its optimizer step's window of
    ``accumulate_grad_batches`` (or the epoch)."""
    return (batch_idx + 1) % accumulate_grad_batches == 0 or trainer.is_last_batch


def planned_optimizer_steps(trainer: pl.Trainer, accumulate_grad_batches: int = 1) -> float:
    """Optimizer steps this fit will take, ``inf`` when unknown.

    Lightning's ``estimated_stepping_batches`` (which loads the training data when it has not
    yet, so it works inside ``configure_optimizers``) with two differences: the accumulation is
    the given one (the mixin accumulates under manual optimization, where the Trainer's is 1),
    and an unknown total (an ``IterableDataset`` without ``max_steps``, ``max_time`` only) is
    ``inf``, never ``max_steps = -1``.
    """
    estimate = trainer.estimated_stepping_batches
    if estimate == -1:
        return math.inf
    unlimited_epochs = trainer.max_epochs in (None, -1)  # then the estimate is max_steps (or inf)
    if accumulate_grad_batches == trainer.accumulate_grad_batches or unlimited_epochs \
            or not math.isfinite(estimate):
        return estimate
    max_steps = trainer.max_steps if trainer.max_steps not in (None, -1) else math.inf
    batches = trainer.num_training_batches  # known now: estimated_stepping_batches loaded the data
    if not math.isfinite(batches):
        return max_steps
    per_epoch = math.ceil(batches / accumulate_grad_batches)
    return min(per_epoch * max(trainer.max_epochs or 1, 1), max_steps)
