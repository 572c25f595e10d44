"""``make demo``: train the quickstart config with νSAM, test it, print a summary, plot the curves.

Run ``python -m lightning_nusam.demo [--config configs/quickstart.yaml]``. Everything is written
under the config's ``trainer.default_root_dir`` (``runs/quickstart``): TensorBoard and CSV logs,
checkpoints and ``curves.png``.
"""

from __future__ import annotations

import argparse
import csv
import math
import resource
import statistics
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from lightning_nusam.callbacks import SharpnessAwareCallback
from lightning_nusam.cli import cli_main


class StepTimer(Callback):
    """Wall time of every training step, split by whether the perturbation was active."""

    def __init__(self) -> None:
        self.one_pass: list[float] = []
        self.two_pass: list[float] = []
        self._start = 0.0
        self._active = False

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx
    ) -> None:
        sam = [cb for cb in trainer.callbacks if isinstance(cb, SharpnessAwareCallback)]
        self._active = bool(sam) and sam[0].is_active(trainer)
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                           batch_idx) -> None:
        (self.two_pass if self._active else self.one_pass).append(time.perf_counter() - self._start)


def peak_rss_mib() -> float:
    """Peak resident memory of this process (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024**2 if sys.platform == "darwin" else 1024)


def read_metrics(path: Path) -> dict[str, list[tuple[int, float]]]:
    """``{metric: [(step, value), ...]}`` from a CSVLogger ``metrics.csv``."""
    series: dict[str, list[tuple[int, float]]] = {}
    with path.open() as handle:
        for row in csv.DictReader(handle):
            for key, value in row.items():
                if key not in ("step", "epoch") and value not in ("", None):
                    series.setdefault(key, []).append((int(row["step"]), float(value)))
    return series


def plot_curves(metrics: dict[str, list[tuple[int, float]]], start_step: int | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("training loss (first pass)", ["train/loss_step"]),
        ("sharpness: perturbed − clean loss", ["sam/sharpness_step"]),
        ("accuracy", ["train/acc1_epoch", "val/acc1"]),
    ]
    figure, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for axis, (title, keys) in zip(axes, panels, strict=True):
        for key in keys:
            if key in metrics:
                steps, values = zip(*metrics[key], strict=True)
                axis.plot(steps, values, label=key, marker="o" if len(steps) < 40 else None, markersize=3)
        if start_step is not None:
            axis.axvline(start_step, color="grey", linestyle="--", linewidth=1, label="νSAM starts")
        axis.set_title(title)
        axis.set_xlabel("optimizer step")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/quickstart.yaml")
    parser.epilog = "Other arguments go to LightningCLI, e.g. --trainer.max_epochs=3"
    args, overrides = parser.parse_known_args(argv)

    started = time.perf_counter()
    cli = cli_main(["-c", args.config, *overrides], run=False)
    trainer, model, data = cli.trainer, cli.model, cli.datamodule
    timer = StepTimer()
    trainer.callbacks.append(timer)
    trainer.fit(model, datamodule=data)
    test = trainer.test(model, datamodule=data, ckpt_path="best", verbose=False)[0]
    wall = time.perf_counter() - started

    sam = next(cb for cb in trainer.callbacks if isinstance(cb, SharpnessAwareCallback))
    held, sam_would_hold = sam.perturbation.held_numel(), sum(
        p.numel() for p in model.parameters() if p.requires_grad
    )
    root = Path(trainer.default_root_dir)
    start_step = first_active_step(trainer, sam)
    csv_logger = next((lg for lg in trainer.loggers if type(lg).__name__ == "CSVLogger"), None)
    plot_path = root / "curves.png"
    if csv_logger is not None:
        plot_curves(read_metrics(Path(csv_logger.log_dir) / "metrics.csv"), start_step, plot_path)

    summary = {
        "test_acc1": test["test/acc1"],
        "peak_rss_mib": peak_rss_mib(),
        "held_numel": held,
        "sam_numel": sam_would_hold,
        "one_pass_ms": 1000 * statistics.median(timer.one_pass) if timer.one_pass else math.nan,
        "two_pass_ms": 1000 * statistics.median(timer.two_pass) if timer.two_pass else math.nan,
        "wall_s": wall,
    }
    print_summary(summary, type(sam).__name__, root, plot_path)
    return summary


def first_active_step(trainer: pl.Trainer, sam: SharpnessAwareCallback) -> int | None:
    return sam.start_step


def print_summary(summary: dict[str, float], method: str, root: Path, plot_path: Path) -> None:
    rows = [
        ("test accuracy (best checkpoint)", f"{100 * summary['test_acc1']:.2f} %"),
        ("peak memory (process RSS)", f"{summary['peak_rss_mib']:.0f} MiB"),
        (f"{method} perturbation memory", f"{summary['held_numel']:,} numbers"),
        ("SAM would hold (a copy of the weights)", f"{summary['sam_numel']:,} numbers "
         f"({summary['sam_numel'] / max(summary['held_numel'], 1):.0f}x more)"),
        ("time per step, one pass (before start)", f"{summary['one_pass_ms']:.1f} ms (median)"),
        (f"time per step, two passes ({method})", f"{summary['two_pass_ms']:.1f} ms (median)"),
        ("wall time, fit + test", f"{summary['wall_s']:.1f} s"),
    ]
    width = max(len(name) for name, _ in rows)
    print("\n" + "-" * (width + 30))
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    print("-" * (width + 30))
    print(f"logs and checkpoints: {root}/   curves: {plot_path}")


if __name__ == "__main__":
    main()
