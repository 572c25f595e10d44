"""Real two-process DDP (gloo, CPU): the synced first pass equals one process on the joined
batch; m-SAM perturbs per rank and stays in step through re-synchronisation."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import (
    Classifier,
    PlainClassifier,
    classification_data,
    loader,
    max_weight_difference,
    subprocess_env,
    trainer,
)
from lightning_nusam import NuSAM

HERE = Path(__file__).resolve().parent
STEPS = 6


def launch(tmp_path: Path, mode: str) -> list[dict]:
    env = subprocess_env(str(HERE))
    result = subprocess.run(
        [sys.executable, str(HERE / "ddp_script.py"), str(tmp_path), mode, str(STEPS)],
        env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return [torch.load(tmp_path / f"{mode}_rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.fixture(scope="module")
def single_process_weights():
    """One process, batch 8 = the union of the two ranks' batches of 4 (or of their two
    micro-batches of 2) at every step."""
    module = Classifier()
    weights = []

    class Record(NuSAM):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            weights.append([p.detach().clone() for p in pl_module.parameters()])

    trainer(max_steps=STEPS, callbacks=[Record(rho=0.5)]).fit(module, loader(classification_data(), 8))
    return weights


@pytest.mark.parametrize("mode", ["sync", "dropin", "sync-accumulate", "dropin-accumulate"])
def test_ddp_synced_first_pass_equals_single_process_and_ranks_stay_identical(
    tmp_path, single_process_weights, mode
):
    """SAMMixin and the drop-in, without and with 2 micro-batches per step, on 2 ranks equal one
    process on the joined batch of 8."""
    rank0, rank1 = launch(tmp_path, mode)
    assert rank0["world_size"] == 2 and len(rank0["weights"]) == STEPS
    for step in range(STEPS):
        assert all(torch.equal(a, b) for a, b in zip(rank0["weights"][step], rank1["weights"][step],
                                                     strict=True))
        assert all(torch.equal(a, b) for a, b in zip(rank0["first_grads"][step], rank1["first_grads"][step],
                                                     strict=True))
    deviation = max(max_weight_difference(rank0["weights"][s], single_process_weights[s])
                    for s in range(STEPS))
    print(f"{mode}: max |w_ddp - w_single| over {STEPS} steps: {deviation:.3e}")
    # one gradient all-reduce per pass (the model fits one DDP bucket), whatever the micro-batches
    assert rank0["allreduces_per_step"] == [2] * STEPS
    # the checkpointed RNG holds each rank's own state, so a resumed rank gets its own back
    assert rank0["rng_entries"] == rank1["rng_entries"] == 2
    assert rank0["own_rng_saved"] and rank1["own_rng_saved"]
    assert deviation <= 1e-5


def test_ddp_one_pass_estimates_from_the_all_reduced_gradient(tmp_path):
    module = PlainClassifier()
    weights = []

    class Record(NuSAM):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            weights.append([p.detach().clone() for p in pl_module.parameters()])

    trainer(max_steps=STEPS, callbacks=[Record(rho=0.5, one_pass=True)]).fit(
        module, loader(classification_data(), 8))
    rank0, rank1 = launch(tmp_path, "dropin-onepass")
    assert rank0["allreduces_per_step"] == [1] * STEPS  # one pass per step
    for step in range(STEPS):  # the direction comes from the same, all-reduced gradient on both ranks
        assert all(torch.equal(a, b) for a, b in zip(rank0["first_grads"][step], rank1["first_grads"][step],
                                                     strict=True))
    deviation = max(max_weight_difference(rank0["weights"][s], weights[s]) for s in range(STEPS))
    print(f"one-pass DDP vs one process: {deviation:.3e}")
    assert deviation <= 1e-5


@pytest.mark.parametrize("mode", ["msam", "dropin-msam"])
def test_m_sam_first_pass_is_local_and_weights_still_agree(tmp_path, mode):
    rank0, rank1 = launch(tmp_path, mode)
    assert rank0["allreduces_per_step"] == [1] * STEPS  # the second pass only
    for step in range(STEPS):  # each rank perturbed with its own half-batch gradient
        assert max_weight_difference(rank0["first_grads"][step], rank1["first_grads"][step]) > 1e-3
    divergence = [max_weight_difference(rank0["weights"][s], rank1["weights"][s]) for s in range(STEPS)]
    print("m-SAM rank divergence per step:", divergence)
    assert max(divergence) <= 1e-6
    assert rank0["resyncs"] == rank1["resyncs"] == STEPS // 3
    for step in (2, 5):  # global_step 3 and 6: rank 0's weights were just broadcast
        assert divergence[step] == 0.0
