"""Does it generalise? AdamW vs SAM vs SAM-ON vs νSAM on the real CIFAR-10, resumable.

A *plan* is a grid of runs (model, method, ρ, perturbation start, seed). Each run trains in a
fresh process with this package's ImageClassifier, CIFARDataModule and callbacks, evaluates
on the test set (every epoch, or every ``eval_every`` epochs), and appends one row to
``runs.csv``: final and best test accuracy, final train loss, wall time, peak memory and the
exact command that reproduces it. Finished runs are skipped, so the study resumes where it
stopped. The seeds of the second phase use the best ρ per method found in the first.

With label noise (plan ``noise``) a fixed fraction of the training labels is replaced by
another class (the same corrupted labels for every run); the test set stays clean. Each row
then also records, measured on the training images without augmentation after the last
epoch, the accuracy on the clean part, on the noisy part against the wrong labels (how much
of the noise was memorised), and on the noisy part against the true labels.

    python benchmarks/accuracy.py --plan cpu            # the CPU-scale study (small models)
    python benchmarks/accuracy.py --plan noise          # 40 % label noise, about 2 hours of CPU
    python benchmarks/accuracy.py --plan gpu            # paper scale: Mixer-S/4, ViT-S/4, 300 epochs
    python benchmarks/accuracy.py --plan cpu --report   # only rebuild the table and the plot
    python benchmarks/accuracy.py --plan smoke --out /tmp/smoke   # the whole pipeline in a minute
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent
DEFAULT_DATA = ROOT.parent.parent / "shared" / "data" / "cifar10"

MODELS = {  # name: (timm name or class path, keyword arguments, patch size)
    # CPU scale: width 128, depth 4, patch 4 (about 0.5-0.8 M parameters)
    "mixer_128_4": ("timm.models.mlp_mixer.MlpMixer", {"num_blocks": 4, "embed_dim": 128}, 4),
    "vit_128_4": ("vit_small_patch16_224", {"depth": 4, "embed_dim": 128, "num_heads": 4}, 4),
    # label noise: the same Mixer on 8×8 patches (16 tokens), 2.7× faster, so it fits the noise in time
    "mixer_128_p8": ("timm.models.mlp_mixer.MlpMixer", {"num_blocks": 4, "embed_dim": 128}, 8),
    # paper scale (Table 6)
    "mixer_s4": ("timm.models.mlp_mixer.MlpMixer", {"num_blocks": 8, "embed_dim": 512}, 4),
    "vit_s4": ("vit_small_patch16_224", {}, 4),
    # pipeline check (the smoke plans)
    "mixer_32_2": ("timm.models.mlp_mixer.MlpMixer", {"num_blocks": 2, "embed_dim": 32}, 4),
}
#: method name in the plans → (callback class, extra callback arguments)
CALLBACKS: dict[str, tuple[str, dict]] = {"sam": ("SAM", {}), "samon": ("SAMON", {}), "nusam": ("NuSAM", {}),
                                          "nusam1p": ("NuSAM", {"one_pass": True})}

PLANS = {
    # (models, epochs, {method: ρ sweep}, delayed start, batch size, extra trainer options)
    "cpu": {
        "models": ["mixer_128_4", "vit_128_4"],
        "epochs": 2,
        # νSAM's ρ is per matrix (the whole perturbation has Frobenius norm ρ·√#matrices), and at
        # 2 epochs 0.1 and 0.4 were far too large; 0.02 was added after those runs, as for SAM.
        # One-pass νSAM (nusam1p, experimental) was added after the study, at νSAM's best ρ of each
        # model and one other.
        "rhos": {"adamw": [0.0], "sam": [0.02, 0.05, 0.2], "samon": [0.5, 2.0], "nusam": [0.02, 0.1, 0.4],
                 "nusam1p": [0.005, 0.02]},
        # The ViT sweep leaves out the ρ that were far worst on the Mixer (to fit the 2-hour budget);
        # νSAM's 0.005 was added after 0.02 came out best, at the edge of the sweep.
        "rhos_per_model": {"vit_128_4": {"adamw": [0.0], "sam": [0.02, 0.05], "samon": [0.2, 0.5],
                                         "nusam": [0.005, 0.02, 0.1], "nusam1p": [0.005, 0.02]}},
        "start": 0.1,
        "seeds": [0, 1],
        "batch_size": 128,
        "precision": "32-true",
        "num_workers": 0,
    },
    "gpu": {
        "models": ["mixer_s4", "vit_s4"],
        "epochs": 300,
        "rhos": {"adamw": [0.0], "sam": [0.05, 0.1, 0.2], "samon": [0.5, 1.0, 2.0],
                 "nusam": [0.1, 0.2, 0.4, 0.8]},
        "start": 0.1,
        "seeds": [0, 1, 2],
        "batch_size": 128,
        "precision": "bf16-mixed",
        "num_workers": 8,
    },
    "smoke": {  # the whole pipeline (both phases, table, plot) in about a minute; not a result
        "models": ["mixer_32_2"],
        "epochs": 1,
        "rhos": {"adamw": [0.0], "nusam": [0.05, 0.2]},
        "start": 0.1,
        "seeds": [0, 1],
        "batch_size": 32,
        "precision": "32-true",
        "num_workers": 0,
        "subset": 256,
        "eval_subset": 128,
    },
    # Label noise: 40 % of the labels of a 5,000-image training subset replaced by another class,
    # no augmentation, so that AdamW memorises the noise within the budget (pilot, seed 0: 100 % of
    # the noisy labels fit by epoch 20-25, test accuracy falling from 36 % at epoch 10 to 26 %).
    "noise": {
        "models": ["mixer_128_p8"],
        "epochs": 30,
        "eval_every": 3,
        # Pilot (seed 0, 30 epochs): νSAM at ρ 0.5 per matrix did not train (10 %), at 0.1 it fit
        # 41 % of the noisy labels; SAM at 0.1 (a global radius) had fit 41 % by epoch 15 already.
        "rhos": {"adamw": [0.0], "sam": [0.05, 0.1, 0.2, 0.5], "samon": [0.5, 2.0],
                 "nusam": [0.05, 0.1, 0.2, 0.3], "nusam1p": [0.05, 0.1, 0.2]},
        "no_delay_run": False,  # the budget goes to the ρ sweeps and seeds instead
        "start": 0.1,
        "seeds": [0, 1],
        "batch_size": 128,
        "precision": "32-true",
        "num_workers": 0,
        "subset": 5000,
        "augment": False,
        "noise": 0.4,
    },
    "noise_smoke": {  # the label-noise pipeline in a minute (tests); not a result
        "models": ["mixer_32_2"],
        "epochs": 2,
        "eval_every": 2,
        "rhos": {"adamw": [0.0], "nusam": [0.1]},
        "start": 0.1,
        "seeds": [0],
        "batch_size": 32,
        "precision": "32-true",
        "num_workers": 0,
        "subset": 200,
        "eval_subset": 100,
        "augment": False,
        "noise": 0.4,
    },
}

FIELDS = ["run_id", "plan", "model", "method", "rho", "start_fraction", "seed", "epochs",
          "final_test_acc", "best_test_acc", "final_train_loss", "label_noise", "train_acc_clean",
          "train_acc_noisy_memorised", "train_acc_noisy_true", "wall_s", "peak_mib", "params",
          "device", "command"]


@dataclass(frozen=True)
class Run:
    plan: str
    model: str
    method: str
    rho: float
    start_fraction: float
    seed: int

    @property
    def run_id(self) -> str:
        return f"{self.model}-{self.method}-rho{self.rho:g}-start{self.start_fraction:g}-seed{self.seed}"


def read_rows(csv_path: Path) -> list[dict]:
    if not csv_path.is_file():
        return []
    with csv_path.open() as handle:
        return list(csv.DictReader(handle))


def best_rho(rows: list[dict], model: str, method: str, start: float) -> float | None:
    """ρ with the highest best-test accuracy among the seed-0 sweep runs (delayed start)."""
    sweep = [r for r in rows if r["model"] == model and r["method"] == method and int(r["seed"]) == 0
             and float(r["start_fraction"]) == start]
    if not sweep:
        return None
    return float(max(sweep, key=lambda r: float(r["best_test_acc"]))["rho"])


def planned_runs(plan_name: str, rows: list[dict]) -> list[Run]:
    """Phase 1: every ρ with seed 0 (+ νSAM without delay); phase 2: more seeds at the best ρ."""
    plan = PLANS[plan_name]
    runs: list[Run] = []
    for model in plan["models"]:
        sweeps = plan.get("rhos_per_model", {}).get(model, plan["rhos"])
        for method, rhos in sweeps.items():
            start = 0.0 if method == "adamw" else plan["start"]
            runs += [Run(plan_name, model, method, rho, start, plan["seeds"][0]) for rho in rhos]
        for method, rhos in sweeps.items():
            start = 0.0 if method == "adamw" else plan["start"]
            rho = rhos[0] if len(rhos) == 1 else best_rho(rows, model, method, start)
            if rho is not None:
                runs += [Run(plan_name, model, method, rho, start, seed) for seed in plan["seeds"][1:]]
        nusam_rho = best_rho(rows, model, "nusam", plan["start"])
        if nusam_rho is not None and plan.get("no_delay_run", True):  # the same ρ without the delay (Fig. 3)
            runs.append(Run(plan_name, model, "nusam", nusam_rho, 0.0, plan["seeds"][0]))
    return runs


# ---------------------------------------------------------------------------------- one run
def train(run: Run, data_dir: str, accelerator: str, max_epochs: int | None) -> dict:
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import Callback

    import lightning_nusam
    from lightning_nusam.data import CIFARDataModule
    from lightning_nusam.models import ImageClassifier

    plan = PLANS[run.plan]
    epochs = max_epochs or plan["epochs"]
    L.seed_everything(run.seed, verbose=False)
    model_name, kwargs, patch_size = MODELS[run.model]
    model = ImageClassifier(model_name, num_classes=10, img_size=32, patch_size=patch_size,
                            model_kwargs=kwargs, lr=1e-3, weight_decay=0.05, warmup_fraction=0.1,
                            label_smoothing=0.1)
    data = CIFARDataModule(npz_dir=data_dir, batch_size=plan["batch_size"], num_workers=plan["num_workers"],
                           seed=run.seed, eval_batch_size=500, subset=plan.get("subset"),
                           eval_subset=plan.get("eval_subset"), augment=plan.get("augment", True),
                           label_noise=plan.get("noise", 0.0), label_noise_seed=0)

    class History(Callback):
        def __init__(self) -> None:
            self.test_acc: list[float] = []
            self.train_loss: list[float] = []

        def on_validation_epoch_end(self, trainer, pl_module):
            if not trainer.sanity_checking:
                self.test_acc.append(float(trainer.callback_metrics["val/acc1"]))

        def on_train_epoch_end(self, trainer, pl_module):
            self.train_loss.append(float(trainer.callback_metrics["train/loss_epoch"]))

    history = History()
    callbacks: list[Callback] = [history]
    if run.method != "adamw":
        name, options = CALLBACKS[run.method]
        callbacks.append(getattr(lightning_nusam, name)(rho=run.rho, start_fraction=run.start_fraction,
                                                        **options))
    eval_every = plan.get("eval_every", 1)
    if epochs % eval_every:
        raise ValueError(f"plan {run.plan!r}: {epochs} epochs is not a multiple of eval_every={eval_every}")
    trainer = L.Trainer(max_epochs=epochs, accelerator=accelerator, devices=1, precision=plan["precision"],
                        callbacks=callbacks, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        check_val_every_n_epoch=eval_every)
    started = time.perf_counter()
    trainer.fit(model, datamodule=data)  # validation = the CIFAR-10 test set
    wall = time.perf_counter() - started
    cuda = torch.cuda.is_available() and accelerator != "cpu"
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    row = {
        "run_id": run.run_id, **{k: v for k, v in asdict(run).items()}, "epochs": epochs,
        "final_test_acc": history.test_acc[-1], "best_test_acc": max(history.test_acc),
        "final_train_loss": history.train_loss[-1], "wall_s": round(wall, 1), "peak_mib": round(peak),
        "params": sum(p.numel() for p in model.parameters()),
        "device": torch.cuda.get_device_name(0) if cuda else f"cpu ({torch.get_num_threads()} threads)",
    }
    if data.noisy_labels is not None:
        row.update(label_noise=plan["noise"], **memorisation(model, data))
    return row


def memorisation(model, data) -> dict[str, float]:
    """Accuracy on the training images (no augmentation): on the clean part, and on the noisy
    part against the labels trained on (memorised noise) and against the true labels."""
    from lightning_nusam.data import measure_noise_fit

    fit = measure_noise_fit(model, data.train_eval_dataloader(), data.noisy_labels)
    return {"train_acc_clean": fit.clean, "train_acc_noisy_memorised": fit.memorised,
            "train_acc_noisy_true": fit.true}


# ---------------------------------------------------------------------------------- report
def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{100 * values[0]:.2f}"
    return f"{100 * statistics.mean(values):.2f} ± {100 * statistics.stdev(values):.2f}"


def describe(plan: dict) -> str:
    """The training setup of a plan, in words, for the head of its table."""
    subset = plan.get("subset")
    data = f"a {subset:,}-image training subset" if subset else "the full training set"
    augment = "random crop + flip (no AutoAugment)" if plan.get("augment", True) else "no augmentation"
    text = (f"{plan['epochs']} epochs on {data}, batch {plan['batch_size']}, AdamW lr 1e-3 with 10% warm-up "
            f"then cosine, weight decay 0.05, label smoothing 0.1, {augment}. ")
    if plan.get("noise"):
        text += (f"{100 * plan['noise']:.0f} % of the training labels replaced by another class (symmetric "
                 "noise, the same labels in every run); the test set is clean. Train-set accuracies are "
                 "measured after the last epoch without augmentation: on the clean part, and on the noisy "
                 "part against the wrong labels (memorised) and against the true ones. ")
    evaluated = "every epoch" if plan.get("eval_every", 1) == 1 else f"every {plan['eval_every']} epochs"
    return text + (f"Test accuracy on the {'10,000' if not plan.get('eval_subset') else plan['eval_subset']} "
                   f"test images, evaluated {evaluated}: best and last evaluation, mean ± std over "
                   "seeds at each method's best ρ (chosen on seed 0).")


def report(plan_name: str, rows: list[dict], out: Path) -> str:
    plan = PLANS[plan_name]
    noise = bool(plan.get("noise"))
    header = ("| model | method | ρ | start | seeds | best test acc (%) | final test acc (%) | "
              + ("train acc, clean part (%) | noisy part memorised (%) | noisy part, true label (%) | "
                 if noise else "")
              + "final train loss | wall (min) | peak memory (MiB) |")
    lines = [f"# CIFAR-10 study, plan `{plan_name}`", "", describe(plan), "", header,
             "|" + "---|" * 4 + "---:|" * (header.count("|") - 5)]
    groups: dict[tuple, list[dict]] = {}
    order = {name: i for i, name in enumerate([*plan["models"], *plan["rhos"]])}
    for r in rows:
        key = (r["model"], r["method"], float(r["start_fraction"]), float(r["rho"]))
        groups.setdefault(key, []).append(r)
    for (model, method, start, rho), group in sorted(
        groups.items(), key=lambda item: (order.get(item[0][0], 99), order.get(item[0][1], 99), *item[0][2:])
    ):
        columns = ["best_test_acc", "final_test_acc"]
        if noise:
            columns += ["train_acc_clean", "train_acc_noisy_memorised", "train_acc_noisy_true"]
        lines.append(
            f"| {model} | {method} | {rho:g} | {start:g} | {len(group)} | "
            + "".join(f"{mean_std([float(r[c]) for r in group])} | " for c in columns)
            + f"{statistics.mean(float(r['final_train_loss']) for r in group):.3f} | "
            f"{statistics.mean(float(r['wall_s']) for r in group) / 60:.1f} | "
            f"{statistics.mean(float(r['peak_mib']) for r in group):.0f} |")
    lines += ["", "Commands (each reproduces one row of `runs.csv`):", ""]
    lines += [f"- `{r['command']}`" for r in rows]
    text = "\n".join(lines) + "\n"
    (out / "results.md").write_text(text)
    plot(plan_name, rows, out / "results.png")
    return text


COLORS = {"adamw": "tab:grey", "sam": "tab:blue", "samon": "tab:green", "nusam": "tab:orange",
          "nusam1p": "tab:red"}


def plot(plan_name: str, rows: list[dict], path: Path) -> None:
    """Per model: best test accuracy against ρ (and, with label noise, the memorised noise)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plan = PLANS[plan_name]
    metrics = [("best_test_acc", "best test accuracy (%)")]
    if plan.get("noise"):
        metrics.append(("train_acc_noisy_memorised", "noisy training labels fit (%)"))
    figure, axes = plt.subplots(len(metrics), len(plan["models"]), figsize=(6 * len(plan["models"]),
                                4 * len(metrics)), squeeze=False)
    for column, model in enumerate(plan["models"]):
        for row, (metric, label) in enumerate(metrics):
            plot_metric(axes[row][column], rows, plan, model, metric, label)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot_metric(axis, rows: list[dict], plan: dict, model: str, metric: str, label: str) -> None:
    for method in plan["rhos"]:
        delayed = [r for r in rows if r["model"] == model and r["method"] == method
                   and (method == "adamw" or float(r["start_fraction"]) > 0)]
        if not delayed:
            continue
        color = COLORS.get(method)
        rhos = sorted({float(r["rho"]) for r in delayed})
        means = [statistics.mean(float(r[metric]) for r in delayed if float(r["rho"]) == rho) for rho in rhos]
        if method == "adamw":
            axis.axhline(100 * means[0], color=color, linestyle="--", label="adamw")
            continue
        axis.plot(rhos, [100 * m for m in means], marker="o", color=color, label=method)
        for r in delayed:
            axis.scatter(float(r["rho"]), 100 * float(r[metric]), color=color, s=10, alpha=0.5)
        undelayed = [r for r in rows if r["model"] == model and r["method"] == method
                     and method != "adamw" and float(r["start_fraction"]) == 0]
        if undelayed:  # the same ρ from the first step (paper Figure 3)
            axis.scatter([float(r["rho"]) for r in undelayed], [100 * float(r[metric]) for r in undelayed],
                         marker="x", s=40, color=color, label=f"{method}, no delay")
    axis.set_xscale("log")
    axis.set_xlabel("ρ")
    axis.set_ylabel(label)
    axis.set_title(model)
    axis.grid(alpha=0.3)
    if axis.get_legend_handles_labels()[0]:
        axis.legend(fontsize=8)


# ---------------------------------------------------------------------------------- driver
def command_for(run: Run, args: argparse.Namespace) -> str:
    parts = ["python", "benchmarks/accuracy.py", "--plan", run.plan, "--only", run.run_id]
    if args.epochs:
        parts += ["--epochs", str(args.epochs)]
    if args.accelerator != "auto":
        parts += ["--accelerator", args.accelerator]
    if args.out is not None:
        parts += ["--out", str(args.out)]
    return shlex.join(parts)


def write_row(csv_path: Path, row: dict) -> None:
    """Append ``row`` to the CSV, or replace the row of the same run (a rerun with ``--only``)."""
    rows = [r for r in read_rows(csv_path) if r["run_id"] != row["run_id"]]
    rows.append({k: row.get(k, "") for k in FIELDS})
    partial = csv_path.with_suffix(".csv.partial")
    with partial.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    partial.replace(csv_path)  # atomic: an interrupted write never loses finished runs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plan", choices=sorted(PLANS), default="cpu")
    parser.add_argument("--data", default=os.environ.get("CIFAR10_NPZ", str(DEFAULT_DATA)),
                        help="folder with CIFAR-10 train.npz/test.npz")
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument("--epochs", type=int, default=None, help="override the plan's epochs")
    parser.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/accuracy_<plan>")
    parser.add_argument("--only", default=None, help="run (or rerun) this run id only")
    parser.add_argument("--max-runs", type=int, default=None, help="stop after this many new runs")
    parser.add_argument("--report", action="store_true", help="only rebuild the table and the plot")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:  # one run, in this fresh process
        run = Run(**json.loads(args.child))
        print(json.dumps(train(run, args.data, args.accelerator, args.epochs)))
        return

    out = args.out or ROOT / "results" / f"accuracy_{args.plan}"
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / "runs.csv"
    done = 0
    while not args.report:
        rows = read_rows(csv_path)
        planned = planned_runs(args.plan, rows)
        if args.only:
            pending = [r for r in planned if r.run_id == args.only]
            if not pending:
                raise SystemExit(f"--only {args.only}: not a run of plan {args.plan!r} (yet: the seeds of "
                                 "the second phase exist once the first phase has chosen ρ)")
        else:
            finished = {r["run_id"] for r in rows}
            pending = [r for r in planned if r.run_id not in finished]
        if not pending or (args.max_runs is not None and done >= args.max_runs):
            break
        run = pending[0]
        print(f"[{time.strftime('%H:%M:%S')}] {run.run_id}", flush=True)
        child = [sys.executable, str(Path(__file__).resolve()), "--plan", args.plan, "--data", args.data,
                 "--accelerator", args.accelerator, "--child", json.dumps(asdict(run))]
        if args.epochs:
            child += ["--epochs", str(args.epochs)]
        result = subprocess.run(child, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"{run.run_id} failed:\n{result.stderr[-4000:]}")
        row = json.loads(result.stdout.strip().splitlines()[-1])
        row["command"] = command_for(run, args)
        write_row(csv_path, row)
        print(f"    best {100 * row['best_test_acc']:.2f} %  final {100 * row['final_test_acc']:.2f} %  "
              f"{row['wall_s'] / 60:.1f} min", flush=True)
        done += 1
        if args.only:
            break
    rows = read_rows(csv_path)
    if rows:
        print(report(args.plan, rows, out))
    else:
        print("no finished runs yet")


if __name__ == "__main__":
    main()
