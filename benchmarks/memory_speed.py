"""Memory and speed of νSAM against AdamW, a two-pass floor and a peer SAM implementation.

One fresh process per (model, method) measures: the median time of a training step after
warm-up, the peak memory (CPU: peak RSS of the process; CUDA: ``max_memory_allocated``) and the
numbers the perturbation holds. The parent process collects the rows, computes the ratios of the
same run (method / AdamW, method / peer SAM, method / two passes without perturbation) and writes
a markdown table, a JSON file and a PNG chart under ``benchmarks/results/`` named by device.

    python benchmarks/memory_speed.py                   # quick: ViT-S/4 and Mixer-S/4 on CPU
    python benchmarks/memory_speed.py --full            # + ViT-B/4, Mixer-B/4, ViT-B/4 at batch 2
    python benchmarks/memory_speed.py --device cuda --precision bf16 --batch-size 128
    python benchmarks/memory_speed.py --accumulation    # ViT-B/4, micro-batch 2, k = 8
    python benchmarks/memory_speed.py --cheaper-steps   # every_n_steps=2 and one-pass νSAM

Methods: ``adamw`` (one pass), ``two_pass`` (two forward/backward passes, no perturbation: the
floor for any SAM), ``peer_sam`` (``pytorch_optimizer.SAM``), ``sam``, ``samon``, ``nusam_t1``,
``nusam_t5`` and ``nusam_norm`` (this package's perturbations), ``nusam_every2`` (νSAM on every
second step, plain steps between: its time is the mean over pairs of steps) and
``nusam_one_pass`` (the experimental one-pass νSAM: ε from the previous step's direction). All
use AdamW as the base optimizer and take their steps through the same ``StepEngine`` that the
Lightning integrations use (the peer through its own optimizer), so the differences are the
perturbations alone. ``--accumulate k`` runs every step over k micro-batches of the batch size:
the first pass over all of them, one perturbation, the second pass replaying them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

ROOT = Path(__file__).resolve().parent
METHODS = ["adamw", "two_pass", "peer_sam", "sam", "samon", "nusam_t1", "nusam_t5", "nusam_norm",
           "nusam_every2", "nusam_one_pass"]
DEFAULT_METHODS = METHODS[:8]
#: methods whose steps alternate (their time is a mean over pairs of steps, not a median)
ALTERNATING = {"nusam_every2"}
MODELS = {  # the paper's Table 6 architectures at 32x32, and a tiny ViT for smoke tests
    "vit_t4": ("vit_tiny_patch16_224", {"depth": 2}),
    "vit_s4": ("vit_small_patch16_224", {}),
    "vit_b4": ("vit_base_patch16_224", {}),
    "mixer_s4": ("timm.models.mlp_mixer.MlpMixer", {"num_blocks": 8, "embed_dim": 512}),
    "mixer_b4": ("timm.models.mlp_mixer.MlpMixer", {"num_blocks": 12, "embed_dim": 768}),
}
RHO = 0.05


# ------------------------------------------------------------------------------------- child
def build_model(name: str, device: str):
    from lightning_nusam.models import ImageClassifier

    model_name, kwargs = MODELS[name]
    classifier = ImageClassifier(model_name, num_classes=10, img_size=32, patch_size=4, model_kwargs=kwargs)
    return classifier.model.to(device)


def peak_memory_mib(device: str) -> float:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def make_step(method: str, model, micro_batches, precision: str, device: str):
    """A closure running one training step of ``method`` over the micro-batches (one, or k with
    accumulation); returns it and a function counting the numbers the perturbation holds."""
    import torch
    from torch import nn

    from lightning_nusam.engine import LossPasses, StepEngine, StepPlan
    from lightning_nusam.perturbations import (
        L2Perturbation,
        NormLayerPerturbation,
        NuclearNormalizedPerturbation,
        NuclearPerturbation,
    )

    device_type = "cuda" if device.startswith("cuda") else "cpu"

    def autocast():
        if precision == "bf16":
            return torch.autocast(device_type, dtype=torch.bfloat16)
        return nullcontext()

    def loss(batch, batch_idx):
        inputs, labels = batch
        with autocast():
            return nn.functional.cross_entropy(model(inputs), labels)

    def forward_backward():  # one pass: every micro-batch, each loss divided by k
        for index, batch in enumerate(micro_batches):
            (loss(batch, index) / len(micro_batches)).backward()

    synchronize = torch.cuda.synchronize if device_type == "cuda" else (lambda: None)
    perturbation_seconds: list[float] = []

    def timed(action, *args, **kwargs):
        synchronize()
        start = time.perf_counter()
        action(*args, **kwargs)
        synchronize()
        return time.perf_counter() - start

    if method == "peer_sam":
        from pytorch_optimizer import SAM

        optimizer = SAM(model.parameters(), torch.optim.AdamW, rho=RHO, lr=1e-4)
        held = {"numel": 0}
        first_step, second_step, base_step = optimizer.first_step, optimizer.second_step, None

        def closure():
            optimizer.zero_grad()
            # between first_step and second_step the peer holds a copy of every weight
            held["numel"] = sum(s["old_p"].numel() for s in optimizer.state.values() if "old_p" in s)
            forward_backward()

        def timed_first_step(zero_grad=False):
            perturbation_seconds.append(timed(first_step, zero_grad))

        def timed_second_step(zero_grad=False):
            # the restore part of second_step = second_step − the base optimizer's step
            nonlocal base_step
            base_step = 0.0
            total = timed(second_step, zero_grad)
            perturbation_seconds[-1] += total - base_step

        def timed_base_step(*args, **kwargs):
            nonlocal base_step
            synchronize()
            start = time.perf_counter()
            result = base_optimizer_step(*args, **kwargs)
            synchronize()
            base_step = time.perf_counter() - start
            return result

        base_optimizer_step = optimizer.base_optimizer.step
        optimizer.first_step, optimizer.second_step = timed_first_step, timed_second_step
        optimizer.base_optimizer.step = timed_base_step

        def peer_step():
            forward_backward()
            optimizer.step(closure)
            optimizer.zero_grad()

        peer_step.perturbation_seconds = perturbation_seconds
        return peer_step, lambda: held["numel"]

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    if method == "two_pass":  # the floor of any SAM: two passes, nothing in between
        def floor_step():
            forward_backward()
            optimizer.zero_grad()
            forward_backward()
            optimizer.step()
            optimizer.zero_grad()

        return floor_step, lambda: 0

    perturbation = {
        "sam": lambda: L2Perturbation(model, rho=RHO),
        "samon": lambda: NormLayerPerturbation(model, rho=RHO),
        "nusam_t1": lambda: NuclearPerturbation(model, rho=RHO, power_iterations=1),
        "nusam_t5": lambda: NuclearPerturbation(model, rho=RHO, power_iterations=5),
        "nusam_norm": lambda: NuclearNormalizedPerturbation(model, rho=RHO),
        "nusam_every2": lambda: NuclearPerturbation(model, rho=RHO),
        "nusam_one_pass": lambda: NuclearPerturbation(model, rho=RHO),
    }.get(method, lambda: None)()
    spent = [0.0]  # perturbation time of the step in progress
    def timing(original):
        def timed_call(*args, **kwargs):
            spent[0] += timed(original, *args, **kwargs)
        return timed_call

    if perturbation is not None:  # time what the perturbation does inside the engine's step
        for name in ("perturb", "restore", "apply", "estimate"):
            setattr(perturbation, name, timing(getattr(perturbation, name)))
    engine = StepEngine(model, perturbation)
    passes = LossPasses(loss, len(micro_batches))
    indexed = [(batch, index) for index, batch in enumerate(micro_batches)]
    count = {"steps": 0}

    def step():  # one optimizer step through the engine, as every way in takes it
        count["steps"] += 1
        spent[0] = 0.0
        if method == "adamw" or (method == "nusam_every2" and count["steps"] % 2 == 0):
            plan = StepPlan()  # one plain pass (nusam_every2: the plain step of each pair)
        elif method == "nusam_one_pass":  # ε from the last step's direction; one pass at w + ε
            plan = StepPlan(perturb=perturbation.has_direction, rho=RHO, one_pass=True, estimate=True)
        else:
            plan = None  # two passes at the perturbation's radius
        engine.step(passes, indexed, optimizer, plan)
        if perturbation is not None:
            perturbation_seconds.append(spent[0])

    step.perturbation_seconds = perturbation_seconds
    return step, (lambda: perturbation.held_numel() if perturbation is not None else 0)


def run_child(args: argparse.Namespace) -> dict:
    import torch

    torch.manual_seed(0)
    device = args.device
    model = build_model(args.model, device)
    step, held_numel = make_step(args.method, model, make_micro_batches(args), args.precision, device)
    synchronize = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    times = []
    for index in range(args.warmup + args.steps):
        synchronize()
        start = time.perf_counter()
        step()
        synchronize()
        if index >= args.warmup:
            times.append(time.perf_counter() - start)
    perturbation_seconds = getattr(step, "perturbation_seconds", [])[args.warmup :]
    return {
        "model": args.model,
        "method": args.method,
        "batch_size": args.batch_size,
        "accumulate": args.accumulate,
        "median_ms": 1000 * summary(args.method, times),
        "perturbation_ms": 1000 * statistics.median(perturbation_seconds) if perturbation_seconds else None,
        "step_ms": [1000 * t for t in times],
        "peak_mib": peak_memory_mib(device),
        "held_numel": held_numel(),
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def run_interleaved(args: argparse.Namespace) -> dict:
    """All methods on one model in one process, one step of each in turn: the step-time ratios
    then share memory layout, caches and machine load, which separate processes do not."""
    import torch

    torch.manual_seed(0)
    model = build_model(args.model, args.device)
    micro_batches = make_micro_batches(args)
    steps = {m: make_step(m, model, micro_batches, args.precision, args.device)[0] for m in args.methods}
    synchronize = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    times: dict[str, list[float]] = {m: [] for m in steps}
    for index in range(args.warmup + args.steps):
        for method, step in steps.items():
            synchronize()
            start = time.perf_counter()
            step()
            synchronize()
            if index >= args.warmup:
                times[method].append(time.perf_counter() - start)
    return {m: 1000 * summary(m, t) for m, t in times.items()}


def make_micro_batches(args: argparse.Namespace) -> list:
    """``args.accumulate`` micro-batches of ``args.batch_size`` random images and labels."""
    import torch

    generator = torch.Generator().manual_seed(0)
    return [(torch.randn(args.batch_size, 3, 32, 32, generator=generator).to(args.device),
             torch.randint(0, 10, (args.batch_size,), generator=generator).to(args.device))
            for _ in range(args.accumulate)]


def summary(method: str, seconds: list[float]) -> float:
    """Median step time; the mean for alternating methods (pairs of a perturbed and a plain step)."""
    return statistics.mean(seconds) if method in ALTERNATING else statistics.median(seconds)


def power_iteration_table(repeats: int = 20) -> str:
    """perturb() + restore() time of νSAM's batched ``bmm`` path vs the per-matrix loop.

    Shape groups like those of small Mixers (many equal small matrices) and of ViT-S (fewer,
    large ones). Timed in this process on synthetic gradients."""
    import torch
    from torch import nn

    from lightning_nusam.perturbations import NuclearPerturbation

    cases = {"96 × (16×16)": (96, 16, 16), "48 × (32×32)": (48, 32, 32), "24 × (64×64)": (24, 64, 64),
             "24 × (128×128)": (24, 128, 128), "24 × (256×128)": (24, 256, 128),
             "12 × (1536×384)": (12, 1536, 384)}
    lines = ["## νSAM power iteration: batched `bmm` vs per-matrix loop", "",
             "perturb() + restore() per step (median of "
             f"{repeats}), T = 1; `auto` (the default) batches matrices of at most 4,096 entries.", "",
             "| shapes | batched (ms) | loop (ms) | auto (ms) | batched / loop |",
             "|---|---:|---:|---:|---:|"]
    for label, (count, n, m) in cases.items():
        torch.manual_seed(0)
        model = nn.Sequential(*[nn.Linear(m, n, bias=False) for _ in range(count)])
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        medians = {}
        for batched in (True, False, "auto"):
            perturbation = NuclearPerturbation(model, rho=0.1, batched=batched)
            times = []
            for _ in range(repeats + 2):
                start = time.perf_counter()
                perturbation.perturb()
                perturbation.restore()
                times.append(time.perf_counter() - start)
            medians[batched] = 1000 * statistics.median(times[2:])
        lines.append(f"| {label} | {medians[True]:.2f} | {medians[False]:.2f} | {medians['auto']:.2f} | "
                     f"{medians[True] / medians[False]:.2f} |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------ parent
def child_environment(args: argparse.Namespace) -> dict[str, str]:
    """The memory-measuring children run with glibc's mmap threshold fixed: large freed tensors
    then go back to the OS at once, so peak RSS is the peak of live memory. With the default
    dynamic threshold, heap fragmentation moves peak RSS by up to ±3 % from run to run (the
    two-pass step without any perturbation measured +2.6 % over AdamW on Mixer-S/4)."""
    env = dict(os.environ)
    if args.mmap_threshold > 0 and not args.device.startswith("cuda"):
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
    return env


def measure(model: str, method: str, batch_size: int, args: argparse.Namespace) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--child", "--model", model, "--method", method,
               "--batch-size", str(batch_size), "--device", args.device, "--precision", args.precision,
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--accumulate", str(args.accumulate)]
    result = subprocess.run(command, capture_output=True, text=True, check=False, env=child_environment(args))
    if result.returncode != 0:
        raise RuntimeError(f"{model}/{method} failed:\n{result.stderr[-3000:]}")
    row = json.loads(result.stdout.strip().splitlines()[-1])
    print(f"  {model:9s} b={batch_size:<4d} {method:11s} {row['median_ms']:9.1f} ms  "
          f"{row['peak_mib']:8.0f} MiB  held {row['held_numel']:,}", flush=True)
    return row


def measure_interleaved(model: str, batch_size: int, args: argparse.Namespace) -> dict[str, float]:
    command = [sys.executable, str(Path(__file__).resolve()), "--child-interleaved", "--model", model,
               "--batch-size", str(batch_size), "--device", args.device, "--precision", args.precision,
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--accumulate", str(args.accumulate),
               "--methods", *args.methods]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{model} interleaved run failed:\n{result.stderr[-3000:]}")
    medians = json.loads(result.stdout.strip().splitlines()[-1])
    print(f"  {model:9s} b={batch_size:<4d} interleaved: " +
          ", ".join(f"{m} {t:.0f} ms" for m, t in medians.items()), flush=True)
    return medians


def add_ratios(rows: list[dict]) -> None:
    by_key = {(r["model"], r["batch_size"], r["method"]): r for r in rows}
    for row in rows:
        key = (row["model"], row["batch_size"])
        for reference, name in (("adamw", "x_adamw"), ("peer_sam", "x_peer"), ("two_pass", "x_two_pass")):
            ref = by_key.get((*key, reference))
            row[name] = row["median_ms"] / ref["median_ms"] if ref else float("nan")
            interleaved = row.get("interleaved_ms")
            ref_interleaved = ref.get("interleaved_ms") if ref else None
            row[f"{name}_interleaved"] = (
                interleaved / ref_interleaved if interleaved and ref_interleaved else float("nan")
            )
        adamw = by_key.get((*key, "adamw"))
        row["extra_mib_vs_adamw"] = row["peak_mib"] - adamw["peak_mib"] if adamw else float("nan")
        row["peak_vs_adamw"] = row["peak_mib"] / adamw["peak_mib"] if adamw else float("nan")


def markdown(rows: list[dict], args: argparse.Namespace, command: str, device_name: str) -> str:
    memory = "peak CUDA allocated" if args.device.startswith("cuda") else "peak RSS"
    lines = [
        f"# Memory and speed on {device_name} ({'fp32' if args.precision == '32' else 'bf16-mixed'})",
        "",
        f"Command: `{command}`",
        "",
        f"Medians of {args.steps} steps after {args.warmup} warm-up steps; AdamW base optimizer, "
        f"rho={RHO}. Step times come from one process running one step of each method in turn "
        "(the ratios then share memory layout, caches and load; separate processes differed by "
        "up to ±8 % here). Memory: " + memory + " of a fresh process per method"
        + (f" with MALLOC_MMAP_THRESHOLD_={args.mmap_threshold} (freed large tensors return to the OS, "
           "so the peak is that of live memory, not of heap fragmentation)"
           if args.mmap_threshold > 0 and not args.device.startswith("cuda") else "")
        + ". 'perturb + restore' is timed inside the step of the method's own process (for the peer: "
        "first_step + second_step − its base step); writes it leaves in the cache are paid "
        "later in the step.",
        "",
    ]
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["model"], row["batch_size"]), []).append(row)
    for (model, batch), group in groups.items():
        params, accumulate = group[0]["parameters"], group[0].get("accumulate", 1)
        batching = f"batch {batch}" if accumulate == 1 else (
            f"{accumulate} micro-batches of {batch} per optimizer step (times per optimizer step)")
        lines += [
            f"## {model}, {batching} ({params / 1e6:.1f} M parameters)",
            "",
            "| method | step (ms) | × AdamW | × peer SAM | × two-pass | perturb + restore (ms) "
            "| peak memory (MiB) | vs AdamW | perturbation holds |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in group:
            inner = r.get("perturbation_ms")
            inner_text = f"{inner:.1f}" if inner is not None else "–"
            lines.append(
                f"| {r['method']} | {r.get('interleaved_ms', float('nan')):.1f} | "
                f"{r['x_adamw_interleaved']:.3f} | {r['x_peer_interleaved']:.3f} | "
                f"{r['x_two_pass_interleaved']:.3f} | {inner_text} | {r['peak_mib']:.0f} | "
                f"{r['extra_mib_vs_adamw']:+.0f} ({100 * (r['peak_vs_adamw'] - 1):+.1f} %) | "
                f"{r['held_numel']:,} |"
            )
        lines.append("")
    return "\n".join(lines)


def chart(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["model"], row["batch_size"]), []).append(row)
    figure, axes = plt.subplots(2, len(groups), figsize=(4.2 * len(groups), 6.5), squeeze=False)
    for column, ((model, batch), group) in enumerate(groups.items()):
        names = [r["method"] for r in group]
        colors = ["tab:orange" if n.startswith("nusam") else "tab:grey" if n in ("adamw", "two_pass")
                  else "tab:blue" for n in names]
        axes[0][column].barh(names, [r.get("interleaved_ms") or r["median_ms"] for r in group], color=colors)
        axes[0][column].set_title(f"{model}, batch {batch}: step time (ms)")
        axes[1][column].barh(names, [r["peak_mib"] for r in group], color=colors)
        axes[1][column].set_title("peak memory (MiB)")
        low = min(r["peak_mib"] for r in group)
        axes[1][column].set_xlim(left=0.9 * low)
        for axis in (axes[0][column], axes[1][column]):
            axis.invert_yaxis()
            axis.grid(axis="x", alpha=0.3)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def device_label(device: str) -> tuple[str, str]:
    import torch

    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(0)
        return name, "cuda_" + name.lower().replace("nvidia ", "").replace(" ", "_")
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)", "cpu"


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=["32", "bf16"], default="32")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--models", nargs="+", default=None, choices=sorted(MODELS))
    parser.add_argument("--methods", nargs="+", default=None, choices=METHODS)
    parser.add_argument("--accumulate", type=int, default=1, help="micro-batches per optimizer step")
    parser.add_argument("--accumulation", action="store_true",
                        help="ViT-B/4, micro-batch 2, k = 8: AdamW, two passes, peer SAM, SAM, νSAM")
    parser.add_argument("--cheaper-steps", action="store_true",
                        help="Mixer-S/4: νSAM every step, every second step, one-pass, against AdamW")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--full", action="store_true",
                        help="all four models, plus ViT-B/4 at batch 2 (a memory-bound step)")
    parser.add_argument("--mmap-threshold", type=int, default=131072,
                        help="MALLOC_MMAP_THRESHOLD_ for the memory-measuring processes (0: glibc default)")
    parser.add_argument("--out", type=Path, default=ROOT / "results")
    parser.add_argument("--name", default=None,
                        help="file stem (default: memory_speed_<device>[_bf16][_full])")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--child-interleaved", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(run_child(args)))
        return []
    if args.child_interleaved:
        print(json.dumps(run_interleaved(args)))
        return []

    if args.accumulation:
        args.models, args.batch_size, args.accumulate = args.models or ["vit_b4"], 2, 8
        args.methods = args.methods or ["adamw", "two_pass", "peer_sam", "sam", "nusam_t1"]
    if args.cheaper_steps:
        args.models = args.models or ["mixer_s4"]
        args.methods = args.methods or ["adamw", "two_pass", "nusam_t1", "nusam_every2", "nusam_one_pass"]
        args.steps = max(args.steps, 6)  # pairs of steps for nusam_every2
    args.methods = args.methods or DEFAULT_METHODS
    paper_models = ["vit_s4", "vit_b4", "mixer_s4", "mixer_b4"]
    models = args.models or (paper_models if args.full else ["vit_s4", "mixer_s4"])
    plan = [(m, args.batch_size) for m in models]
    if args.full and args.models is None:
        plan.append(("vit_b4", 2))
    command = "python benchmarks/memory_speed.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    device_name, label = device_label(args.device)
    print(f"{command}\n{device_name}")
    rows = []
    for model, batch in plan:
        group = [measure(model, method, batch, args) for method in args.methods]
        interleaved = measure_interleaved(model, batch, args)
        for row in group:
            row["interleaved_ms"] = interleaved[row["method"]]
        rows += group
    add_ratios(rows)
    suffix = (f"{label}{'_bf16' if args.precision == 'bf16' else ''}{'_full' if args.full else ''}"
              f"{'_accumulation' if args.accumulation else ''}"
              f"{'_cheaper_steps' if args.cheaper_steps else ''}")
    stem = args.name or f"memory_speed_{suffix}"
    args.out.mkdir(parents=True, exist_ok=True)
    table = markdown(rows, args, command.strip(), device_name)
    if not args.device.startswith("cuda") and not (args.accumulation or args.cheaper_steps):
        table += "\n" + power_iteration_table()
    (args.out / f"{stem}.md").write_text(table + "\n")
    (args.out / f"{stem}.json").write_text(json.dumps(rows, indent=1) + "\n")
    precision = "fp32" if args.precision == "32" else "bf16-mixed"
    chart(rows, args.out / f"{stem}.png", f"{device_name}, {precision}")
    print("\n" + table)
    return rows


if __name__ == "__main__":
    main()
