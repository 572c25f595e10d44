"""Kernels, bytes, host syncs and host time of one ``perturb()`` + ``restore()`` per method.

For timm ViT-S/16, ViT-B/16, Mixer-B/16 (``pretrained=False``) and BERT-base (a ``BertConfig``,
nothing downloaded), with every parameter given a random gradient, one ``perturb()`` +
``restore()`` of each method is run under :class:`dispatch_counts.DispatchCounter` (after one
untimed warm-up step, so that lazily allocated buffers are not counted). Beside them: one
``AdamW.step()`` (foreach and fused) and ``pytorch_optimizer.SAM``'s ``first_step()`` +
``second_step()`` (foreach, with a base optimizer that does nothing).

Precisions: ``fp32``; ``bf16-mixed`` (fp32 weights, perturb/restore called inside
``torch.autocast``, as the mixin and the callbacks may be); ``bf16`` (bf16 weights and gradients,
the exact restore of νSAM and GaussSAM).

The minimum bytes of a method, for ``N`` perturbed weights of ``w`` bytes and gradients of ``g``
bytes each (``T`` power iterations): νSAM ``2T·g + 4w`` (each matrix-vector product reads the
gradient, perturb and restore read and write the weight); SAM ``2g + 5w`` (the norm and the
update read the gradient; the update reads and writes the weight and writes the copy, the
restore reads the copy and writes the weight); ASAM ``2g + 7w`` (the norm and the update also
read the weight); GaussSAM ``4w`` (the noise drawn inside the kernels); AdamW ``g + 6·4`` (read
the weight and both fp32 moments, write them back).

Host time: the median CPU time of this thread (``time.thread_time``, so that other processes on
a shared machine do not count) of ``--repeats`` perturb+restore on a copy of each model with every width
divided by 16 (same parameters, matrices and shape groups, tiny arithmetic), so that what remains
is the host's work per launch.

``nusam_compiled`` (``NuclearPerturbation(execution="compiled")``, asked for with ``--methods``:
it compiles for tens of seconds per model and precision) runs inside ``torch.compile``'d
programs, which a dispatch mode cannot see into: its row has the host time on the ÷16 copy, the
seconds its first perturb+restore took (the compilation), and as ``kernels`` the number of
kernels inductor generated for its two programs on that copy (C++ loops on a CPU: how many a
GPU would launch is measured by ``make gpu-check``); no bytes or synchronisations.

Usage::

    python benchmarks/counting.py --label after            # all models, writes benchmarks/results/
    python benchmarks/counting.py --models vit_s --label quick --no-host
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dispatch_counts import DispatchCounter
from lightning_nusam.perturbations import (
    GaussianPerturbation,
    L2Perturbation,
    NuclearNormalizedPerturbation,
    NuclearPerturbation,
)

RESULTS = Path(__file__).resolve().parent / "results"

METHODS: dict[str, tuple[Callable[..., object], dict]] = {
    "nusam": (NuclearPerturbation, {}),
    "nusam_batched": (NuclearPerturbation, {"batched": True}),
    "nusam_norm": (NuclearNormalizedPerturbation, {}),
    "sam": (L2Perturbation, {}),
    "asam": (L2Perturbation, {"adaptive": True}),
    "gausssam": (GaussianPerturbation, {}),
}
#: Measured on the ÷16 copy only (see the module docstring); not run unless asked for.
COMPILED_METHODS: dict[str, tuple[Callable[..., object], dict]] = {
    "nusam_compiled": (NuclearPerturbation, {"execution": "compiled"}),
}
PRECISIONS = ("fp32", "bf16-mixed", "bf16")


def build(name: str, shrink: int = 1) -> nn.Module:
    """One of the four models, with every width divided by ``shrink``."""
    import timm

    if name == "vit_s":
        return timm.create_model("vit_small_patch16_224", pretrained=False, embed_dim=384 // shrink)
    if name == "vit_b":
        return timm.create_model("vit_base_patch16_224", pretrained=False, embed_dim=768 // shrink)
    if name == "mixer_b":  # mixer_b16_224's configuration
        from timm.models.mlp_mixer import MlpMixer

        return MlpMixer(patch_size=16, num_blocks=12, embed_dim=768 // shrink)
    if name == "bert":
        from transformers import BertConfig, BertModel

        config = BertConfig(hidden_size=768 // shrink, intermediate_size=3072 // shrink)
        return BertModel(config)
    raise ValueError(f"unknown model {name!r}")


def give_gradients(model: nn.Module) -> None:
    generator = torch.Generator().manual_seed(0)
    for p in model.parameters():
        p.grad = (torch.randn(p.shape, generator=generator) * 1e-3).to(p.dtype)


def minimum_bytes(method: str, parameters: list[torch.Tensor], iterations: int = 1) -> int:
    total = 0
    for p in parameters:
        w, g, n = p.element_size(), p.grad.element_size(), p.numel()
        total += n * {"nusam": 2 * iterations * g + 4 * w, "nusam_batched": 2 * iterations * g + 4 * w,
                      "nusam_norm": 2 * iterations * g + 4 * w, "sam": 2 * g + 5 * w,
                      "asam": 2 * g + 7 * w, "gausssam": 4 * w, "peer_sam": 2 * g + 5 * w,
                      "adamw_foreach": g + 24, "adamw_fused": g + 24}[method]
    return total


def precision_context(precision: str) -> contextlib.AbstractContextManager:
    if precision == "bf16-mixed":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def count(run: Callable[[], None], precision: str) -> DispatchCounter:
    with precision_context(precision):
        run()  # warm-up: lazily allocated state
        with DispatchCounter() as counter:
            run()
    return counter


def host_us(run: Callable[[], None], precision: str, repeats: int) -> float:
    with precision_context(precision):
        for _ in range(3):
            run()
        times = []
        for _ in range(repeats):
            start = time.thread_time()
            run()
            times.append(time.thread_time() - start)
    return statistics.median(times) * 1e6


def perturbation_run(model: nn.Module, method: str) -> tuple[Callable[[], None], list[torch.Tensor]]:
    cls, options = {**METHODS, **COMPILED_METHODS}[method]
    perturbation = cls(model, rho=0.05, **options)

    def run() -> None:
        perturbation.perturb()
        perturbation.restore()

    return run, list(perturbation.parameters)


def peer_runs(model: nn.Module) -> dict[str, tuple[Callable[[], None], list[torch.Tensor]]]:
    from pytorch_optimizer import SAM

    class NoStep(torch.optim.Optimizer):
        def __init__(self, params, **kw):
            super().__init__(params, {})

        def step(self, closure=None):
            return None

    parameters = [p for p in model.parameters() if p.grad is not None]
    peer = SAM(parameters, NoStep, rho=0.05, foreach=True)

    def peer_run() -> None:
        peer.first_step()
        peer.second_step()

    runs = {"peer_sam": (peer_run, parameters)}
    for kind in ("foreach", "fused"):
        optimizer = torch.optim.AdamW(parameters, lr=0.0, **{kind: True})
        runs[f"adamw_{kind}"] = (optimizer.step, parameters)
    return runs


def compiled_row(small: nn.Module, name: str, method: str, precision: str, repeats: int) -> dict:
    """A compiled method on the ÷16 copy: the kernels inductor generates for its programs (its
    caches off, so that it generates them), the time of the first (compiling) call, host µs."""
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config
    from torch._inductor import metrics

    run, parameters = perturbation_run(small, method)
    metrics.reset()
    start = time.perf_counter()
    with inductor_config.patch(fx_graph_cache=False), functorch_config.patch(enable_autograd_cache=False), \
            precision_context(precision):
        run()
    return {"model": name, "method": method, "precision": precision, "compiled": True,
            "kernels": metrics.generated_kernel_count, "compile_s": time.perf_counter() - start,
            "host_us": host_us(run, precision, repeats), "parameters": len(parameters)}


def measure_model(name: str, methods: list[str], precisions: list[str], repeats: int,
                  with_host: bool) -> list[dict]:
    rows = []
    compiled = [method for method in methods if method in COMPILED_METHODS]
    methods = [method for method in methods if method not in COMPILED_METHODS]
    for precision in precisions:
        model = build(name)
        if precision == "bf16":
            model = model.to(torch.bfloat16)
        give_gradients(model)
        small = None
        if with_host:
            small = build(name, shrink=16)
            if precision == "bf16":
                small = small.to(torch.bfloat16)
            give_gradients(small)
        runs = {method: perturbation_run(model, method) for method in methods}
        small_runs = {method: perturbation_run(small, method)[0] for method in methods} if small else {}
        if precision == "fp32":
            runs.update(peer_runs(model))
            if small is not None:
                small_runs.update({k: v[0] for k, v in peer_runs(small).items()})
        for method, (run, parameters) in runs.items():
            try:
                counter = count(run, precision)
            except Exception as error:
                rows.append({"model": name, "method": method, "precision": precision,
                             "error": f"{type(error).__name__}: {str(error)[:120]}"})
                print(f"{name:8s} {method:14s} {precision:10s} FAILS: {rows[-1]['error']}", flush=True)
                continue
            minimum = minimum_bytes(method, parameters)
            row = {"model": name, "method": method, "precision": precision,
                   "kernels": counter.kernels, "syncs": counter.syncs, "bytes": counter.bytes,
                   "minimum_bytes": minimum, "bytes_over_minimum": counter.bytes / minimum,
                   "sync_sources": dict(counter.sync_sources), "ops": dict(counter.ops),
                   "parameters": len(parameters), "weights": sum(p.numel() for p in parameters)}
            if method in small_runs:
                row["host_us"] = host_us(small_runs[method], precision, repeats)
            rows.append(row)
            print(f"{name:8s} {method:14s} {precision:10s} kernels {row['kernels']:5d} syncs "
                  f"{row['syncs']:4d} {row['bytes'] / 1e9:6.2f} GB ({row['bytes_over_minimum']:.2f}x) "
                  f"host {row.get('host_us', float('nan')):8.0f} us", flush=True)
        for method in compiled if small is not None else ():
            try:
                row = compiled_row(small, name, method, precision, repeats)
            except Exception as error:
                row = {"model": name, "method": method, "precision": precision,
                       "error": f"{type(error).__name__}: {str(error)[:120]}"}
            rows.append(row)
            shown = row["error"] if "error" in row else (
                f"kernels {row['kernels']:5d} (generated; compiled in {row['compile_s']:.0f} s) "
                f"host {row['host_us']:8.0f} us")
            print(f"{name:8s} {method:14s} {precision:10s} {shown}", flush=True)
        del runs, small_runs, model, small
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| model | method | precision | kernels | host syncs | bytes (GB) | × minimum "
             "| host µs (÷16 copy) | syncs at |",
             "|---|---|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['method']} | {r['precision']} | fails: {r['error']} ||||||")
            continue
        if r.get("compiled"):
            lines.append(f"| {r['model']} | {r['method']} | {r['precision']} | {r['kernels']:,} generated "
                         f"| – | – | – | {r['host_us']:,.0f} | compiled in {r['compile_s']:.0f} s |")
            continue
        sources = "; ".join(f"{n}× {s.split(' at ')[1].split(' ')[0].split('/')[-1]}"
                            for s, n in sorted(r["sync_sources"].items(), key=lambda kv: -kv[1])[:2])
        host = f"{r['host_us']:,.0f}" if "host_us" in r else ""
        lines.append(f"| {r['model']} | {r['method']} | {r['precision']} | {r['kernels']:,} | {r['syncs']} | "
                     f"{r['bytes'] / 1e9:.2f} | {r['bytes_over_minimum']:.2f} | {host} | {sources} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["vit_s", "vit_b", "mixer_b", "bert"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS),
                        choices=[*METHODS, *COMPILED_METHODS])
    parser.add_argument("--precisions", nargs="+", default=list(PRECISIONS))
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--no-host", action="store_true", help="skip the host time")
    parser.add_argument("--label", default="cpu")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for name in args.models:
        rows += measure_model(name, args.methods, args.precisions, args.repeats, not args.no_host)
    text = table(rows)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"counting_{args.label}.json").write_text(json.dumps(rows, indent=1))
    (args.out / f"counting_{args.label}.md").write_text(
        f"`python benchmarks/counting.py --label {args.label}` "
        f"(torch {torch.__version__}, CPU, one thread)\n\n"
        + text + "\n")
    return rows


if __name__ == "__main__":
    main()
