"""``make demo``: what νSAM costs and what it buys, on this machine, in about a minute.

1. The ``quickstart`` config: a small MLP-Mixer on the 8×8 digits shipped in the package, two epochs
   of plain AdamW then νSAM; it is tested on the best checkpoint, and the summary gives the
   memory the perturbation holds against SAM's copy of the weights and the time per step.
2. The ``quickstart_noise`` config: the same model with 40 % of the training labels replaced by
   another class, trained with AdamW alone and with νSAM; the summary puts the two test
   accuracies (clean test labels) and the fraction of wrong labels each one fit side by side.

Run ``python -m lightning_nusam.demo`` (the packaged configs; ``--config``/``--noise-config`` take
other names or files; other arguments go to LightningCLI for the first part). Outputs go to the
working directory, one folder per run: ``runs/quickstart/version_N`` (CSV and TensorBoard logs,
checkpoints, ``curves.png``) and ``runs/quickstart_noise/version_N`` (the AdamW run, then the νSAM
run with ``comparison.png``). Runs on the base install; the plots need matplotlib
(``pip install "lightning-nusam[demo]"``), without it they are skipped with a line saying so.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import math
import resource
import statistics
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger

from lightning_nusam.cli import cli_main
from lightning_nusam.data import measure_noise_fit
from lightning_nusam.lightning.callback import SharpnessAwareCallback
from lightning_nusam.usage import MissingExtraError


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
        self._active = bool(sam) and sam[0].has_started(trainer)
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
    matplotlib = require_matplotlib()

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


#: printed when the plots are skipped
NO_PLOTS = "plots skipped: matplotlib is not installed (pip install 'lightning-nusam[demo]' draws them)"


def has_matplotlib() -> bool:
    """Whether the plots can be drawn (the ``demo`` extra)."""
    return importlib.util.find_spec("matplotlib") is not None


def require_matplotlib():
    try:
        import matplotlib
    except ImportError as error:
        raise MissingExtraError(
            "the demo's plots need matplotlib: pip install 'lightning-nusam[demo]'"
        ) from error
    return matplotlib


class ValidationHistory(Callback):
    """``val/acc1`` after every epoch."""

    def __init__(self) -> None:
        self.accuracy: list[float] = []

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.accuracy.append(float(trainer.callback_metrics["val/acc1"]))


def build(config: str, overrides: list[str]):
    """The LightningCLI objects of ``config`` (a packaged name or a file), not run yet."""
    argv, sys.argv = sys.argv, sys.argv[:1]  # the arguments are explicit: LightningCLI need not warn
    try:
        return cli_main(["-c", config, *overrides], run=False)
    finally:
        sys.argv = argv


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="quickstart", help="packaged config name or YAML file")
    parser.add_argument("--noise-config", default="quickstart_noise",
                        help="the label-noise comparison's config ('' skips it)")
    parser.epilog = "Other arguments go to LightningCLI for the first part, e.g. --trainer.max_epochs=3"
    args, overrides = parser.parse_known_args(argv)

    started = time.perf_counter()
    cli = build(args.config, overrides)
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
    root = Path(trainer.log_dir or trainer.default_root_dir)
    start_step = sam.start_step
    csv_logger = next((lg for lg in trainer.loggers if isinstance(lg, CSVLogger)), None)
    plot_path: Path | None = root / "curves.png"
    if csv_logger is None or not has_matplotlib():
        plot_path = None
    else:
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
    comparison_path = None
    if args.noise_config:
        started = time.perf_counter()
        runs = {name: noisy_run(args.noise_config, with_sam) for name, with_sam in (("AdamW", False),
                                                                                    ("νSAM", True))}
        summary["noise_wall_s"] = time.perf_counter() - started
        for name, run in runs.items():
            summary[f"noise_test_acc1_{name}"] = run["test_acc1"]
            summary[f"noise_memorised_{name}"] = run["memorised"]
            summary[f"noise_best_val_{name}"] = max(run["history"])
            summary[f"noise_best_epoch_{name}"] = 1 + run["history"].index(max(run["history"]))
        summary["noise_fraction"] = runs["νSAM"]["noise"]
        summary["noise_rho"] = runs["νSAM"]["rho"]
        if has_matplotlib():
            comparison_path = runs["νSAM"]["root"] / "comparison.png"
            plot_comparison(runs, comparison_path)
    print_summary(summary, type(sam).__name__, root, plot_path, comparison_path)
    return summary


def noisy_run(config: str, with_sam: bool) -> dict:
    """Train the label-noise config with its sharpness-aware callback, or without it (AdamW)."""
    cli = build(config, [])
    trainer, model, data = cli.trainer, cli.model, cli.datamodule
    sam = next(cb for cb in trainer.callbacks if isinstance(cb, SharpnessAwareCallback))
    if not with_sam:
        trainer.callbacks.remove(sam)
    history = ValidationHistory()
    trainer.callbacks.append(history)
    trainer.fit(model, datamodule=data)
    test = trainer.test(model, datamodule=data, verbose=False)[0]
    noisy = data.noisy_labels
    return {
        "test_acc1": test["test/acc1"],
        "memorised": measure_noise_fit(model, data.train_eval_dataloader(), noisy).memorised,
        "history": history.accuracy,
        "noise": noisy.fraction,
        "rho": sam.rho,
        "root": Path(trainer.log_dir or trainer.default_root_dir),
    }


def plot_comparison(runs: dict[str, dict], path: Path) -> None:
    matplotlib = require_matplotlib()

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"AdamW": "tab:grey", "νSAM": "tab:orange"}
    figure, (curves, bars) = plt.subplots(1, 2, figsize=(11, 3.8))
    for name, run in runs.items():
        curves.plot(range(1, len(run["history"]) + 1), [100 * a for a in run["history"]], marker="o",
                    markersize=3, color=colors[name], label=name)
    curves.set_title("validation accuracy, clean labels (%)")
    curves.set_xlabel("epoch")
    curves.grid(alpha=0.3)
    curves.legend()
    names = list(runs)
    positions = range(len(names))
    bars.bar([p - 0.2 for p in positions], [100 * runs[n]["test_acc1"] for n in names], width=0.4,
             label="test accuracy", color="tab:green")
    bars.bar([p + 0.2 for p in positions], [100 * runs[n]["memorised"] for n in names], width=0.4,
             label="wrong training labels fit", color="tab:red")
    bars.set_xticks(list(positions), names)
    bars.set_ylabel("%")
    bars.set_title(f"{100 * runs['νSAM']['noise']:.0f} % label noise, after training")
    bars.legend(fontsize=8)
    bars.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def print_summary(summary: dict[str, float], method: str, root: Path, plot_path: Path | None,
                  comparison_path: Path | None) -> None:
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
    if "noise_wall_s" in summary:
        noise, rho = 100 * summary["noise_fraction"], summary["noise_rho"]
        rows += [
            (f"with {noise:.0f} % wrong training labels:", ""),
            ("  test accuracy, AdamW", f"{100 * summary['noise_test_acc1_AdamW']:.2f} %"),
            (f"  test accuracy, {method} (rho {rho:g})", f"{100 * summary['noise_test_acc1_νSAM']:.2f} %"),
            ("  wrong labels fit, AdamW", f"{100 * summary['noise_memorised_AdamW']:.1f} %"),
            (f"  wrong labels fit, {method}", f"{100 * summary['noise_memorised_νSAM']:.1f} %"),
            ("  best validation accuracy, AdamW", f"{100 * summary['noise_best_val_AdamW']:.2f} % "
             f"(epoch {summary['noise_best_epoch_AdamW']}, before it fit the noise)"),
            (f"  best validation accuracy, {method}", f"{100 * summary['noise_best_val_νSAM']:.2f} % "
             f"(epoch {summary['noise_best_epoch_νSAM']})"),
            ("  wall time, both runs", f"{summary['noise_wall_s']:.1f} s"),
        ]
    width = max(len(name) for name, _ in rows)
    print("\n" + "-" * (width + 30))
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    print("-" * (width + 30))
    print(f"logs and checkpoints: {root}/" + (f"   curves: {plot_path}" if plot_path else ""))
    if comparison_path is not None:
        print(f"label noise, AdamW vs {method}: {comparison_path}")
    if not has_matplotlib():
        print(NO_PLOTS)


if __name__ == "__main__":
    main()
