"""A radius that keeps the model from learning is reported once, with its figures; a healthy run
is not reported."""

from __future__ import annotations

import warnings

import lightning as L
import pytest
import torch
from torch import nn

from lightning_nusam import NuSAM
from lightning_nusam.radius_watch import RadiusWarning, RadiusWatch


def feed(watch: RadiusWatch, clean: list[float], perturbed: list[float] | None,
         rho: float = 0.05) -> list[str]:
    """The messages ``watch`` gives for these steps (plain steps when ``perturbed`` is None)."""
    messages = []
    for index, value in enumerate(clean):
        second = None if perturbed is None else torch.tensor(perturbed[index])
        message = watch.observe(torch.tensor(value), second, None if perturbed is None else rho)
        if message is not None:
            messages.append(message)
    return messages


def test_a_clean_loss_that_climbs_back_after_the_start_is_reported_once_with_its_figures() -> None:
    watch = RadiusWatch(window=4)
    assert feed(watch, [2.3, 2.0, 1.8, 1.6, 1.5, 1.5, 1.4, 1.4], None) == []  # plain: 1.45 at the end
    after = [2.2] * 4 + [2.3] * 20
    messages = feed(watch, after, [value + 0.05 for value in after])
    assert len(messages) == 1  # once, whatever follows
    assert "rho=0.05 may be too large" in messages[0]
    assert "rose from 1.45 before the perturbation started to 2.30 (perturbed loss 2.35)" in messages[0]
    assert "try rho=0.01" in messages[0]


def test_a_stalled_loss_far_below_the_perturbed_loss_is_reported_without_plain_steps() -> None:
    watch = RadiusWatch(window=4)
    messages = feed(watch, [2.3] * 12, [3.5] * 12, rho=0.5)
    assert len(messages) == 1
    assert ("has not fallen since the start (2.30 in the first steps after it started, 2.30 now)"
            in messages[0])
    assert "perturbed loss is 3.50" in messages[0]


@pytest.mark.parametrize(
    ("clean", "perturbed"),
    [
        ([0.62 - 0.005 * k for k in range(40)], [0.7 - 0.005 * k for k in range(40)]),  # learning
        ([0.6] * 40, [0.66] * 40),  # converged, small sharpness: a plateau is no alarm
        ([0.6 + 0.05 * (k % 2) for k in range(40)], [0.7] * 40),  # noise within the rise allowed
    ],
    ids=["falling", "plateau", "noise"],
)
def test_healthy_runs_are_not_reported(clean: list[float], perturbed: list[float]) -> None:
    watch = RadiusWatch(window=4)
    assert feed(watch, [0.6] * 8, None) == []
    assert feed(watch, clean, perturbed) == []


def test_non_finite_windows_and_one_window_after_the_start_are_not_judged() -> None:
    watch = RadiusWatch(window=2)
    feed(watch, [1.0, 1.0], None)
    assert feed(watch, [float("nan"), 5.0] * 2 + [5.0, 5.0], [6.0] * 6) == []  # NaN window skipped
    assert feed(watch, [5.0, 5.0], [6.0] * 2) != []


def test_window_must_be_positive() -> None:
    with pytest.raises(ValueError, match="window must be a positive"):
        RadiusWatch(window=0)


class Regression(L.LightningModule):
    """A linear teacher learned by a small MLP: the loss falls fast without the callback."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def fit_with(rho: float) -> list[warnings.WarningMessage]:
    torch.manual_seed(1)
    x = torch.randn(960, 8)
    y = x @ torch.randn(8, 1)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)  # 120 steps
    trainer = L.Trainer(max_epochs=2, callbacks=[NuSAM(rho=rho, start_epoch=1)], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(Regression(), data)
    return [w for w in caught if issubclass(w.category, RadiusWarning)]


def test_the_callback_warns_once_when_rho_undoes_what_the_plain_epoch_learned() -> None:
    caught = fit_with(rho=5.0)
    assert len(caught) == 1
    message = str(caught[0].message)
    assert message.startswith("NuSAM: rho=5 may be too large for this model")
    assert "before the perturbation started" in message


def test_the_callback_is_quiet_with_a_radius_that_learns() -> None:
    assert fit_with(rho=0.01) == []
