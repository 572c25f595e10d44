from __future__ import annotations

import pytest
import torch

from helpers import TinyViTLike


@pytest.fixture
def vit_like() -> TinyViTLike:
    torch.manual_seed(0)
    return TinyViTLike()
