"""What a data-parallel step sends: bytes and time per optimizer step on two CPU processes (gloo).

Per model and method, two fresh processes train a few steps of the paper's CIFAR architectures
(32×32 images, patch 4) under DDP, every step through the same ``StepEngine`` the Lightning
integrations use, and this script reports the bytes sent on the loopback per optimizer step (both
ranks together, TCP/IP headers included) and the median step time, for a link that is unlimited
and limited to 10 Gbit/s and 1 Gbit/s. Methods:

- ``adamw``: one pass, one gradient all-reduce (the floor);
- ``sam``: SAM; its ε needs the whole averaged gradient, so both passes all-reduce it;
- ``nusam_gradients``: νSAM with ``first_pass_reduction="gradients"`` (both passes all-reduce
  the gradient, as before this option existed);
- ``nusam_vectors``: νSAM as it runs by default: the first pass without the gradient all-reduce,
  the power iteration averaging its products (Σ(n+m) numbers per iteration);
- ``msam``: m-SAM (``sync_first_pass=False``): each rank its own ε, one all-reduce.

The link is shaped without touching the host: each link runs in a private network namespace
(``unshare --net``) whose loopback is limited with ``tc qdisc ... tbf``, and the bytes are read
from its ``/proc/net/dev``. Where namespaces are not available (not root, no ``unshare``/``tc``),
the unlimited link runs on the host's loopback (other traffic there is counted too) and the
shaped rows are skipped with a message.

    python benchmarks/ddp_communication.py                       # Mixer-S/4 and ViT-S/4, 3 links
    python benchmarks/ddp_communication.py --models vit_t4 --links unlimited --steps 1
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
METHODS = ["adamw", "sam", "nusam_gradients", "nusam_vectors", "msam"]
LINKS = {"unlimited": None, "10gbit": "10gbit", "1gbit": "1gbit"}
RHO = 0.05


# ------------------------------------------------------------------------------------- workers
def loopback_bytes() -> int:
    """Bytes sent on ``lo`` so far (its TX counter in ``/proc/net/dev``)."""
    for line in Path("/proc/net/dev").read_text().splitlines():
        name, _, counters = line.partition(":")
        if name.strip() == "lo":
            return int(counters.split()[8])
    raise RuntimeError("no loopback interface in /proc/net/dev")


def worker(rank: int, args: argparse.Namespace, port: int, results: dict) -> None:
    """One rank: DDP over gloo, ``warmup + steps`` optimizer steps of ``args.method``."""
    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel

    from lightning_nusam.engine import LossPasses, StepEngine
    from lightning_nusam.perturbations import L2Perturbation, NuclearPerturbation

    sys.path.insert(0, str(ROOT))
    from memory_speed import build_model

    torch.set_num_threads(1)  # two ranks on two cores
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = build_model(args.model, "cpu")
    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    method = args.method
    perturbation = None
    if method == "sam":
        perturbation = L2Perturbation(model, rho=RHO)
    elif method != "adamw":
        perturbation = NuclearPerturbation(model, rho=RHO)
    engine = StepEngine(model, perturbation, sync_first_pass=method != "msam",
                        first_pass_reduction="gradients" if method == "nusam_gradients" else "auto",
                        replicas=dist.group.WORLD)
    generator = torch.Generator().manual_seed(rank)
    batch = (torch.randn(args.batch_size, 3, 32, 32, generator=generator),
             torch.randint(0, 10, (args.batch_size,), generator=generator))
    passes = LossPasses(lambda b, _: nn.functional.cross_entropy(ddp(b[0]), b[1]), no_sync=ddp.no_sync)
    times, sent = [], 0
    for index in range(args.warmup + args.steps):
        dist.barrier()
        before, start = loopback_bytes(), time.perf_counter()
        engine.step(passes, [(batch, index)], optimizer)
        elapsed = time.perf_counter() - start
        dist.barrier()
        if index >= args.warmup:
            times.append(elapsed)
            sent += loopback_bytes() - before
    if rank == 0:
        parameters = sum(p.numel() for p in model.parameters())
        results.update(step_ms=[1000 * t for t in times], median_ms=1000 * statistics.median(times),
                       bytes_per_step=sent / args.steps, parameters=parameters,
                       vectors_per_iteration=sum(sum(p.shape) for p in perturbation.parameters)
                       if isinstance(perturbation, NuclearPerturbation) else 0)
    dist.destroy_process_group()


def run_config(args: argparse.Namespace, port: int) -> dict:
    """Both ranks of one (model, method), in this process's network namespace."""
    import torch.multiprocessing as mp

    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(worker, args=(args, port, results), nprocs=2, join=True)
        return dict(results)


def run_link(args: argparse.Namespace) -> list[dict]:
    """Every (model, method) on the link this process sees; rows as JSON on stdout's last line."""
    rows = []
    for index, (model, method) in enumerate((m, k) for m in args.models for k in args.methods):
        config = argparse.Namespace(**{**vars(args), "model": model, "method": method})
        row = {"link": args.link, "model": model, "method": method, "batch_size": args.batch_size,
               **run_config(config, 29400 + index)}
        print(f"  {args.link:9s} {model:9s} {method:16s} {row['bytes_per_step'] / 1e6:9.2f} MB/step "
              f"{row['median_ms']:9.1f} ms", file=sys.stderr, flush=True)
        rows.append(row)
    print(json.dumps(rows))
    return rows


# ------------------------------------------------------------------------------------- parent
def namespaces_available() -> str | None:
    """None if links can be shaped in a private network namespace here, else why not."""
    missing = [tool for tool in ("unshare", "ip", "tc") if shutil.which(tool) is None]
    if missing:
        return f"{', '.join(missing)} not found"
    probe = subprocess.run(["unshare", "--net", "sh", "-c", "ip link set lo up && tc qdisc show dev lo"],
                           capture_output=True, text=True)
    return None if probe.returncode == 0 else (probe.stderr.strip() or "unshare --net failed")


def child_command(args: argparse.Namespace, link: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--child", "--link", link,
            "--models", *args.models, "--methods", *args.methods, "--steps", str(args.steps),
            "--warmup", str(args.warmup), "--batch-size", str(args.batch_size)]


def measure(args: argparse.Namespace) -> tuple[list[dict], list[str]]:
    rows, notes = [], []
    unavailable = namespaces_available()
    for link in args.links:
        command = shlex.join(child_command(args, link))
        if unavailable is None:
            shaping = "" if LINKS[link] is None else \
                f"tc qdisc add dev lo root tbf rate {LINKS[link]} burst 1mb latency 100ms && "
            command = ["unshare", "--net", "sh", "-c", f"ip link set lo up && {shaping}{command}"]
        elif LINKS[link] is None:
            notes.append(f"no private network namespace here ({unavailable}): the unlimited link ran on the "
                         "host's loopback, whose other traffic is counted too")
            command = child_command(args, link)
        else:
            notes.append(f"{link}: skipped, the link cannot be shaped here ({unavailable})")
            print(notes[-1], file=sys.stderr)
            continue
        print(f"link {link}:", file=sys.stderr, flush=True)
        done = subprocess.run(command, capture_output=True, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        sys.stderr.write(done.stderr[-4000:] if done.returncode else done.stderr)
        if done.returncode != 0:
            raise SystemExit(f"link {link} failed (exit {done.returncode})")
        rows += json.loads(done.stdout.strip().splitlines()[-1])
    return rows, notes


def report(rows: list[dict], notes: list[str], args: argparse.Namespace) -> str:
    lines = [f"# DDP communication per optimizer step: 2 CPU processes, gloo (batch {args.batch_size} "
             "per rank)", "", f"Command: `python benchmarks/ddp_communication.py {' '.join(args.argv)}`",
             "", f"Median of {args.steps} steps after {args.warmup} warm-up steps; bytes: sent on the "
             "loopback per step, both ranks, TCP/IP headers included; AdamW base optimizer, ρ = 0.05, T = 1. "
             "Every step goes through `StepEngine`.", ""]
    lines += [f"Note: {note}" for note in notes] + ([""] if notes else [])
    for model in args.models:
        model_rows = [r for r in rows if r["model"] == model]
        if not model_rows:
            continue
        parameters = model_rows[0]["parameters"]
        vectors = max(r["vectors_per_iteration"] for r in model_rows)
        lines += [f"## {model} ({parameters / 1e6:.1f} M parameters; νSAM's vectors: {vectors:,} numbers per "
                  "iteration)", "",
                  "| link | method | MB per step | × AdamW | step (ms) | × AdamW | × m-SAM |",
                  "|---|---|---:|---:|---:|---:|---:|"]
        for link in args.links:
            by_method = {r["method"]: r for r in model_rows if r["link"] == link}
            if not by_method:
                continue
            adamw, msam = by_method.get("adamw"), by_method.get("msam")
            for method in args.methods:
                row = by_method.get(method)
                if row is None:
                    continue
                bytes_ratio = row["bytes_per_step"] / adamw["bytes_per_step"] if adamw else float("nan")
                time_ratio = row["median_ms"] / adamw["median_ms"] if adamw else float("nan")
                msam_ratio = row["median_ms"] / msam["median_ms"] if msam else float("nan")
                lines.append(f"| {link} | {method} | {row['bytes_per_step'] / 1e6:.2f} | {bytes_ratio:.3f} | "
                             f"{row['median_ms']:.0f} | {time_ratio:.2f} | {msam_ratio:.2f} |")
        lines.append("")
    return "\n".join(lines)


def plot(rows: list[dict], args: argparse.Namespace, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, len(args.models), figsize=(6 * len(args.models), 7), squeeze=False)
    width = 0.8 / len(args.methods)
    for column, model in enumerate(args.models):
        for position, method in enumerate(args.methods):
            picked = [next((r for r in rows if (r["model"], r["link"], r["method"]) == (model, link, method)),
                           None) for link in args.links]
            offsets = [i + position * width for i in range(len(args.links))]
            axes[0][column].bar(offsets, [r["bytes_per_step"] / 1e6 if r else 0 for r in picked], width,
                                label=method)
            axes[1][column].bar(offsets, [r["median_ms"] / 1000 if r else 0 for r in picked], width,
                                label=method)
        for row, ylabel in ((0, "MB sent per step"), (1, "step time (s)")):
            axis = axes[row][column]
            axis.set_xticks([i + 0.4 - width / 2 for i in range(len(args.links))], args.links)
            axis.set_ylabel(ylabel)
            axis.set_title(model)
    handles, labels = axes[0][0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=len(args.methods), fontsize=9)
    figure.suptitle("DDP, 2 CPU processes: bytes and time per optimizer step")
    figure.tight_layout(rect=(0, 0.05, 1, 1))
    figure.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mixer_s4", "vit_s4"])
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--links", nargs="+", default=list(LINKS), choices=list(LINKS))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", type=Path, default=ROOT / "results")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--link", default="unlimited", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv
    if args.child:
        run_link(args)
        return
    rows, notes = measure(args)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / "ddp_communication_cpu"
    stem.with_suffix(".json").write_text(json.dumps({"rows": rows, "notes": notes}, indent=2))
    table = report(rows, notes, args)
    stem.with_suffix(".md").write_text(table + "\n")
    if rows:
        plot(rows, args, stem.with_suffix(".png"))
    print(table)


if __name__ == "__main__":
    main()
