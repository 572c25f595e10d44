from __future__ import annotations

import pytest
import torch
from torch import nn


class TinyViTLike(nn.Module):
    """A small transformer-shaped model with every kind of parameter νSAM must tell apart."""

    def __init__(self, dim: int = 12, depth: int = 2, classes: int = 5) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, kernel_size=2, stride=2)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, 5, dim) * 0.02)
        self.blocks = nn.ModuleList(
            nn.ModuleDict(
                {
                    "norm": nn.LayerNorm(dim),
                    "fc1": nn.Linear(dim, 2 * dim),
                    "fc2": nn.Linear(2 * dim, dim),
                }
            )
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embed(images).flatten(2).transpose(1, 2)  # (B, 4, dim)
        tokens = torch.cat([self.cls_token.expand(len(tokens), -1, -1), tokens], dim=1)
        tokens = tokens + self.pos_embed
        for block in self.blocks:
            tokens = tokens + block["fc2"](torch.relu(block["fc1"](block["norm"](tokens))))
        return self.head(self.norm(tokens[:, 0]))


def make_batch(seed: int = 0, n: int = 8, dtype: torch.dtype = torch.float32):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, 4, 4, generator=generator, dtype=dtype)
    labels = torch.randint(0, 5, (n,), generator=generator)
    return images, labels


def first_pass(model: nn.Module, seed: int = 0) -> torch.Tensor:
    """Zero the grads and run forward/backward on a fixed batch; returns the loss."""
    model.zero_grad(set_to_none=True)
    dtype = next(model.parameters()).dtype
    images, labels = make_batch(seed, dtype=dtype)
    loss = nn.functional.cross_entropy(model(images).float(), labels)
    loss.backward()
    return loss.detach()


@pytest.fixture
def vit_like() -> TinyViTLike:
    torch.manual_seed(0)
    return TinyViTLike()
