"""What the exact restore of bf16/fp16 weights costs: memory held and time per perturb/restore.

νSAM on bf16 weights would otherwise drift (``round(round(w + ε) − ε) ≠ w`` for a few entries
each step). The exact restore keeps, while ``ε`` is applied, the positions (int32) and original
values (bf16) of just those entries. This script trains a bf16 ViT-S/4 for a few steps and
reports, per step: the entries kept and their bytes against the weights', and the time of
``perturb() + restore()`` with the exact restore and with a plain subtraction, interleaved in
one process, beside the time of one forward/backward pass.

    python benchmarks/low_precision_restore.py [--steps 6] [--batch-size 32] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import timm
import torch
from torch import nn

from lightning_nusam.perturbations import NuclearPerturbation


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rho", type=float, default=0.1)
    parser.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)

    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", img_size=32, patch_size=4, num_classes=10).to(dtype)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    exact = NuclearPerturbation(model, rho=args.rho)
    naive = NuclearPerturbation(model, rho=args.rho, exact_restore=False)
    assert exact.exact_restore and not naive.exact_restore
    images = torch.randn(args.batch_size, 3, 32, 32, dtype=dtype)
    labels = torch.randint(0, 10, (args.batch_size,))
    weights = sum(p.numel() for p in exact.parameters)
    vectors = naive.held_numel()

    rows, times = [], {"exact": [], "naive": [], "pass": []}
    for step in range(args.steps):
        optimizer.zero_grad(set_to_none=True)
        started = time.perf_counter()
        nn.functional.cross_entropy(model(images).float(), labels).backward()
        times["pass"].append(time.perf_counter() - started)
        for name, perturbation in (("exact", exact), ("naive", naive)) if step % 2 else (
                ("naive", naive), ("exact", exact)):
            before = [p.detach().clone() for p in perturbation.parameters]
            started = time.perf_counter()
            perturbation.perturb()
            held = perturbation.held_numel()
            perturbation.restore()
            times[name].append(time.perf_counter() - started)
            if name == "exact":
                exceptions = (held - vectors) // 2  # a position and a value per entry kept
                assert all(torch.equal(p, b) for p, b in zip(perturbation.parameters, before, strict=True))
            else:
                drift = sum(int((p != b).sum()) for p, b in zip(perturbation.parameters, before, strict=True))
                for p, b in zip(perturbation.parameters, before, strict=True):
                    p.data.copy_(b)  # undo the drift so both see the same weights
        rows.append((step, exceptions, drift))
        optimizer.step()

    element = torch.finfo(dtype).bits // 8
    exception_bytes = [e * (4 + element) for _, e, _ in rows]  # int32 position + the original value
    lines = [
        f"# Exact restore of {args.dtype} weights: ViT-S/4, batch {args.batch_size}, ρ = {args.rho}",
        "",
        f"{weights:,} perturbed weights ({weights * element / 2**20:.1f} MiB); νSAM's vectors u, v: "
        f"{vectors:,} numbers. Per step (CPU, {torch.get_num_threads()} threads):",
        "",
        "| step | entries kept (exact) | kept / weights | kept bytes | entries a subtraction would change |",
        "|---:|---:|---:|---:|---:|",
    ]
    for (step, exceptions, drift), size in zip(rows, exception_bytes, strict=True):
        lines.append(f"| {step} | {exceptions:,} | {100 * exceptions / weights:.3f} % | "
                     f"{size / 2**10:.0f} KiB | {drift:,} |")
    exact_ms = 1000 * statistics.median(times["exact"])
    naive_ms = 1000 * statistics.median(times["naive"])
    pass_ms = 1000 * statistics.median(times["pass"])
    lines += [
        "",
        f"perturb + restore, median: exact {exact_ms:.1f} ms, plain subtraction {naive_ms:.1f} ms "
        f"(+{exact_ms - naive_ms:.1f} ms, {exact_ms / naive_ms:.2f}×); one forward/backward pass "
        f"{pass_ms:.0f} ms, so the exact restore adds {100 * (exact_ms - naive_ms) / (2 * pass_ms):.2f} % "
        "to a two-pass step.",
        f"Largest memory kept: {max(exception_bytes) / 2**10:.0f} KiB "
        f"({100 * max(exception_bytes) / (weights * element):.3f} % of the weights' bytes).",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out is not None:
        args.out.write_text(text)
    return text


if __name__ == "__main__":
    main()
