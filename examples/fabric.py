"""νSAM in a Lightning Fabric loop: the step engine with Fabric's precision and DDP.

The task is the synthetic teacher of ``plain_pytorch.py`` (no download). The perturbation may be
built before or after ``fabric.setup``: it works on your module's parameters by their own names.
Run on the CPU::

    python examples/fabric.py                                  # one process, 32-true
    python examples/fabric.py --precision bf16-mixed
    python examples/fabric.py --precision bf16-true            # bf16 weights, restored exactly
    python examples/fabric.py --devices 2 --strategy ddp       # two processes over gloo
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from lightning.fabric import Fabric
from torch import nn

from lightning_nusam.fabric import fabric_engine, fabric_passes
from lightning_nusam.perturbations import NuclearPerturbation


def teacher_dataset(n: int, dim: int = 32, classes: int = 4, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Inputs ~ N(0, I) labelled by the argmax of a fixed random linear map."""
    generator = torch.Generator().manual_seed(seed)
    teacher = torch.randn(dim, classes, generator=generator)
    inputs = torch.randn(n, dim, generator=generator)
    return inputs, (inputs @ teacher).argmax(dim=1)


def make_model(seed: int = 0, dropout: float = 0.1) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Dropout(dropout), nn.Linear(64, 4))


TEST_SIZE = 2000


def train(fabric: Fabric, steps: int = 60, rho: float = 0.05, batch_size: int = 32, lr: float = 0.05,
          build_before_setup: bool = True, model: nn.Module | None = None) -> tuple[nn.Module, ...]:
    """νSAM with SGD for ``steps`` steps; each rank takes its share of every batch (as a
    DistributedSampler would). Returns the (Fabric) model and the step engine."""
    model = model if model is not None else make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    if build_before_setup:
        nusam = NuclearPerturbation(model, rho=rho)
        model, optimizer = fabric.setup(model, optimizer)
    else:
        model, optimizer = fabric.setup(model, optimizer)
        nusam = NuclearPerturbation(model, rho=rho)
    engine = fabric_engine(fabric, model, nusam)
    loss_fn = nn.CrossEntropyLoss()
    passes = fabric_passes(fabric, model, lambda batch, _: loss_fn(model(batch[0]), batch[1]))
    inputs, labels = teacher_dataset(steps * batch_size + TEST_SIZE)  # the last TEST_SIZE for testing
    rank, world = fabric.global_rank, fabric.world_size
    for step in range(steps):
        rows = slice(step * batch_size + rank, (step + 1) * batch_size, world)
        batch = (fabric.to_device(inputs[rows]), fabric.to_device(labels[rows]))
        engine.step(passes, [(batch, step)], optimizer)
    return model, engine


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed", "bf16-true"])
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--strategy", default="auto")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--save", type=Path, default=None, help="write each rank's weights here")
    args = parser.parse_args(argv)
    fabric = Fabric(accelerator="cpu", devices=args.devices, strategy=args.strategy, precision=args.precision)
    fabric.launch()
    torch.manual_seed(1)
    model, engine = train(fabric, steps=args.steps, model=make_model(dropout=args.dropout))
    nusam = engine.perturbation
    inputs, labels = (t[-TEST_SIZE:] for t in teacher_dataset(args.steps * 32 + TEST_SIZE))
    model.eval()
    with torch.no_grad():
        accuracy = (model(fabric.to_device(inputs)).argmax(1).cpu() == labels).float().mean().item()
    if args.save is not None:
        torch.save({"weights": [p.detach().float().cpu() for p in model.parameters()],
                    "names": nusam.parameter_names, "exact_restore": nusam.exact_restore,
                    "first_pass_without_all_reduce": engine.perturbation_reduces},
                   args.save / f"fabric_rank{fabric.global_rank}.pt")
    fabric.print(f"νSAM on {nusam.parameter_names} ({args.precision}, {fabric.world_size} process(es)): "
                 f"held {nusam.held_numel():,} numbers; test accuracy {accuracy:.3f}")
    return accuracy


if __name__ == "__main__":
    main()
