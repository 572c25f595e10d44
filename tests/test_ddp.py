"""Real two-process DDP (gloo, CPU): a synced step equals one process on the joined batch and the
ranks stay identical, while the first pass communicates only what the perturbation reads (νSAM:
the power iteration's products, Σm then Σn numbers; SAM-ON: the normalisation layers' gradients;
GaussSAM: nothing; SAM: the gradient); m-SAM perturbs per rank; ``rho=0`` is a no-op under DDP."""

import functools
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lightning_nusam
from ddp_script import parse
from helpers import (
    Classifier,
    PlainClassifier,
    classification_data,
    loader,
    make_net,
    max_weight_difference,
    subprocess_env,
    trainer,
)

HERE = Path(__file__).resolve().parent
STEPS = 6
VECTORS = ["way=mixin", "way=dropin", "way=mixin,accumulate=2", "way=dropin,accumulate=2",
           "way=dropin,method=NuSAMNorm", "way=mixin,every=2"]
FULL_GRADIENT = ["way=dropin,reduction=gradients", "way=mixin,reduction=gradients,accumulate=2",
                 "way=dropin,method=SAM"]
OTHERS = ["way=dropin,method=SAMON", "way=dropin,method=GaussSAM", "way=dropin,precision=bf16-mixed",
          "way=dropin,reduction=onepass", "way=mixin,reduction=msam,resync=3",
          "way=dropin,reduction=msam,resync=3"]
NO_OP = ["way=dropin,method=none", "way=dropin,rho=0", "way=mixin,method=none", "way=mixin,rho=0"]
MODES = VECTORS + FULL_GRADIENT + OTHERS + NO_OP


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> dict[str, list[dict]]:
    """All modes in one two-process job: {mode: [rank 0's record, rank 1's]}."""
    out = tmp_path_factory.mktemp("ddp")
    command = [sys.executable, str(HERE / "ddp_script.py"), str(out), str(STEPS), *MODES]
    result = subprocess.run(command, env=subprocess_env(str(HERE)), capture_output=True, text=True,
                            timeout=900, cwd=out)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return {mode: [torch.load(out / f"{mode}_rank{r}.pt", weights_only=False) for r in range(2)]
            for mode in MODES}


def single_process(mode: str) -> list[list[torch.Tensor]]:
    """The same run in one process with the joined batch of 8 at every step (the micro-batches and
    the first pass's reduction do not change what a step computes, so they are not options here)."""
    options = parse(mode)
    return _single_process(options["way"], options["method"], float(options["rho"]),
                           options["reduction"] == "onepass", int(options["every"]), options["precision"])


@functools.cache
def _single_process(way: str, method: str, rho: float, one_pass: bool, every: int,
                    precision: str) -> list[list[torch.Tensor]]:
    weights = []
    callback_cls = getattr(lightning_nusam, method)

    class Record(callback_cls):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            weights.append([p.detach().clone() for p in pl_module.parameters()])

    torch.manual_seed(0)
    module = PlainClassifier() if way == "dropin" else Classifier()
    record = Record(rho=rho, one_pass=one_pass, every_n_steps=every)
    trainer(max_steps=STEPS, callbacks=[record], precision=precision).fit(
        module, loader(classification_data(), 8))
    return weights


def deviation_from_single_process(record: dict, mode: str) -> float:
    """The largest |w_ddp − w_single| over the steps of rank ``record``'s run of ``mode``."""
    reference = single_process(mode)
    deviation = max(max_weight_difference(record["weights"][s], reference[s]) for s in range(STEPS))
    print(f"{mode}: max |w_ddp - w_single| over {STEPS} steps: {deviation:.3e}")
    return deviation


def rows_and_columns() -> tuple[int, int]:
    """Σn and Σm over the weight matrices of the tests' net: what νSAM's first pass all-reduces."""
    matrices = [p for n, p in make_net().named_parameters() if p.dim() == 2]
    return sum(p.shape[0] for p in matrices), sum(p.shape[1] for p in matrices)


@pytest.mark.parametrize("mode", VECTORS)
def test_synced_nusam_reduces_the_power_iterations_products_not_the_gradient(ranks, mode):
    rank0, rank1 = ranks[mode]
    assert rank0["world_size"] == 2 and len(rank0["weights"]) == STEPS
    rows, columns = rows_and_columns()
    perturbed_steps = STEPS // 2 if "every=2" in mode else STEPS
    # the first pass: no gradient all-reduce; perturb(): Gᵀu (Σm numbers), then G v (Σn), one call each
    assert rank0["collectives"] == [[columns, rows]] * perturbed_steps
    assert rank0["allreduces_per_step"] == [1] * STEPS  # the second pass (or a plain step) only
    for step in range(STEPS):  # ranks identical without any re-synchronisation
        assert max_weight_difference(rank0["weights"][step], rank1["weights"][step]) == 0.0
    for step in range(perturbed_steps):  # the same ε on both ranks, from different local gradients
        assert max_weight_difference(rank0["perturbed"][step], rank1["perturbed"][step]) == 0.0
        assert max_weight_difference(rank0["first_grads"][step], rank1["first_grads"][step]) > 1e-4
    assert deviation_from_single_process(rank0, mode) <= 1e-5
    assert rank0["rng_entries"] == rank1["rng_entries"] == 2  # each rank's own RNG state is saved
    assert rank0["own_rng_saved"] and rank1["own_rng_saved"]


@pytest.mark.parametrize("mode", FULL_GRADIENT)
def test_the_full_gradient_all_reduce_on_request_and_for_sam(ranks, mode):
    rank0, rank1 = ranks[mode]
    assert rank0["allreduces_per_step"] == [2] * STEPS  # one per pass, whatever the micro-batches
    assert rank0["collectives"] == [[]] * STEPS
    for step in range(STEPS):
        assert max_weight_difference(rank0["first_grads"][step], rank1["first_grads"][step]) == 0.0
        assert max_weight_difference(rank0["weights"][step], rank1["weights"][step]) == 0.0
    assert deviation_from_single_process(rank0, mode) <= 1e-5


@pytest.mark.parametrize(("mode", "reduced"), [("way=dropin,method=SAMON", 32),
                                               ("way=dropin,method=GaussSAM", None)])
def test_sam_on_reduces_its_norm_gradients_and_gauss_sam_nothing(ranks, mode, reduced):
    rank0, rank1 = ranks[mode]
    assert rank0["allreduces_per_step"] == [1] * STEPS
    assert rank0["collectives"] == [[reduced] if reduced else []] * STEPS  # LayerNorm(16): 32 numbers
    for step in range(STEPS):
        assert max_weight_difference(rank0["perturbed"][step], rank1["perturbed"][step]) == 0.0
    assert deviation_from_single_process(rank0, mode) <= 1e-5


def test_bf16_mixed_keeps_the_ranks_identical(ranks):
    rank0, rank1 = ranks["way=dropin,precision=bf16-mixed"]
    assert all(max_weight_difference(a, b) == 0.0
               for a, b in zip(rank0["weights"], rank1["weights"], strict=True))
    # bf16 autocast on batches of 4 instead of 8
    assert deviation_from_single_process(rank0, "way=dropin,precision=bf16-mixed") <= 1e-2


def test_one_pass_estimates_from_the_all_reduced_gradient(ranks):
    rank0, rank1 = ranks["way=dropin,reduction=onepass"]
    assert rank0["allreduces_per_step"] == [1] * STEPS  # one pass per step
    for step in range(STEPS):  # the direction comes from the same, all-reduced gradient on both ranks
        assert max_weight_difference(rank0["first_grads"][step], rank1["first_grads"][step]) == 0.0
    assert deviation_from_single_process(rank0, "way=dropin,reduction=onepass") <= 1e-5


@pytest.mark.parametrize("mode", ["way=mixin,reduction=msam,resync=3", "way=dropin,reduction=msam,resync=3"])
def test_m_sam_first_pass_is_local_and_weights_still_agree(ranks, mode):
    rank0, rank1 = ranks[mode]
    assert rank0["allreduces_per_step"] == [1] * STEPS  # the second pass only
    assert rank0["collectives"] == [[]] * STEPS
    for step in range(STEPS):  # each rank perturbed with its own half-batch gradient
        assert max_weight_difference(rank0["first_grads"][step], rank1["first_grads"][step]) > 1e-3
    divergence = [max_weight_difference(rank0["weights"][s], rank1["weights"][s]) for s in range(STEPS)]
    print("m-SAM rank divergence per step:", divergence)
    assert max(divergence) <= 1e-6
    assert rank0["resyncs"] == rank1["resyncs"] == STEPS // 3
    for step in (2, 5):  # global_step 3 and 6: rank 0's weights were just broadcast
        assert divergence[step] == 0.0


@pytest.mark.parametrize("way", ["dropin", "mixin"])
def test_rho_zero_is_a_no_op_under_ddp(ranks, way):
    plain, zero = ranks[f"way={way},method=none"], ranks[f"way={way},rho=0"]
    for rank in (0, 1):
        for step in range(STEPS):
            assert max_weight_difference(zero[rank]["weights"][step], plain[rank]["weights"][step]) == 0.0
