"""νSAM in a plain PyTorch training loop: no Lightning, the step engine over the core.

Each step is ``StepEngine.step``: the first pass at ``w``, ``perturb()`` (``w ← w + ρ u vᵀ`` for
every weight matrix), the second pass at ``w + ε`` with the first pass's random draws,
``restore()`` and the AdamW step on the second-pass gradients. The task is synthetic (a random
linear teacher labels Gaussian inputs), so the script needs no data download. Run:
``python examples/plain_pytorch.py``.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from lightning_nusam.engine import LossPasses, StepEngine
from lightning_nusam.perturbations import NuclearPerturbation


def teacher_dataset(n: int, dim: int = 32, classes: int = 4, seed: int = 0):
    """Inputs ~ N(0, I) labelled by the argmax of a fixed random linear map."""
    generator = torch.Generator().manual_seed(seed)
    teacher = torch.randn(dim, classes, generator=generator)
    inputs = torch.randn(n, dim, generator=generator)
    labels = (inputs @ teacher).argmax(dim=1)
    return inputs, labels


def train(epochs: int = 15, rho: float = 0.05, seed: int = 0) -> tuple[float, float]:
    """Train a student MLP with AdamW + νSAM; return (train accuracy, test accuracy)."""
    torch.manual_seed(seed)
    inputs, labels = teacher_dataset(12000, seed=seed)
    (train_x, test_x), (train_y, test_y) = inputs.split([10000, 2000]), labels.split([10000, 2000])
    model = nn.Sequential(nn.Linear(32, 128), nn.GELU(), nn.Linear(128, 128), nn.GELU(), nn.Linear(128, 4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.05)
    nusam = NuclearPerturbation(model, rho=rho)
    engine = StepEngine(model, nusam)
    loss_fn = nn.CrossEntropyLoss()
    passes = LossPasses(lambda batch, index: loss_fn(model(batch[0]), batch[1]))
    batches = [(x, y) for x, y in zip(train_x.split(200), train_y.split(200), strict=True)]

    for _ in range(epochs):
        for index, batch in enumerate(batches):
            engine.step(passes, [(batch, index)], optimizer)  # two passes, perturb, restore, step

    with torch.no_grad():
        train_accuracy = (model(train_x).argmax(1) == train_y).float().mean().item()
        test_accuracy = (model(test_x).argmax(1) == test_y).float().mean().item()
    print(f"νSAM held {nusam.held_numel():,} numbers; SAM would copy {nusam.perturbed_numel():,}")
    print(f"train accuracy {train_accuracy:.3f}, test accuracy {test_accuracy:.3f}")
    return train_accuracy, test_accuracy


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--rho", type=float, default=0.05)
    args = parser.parse_args()
    train(epochs=args.epochs, rho=args.rho)
