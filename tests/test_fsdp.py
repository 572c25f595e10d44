"""FSDP2 (ModelParallelStrategy, 2 gloo processes on CPU): the sharded νSAM step equals one
process on the joined batch, communicates only vectors, and resumes from a distributed
checkpoint."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import Classifier, classification_data, loader, max_weight_difference, subprocess_env, trainer
from lightning_nusam import SAM, SAMON, NuSAM

HERE = Path(__file__).resolve().parent
STEPS = 6
pytest.importorskip("torch.distributed.fsdp", reason="FSDP2 needs torch.distributed")


def launch(out: Path, mode: str) -> list[dict]:
    env = subprocess_env(str(HERE))
    result = subprocess.run([sys.executable, str(HERE / "fsdp_script.py"), str(out), mode],
                            env=env, capture_output=True, text=True, timeout=600, cwd=out)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return [torch.load(out / f"{mode}_rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    return {"train": launch(out, "train"), "resume": launch(out, "resume")}


def single_process_run(callback_class, rho):
    """One process, batch 8 = the union of the two ranks' batches of 4 at every step."""
    weights = []

    class Record(callback_class):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            weights.append([p.detach().clone() for p in pl_module.parameters()])

    trainer(max_steps=STEPS, callbacks=[Record(rho=rho)]).fit(Classifier(), loader(classification_data(), 8))
    return weights


@pytest.fixture(scope="module")
def single_process_weights():
    return single_process_run(NuSAM, 0.5)


def test_fsdp2_equals_single_process_on_the_joined_batch(runs, single_process_weights):
    rank0, rank1 = runs["train"]
    assert rank0["world_size"] == 2 and len(rank0["weights"]) == STEPS
    deviation = max(max_weight_difference(rank0["weights"][s], single_process_weights[s])
                    for s in range(STEPS))
    print(f"max |w_fsdp2 - w_single| over {STEPS} steps: {deviation:.3e}")
    assert deviation <= 1e-5
    for step in range(STEPS):
        assert max_weight_difference(rank0["weights"][step], rank1["weights"][step]) == 0.0


def test_fsdp2_dropin_equals_single_process(tmp_path, single_process_weights):
    """The callback alone on an automatic-optimization module under FSDP2: the same step."""
    rank0, rank1 = launch(tmp_path, "dropin")
    deviation = max(max_weight_difference(rank0["weights"][s], single_process_weights[s])
                    for s in range(STEPS))
    print(f"drop-in: max |w_fsdp2 - w_single| over {STEPS} steps: {deviation:.3e}")
    assert deviation <= 1e-5
    assert all(max_weight_difference(a, b) == 0.0
               for a, b in zip(rank0["weights"], rank1["weights"], strict=True))


def test_fsdp2_perturbation_communicates_only_vectors_and_holds_local_rows(runs):
    rank0, rank1 = runs["train"]
    shapes = rank0["matrix_shapes"]  # global (n, m) of each perturbed matrix
    expected = sum(m + 1 for _, m in shapes.values())  # T=1: Gᵀu (m numbers) and ‖Gv‖² per matrix
    assert rank0["reduced_numel"] == [expected] * STEPS == rank1["reduced_numel"]
    assert rank0["materialised"] == rank1["materialised"] == 0  # no full_tensor()/redistribute()
    for name, (n, _) in shapes.items():
        assert rank0["local_u"][name].numel() + rank1["local_u"][name].numel() == n
    full = sum(n + m for n, m in shapes.values())
    assert rank0["held_rank"] < full and rank0["held_total"] == rank0["held_rank"] + rank1["held_rank"]
    assert rank0["held_total"] == full + sum(m for _, m in shapes.values())  # v is held on both ranks


def test_fsdp2_resume_from_distributed_checkpoint_continues_identically(runs):
    uninterrupted, resumed = runs["train"][0], runs["resume"][0]
    assert len(resumed["weights"]) == STEPS - 3
    for step in range(3, STEPS):
        assert max_weight_difference(uninterrupted["weights"][step], resumed["weights"][step - 3]) == 0.0


def test_fsdp2_bf16_mixed_trains(tmp_path):
    rank0, rank1 = launch(tmp_path, "bf16")
    assert len(rank0["weights"]) == STEPS and rank0["materialised"] == 0
    assert all(torch.isfinite(w).all() for w in rank0["weights"][-1])
    assert max_weight_difference(rank0["weights"][-1], rank1["weights"][-1]) == 0.0


@pytest.mark.parametrize(("mode", "callback_class", "rho"), [("sam", SAM, 0.1), ("samon", SAMON, 0.5)])
def test_fsdp2_sam_and_samon_global_norm_equal_single_process(tmp_path, mode, callback_class, rho):
    rank0, rank1 = launch(tmp_path, mode)
    reference = single_process_run(callback_class, rho)
    deviation = max(max_weight_difference(rank0["weights"][s], reference[s]) for s in range(STEPS))
    print(f"{mode}: max |w_fsdp2 - w_single| over {STEPS} steps: {deviation:.3e}")
    assert deviation <= 1e-5
    assert rank0["materialised"] == 0 and rank0["reduced_numel"] == [1] * STEPS  # one scalar: ‖g‖²
    assert rank0["held_total"] == rank0["held_rank"] + rank1["held_rank"]


def test_m_sam_is_refused_under_model_parallel_strategy():
    from lightning.pytorch.strategies import ModelParallelStrategy

    run = trainer(strategy=ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1))
    with pytest.raises(ValueError, match=r"m-SAM.*ModelParallelStrategy"):
        NuSAM(rho=0.1, sync_first_pass=False).setup(run, Classifier(), "fit")
