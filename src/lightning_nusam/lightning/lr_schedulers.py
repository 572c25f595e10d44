"""Learning-rate schedulers stepped under manual optimization, as Lightning steps them otherwise.

Lightning steps no scheduler when a module optimizes manually, and drops the ``monitor`` of a
``ReduceLROnPlateau`` from the scheduler dict that ``configure_optimizers`` returns.
:class:`ManualLRSchedulers` reads the monitors from that configuration
(:meth:`~ManualLRSchedulers.remember`) and steps each scheduler at its interval and frequency
(:meth:`~ManualLRSchedulers.step`), plateau schedulers with their metric.
:class:`~lightning_nusam.SAMMixin` uses it.

Example:
    >>> import torch
    >>> optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    >>> plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer)
    >>> schedulers = ManualLRSchedulers()
    >>> configuration = schedulers.remember(
    ...     {"optimizer": optimizer, "lr_scheduler": {"scheduler": plateau, "monitor": "val/loss"}})
    >>> list(configuration["lr_scheduler"])  # what Lightning gets: no monitor to warn about
    ['scheduler']
    >>> schedulers.plateau_monitors[id(plateau)]
    ('val/loss', True)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn

_PLATEAU_KEYS = ("monitor", "strict", "reduce_on_plateau")


class ManualLRSchedulers:
    """The LR schedulers of one module under manual optimization (see the module docstring)."""

    def __init__(self) -> None:
        #: ``id(scheduler) → (monitor, strict)`` of the plateau schedulers configured
        self.plateau_monitors: dict[int, tuple[str | None, bool]] = {}

    def step(self, module: pl.LightningModule, interval: str, batch_idx: int | None) -> None:
        """Lightning steps no scheduler under manual optimization; mirror what it does otherwise
        (the same interval and frequency counting; plateau schedulers get their metric)."""
        trainer = module.trainer
        for config in trainer.lr_scheduler_configs:
            if config.interval != interval:
                continue
            index = (batch_idx if interval == "step" else trainer.current_epoch) + 1
            if index % config.frequency != 0:
                continue
            metric = None
            if isinstance(config.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                monitor, strict = self._plateau_monitor(config.scheduler)
                metric = trainer.callback_metrics.get(monitor)
                if metric is None:
                    message = (f"ReduceLROnPlateau monitors {monitor!r}, which is not logged; "
                               f"available: {sorted(trainer.callback_metrics)}")
                    if strict:
                        raise RuntimeError(message)
                    rank_zero_warn(message + ". Skipping this learning-rate update.")
                    continue
            module.lr_scheduler_step(config.scheduler, metric)

    def _plateau_monitor(self, scheduler: torch.optim.lr_scheduler.ReduceLROnPlateau) -> tuple[str, bool]:
        monitor, strict = self.plateau_monitors.get(id(scheduler), (None, True))
        monitor = monitor or getattr(scheduler, "monitor", None)  # LightningCLI's ReduceLROnPlateau
        if not monitor:
            raise ValueError(
                "ReduceLROnPlateau needs the metric to monitor: return {'optimizer': ..., "
                "'lr_scheduler': {'scheduler': ..., 'monitor': 'val/loss'}} from configure_optimizers"
            )
        return monitor, strict

    def remember(self, configuration: Any) -> Any:
        """Take ``monitor``/``strict`` out of the scheduler dicts (Lightning ignores them under
        manual optimization, with a warning) and remember them for the mixin's own stepping."""
        def strip(entry: Any) -> Any:
            if isinstance(entry, Mapping) and "scheduler" in entry:
                scheduler = entry["scheduler"]
                if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                    self.plateau_monitors[id(scheduler)] = (entry.get("monitor"),
                                                             bool(entry.get("strict", True)))
                return {k: v for k, v in entry.items() if k not in _PLATEAU_KEYS}
            return entry

        if isinstance(configuration, Mapping):
            configuration = dict(configuration)
            if "lr_scheduler" in configuration:
                configuration["lr_scheduler"] = strip(configuration["lr_scheduler"])
            scheduler = configuration.get("lr_scheduler")
            plateau = isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
            if "monitor" in configuration and plateau:
                self.plateau_monitors[id(scheduler)] = (configuration.pop("monitor"), True)
            return configuration
        if isinstance(configuration, tuple | list) and len(configuration) == 2 \
                and isinstance(configuration[1], list):
            return type(configuration)([configuration[0], [strip(entry) for entry in configuration[1]]])
        return configuration
