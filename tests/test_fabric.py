"""Lightning Fabric: the core and the step engine in a Fabric loop (examples/fabric.py), with the
perturbation built before or after fabric.setup, in 32-true, bf16-mixed, bf16-true and 2-process DDP."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.fabric import Fabric

from helpers import load_script, max_weight_difference, subprocess_env
from lightning_nusam.perturbations import NuclearPerturbation

ROOT = Path(__file__).resolve().parents[1]
example = load_script("examples/fabric.py")


def fabric(precision: str = "32-true") -> Fabric:
    return Fabric(accelerator="cpu", devices=1, precision=precision)


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "bf16-true"])
def test_a_perturbation_built_before_or_after_setup_trains_the_same(precision):
    weights = {}
    for before in (True, False):
        torch.manual_seed(1)  # the dropout masks (both passes draw the same ones)
        model, engine = example.train(fabric(precision), steps=8, build_before_setup=before)
        nusam = engine.perturbation
        assert nusam.parameter_names == ["0.weight", "3.weight"]  # the user's names, not _forward_module.*
        assert nusam.exact_restore == (precision == "bf16-true")
        expected = torch.bfloat16 if precision == "bf16-true" else torch.float32
        assert next(model.parameters()).dtype == expected
        weights[before] = [p.detach().clone() for p in model.parameters()]
    assert max_weight_difference(weights[True], weights[False]) == 0.0
    assert max_weight_difference(weights[True], example.make_model()) > 1e-3  # it trained


@pytest.mark.parametrize("before", [True, False])
def test_bf16_true_weights_are_restored_bit_exactly_whenever_the_perturbation_was_built(before):
    initial = [p.detach().to(torch.bfloat16) for p in example.make_model().parameters()]
    model, engine = example.train(fabric("bf16-true"), steps=12, lr=0.0, rho=0.5, build_before_setup=before)
    assert engine.perturbation.steps == 12 and engine.perturbation.exact_restore
    assert max_weight_difference(list(model.parameters()), initial) == 0.0


def test_patterns_and_state_dicts_use_the_users_parameter_names():
    model = example.make_model()
    saved = NuclearPerturbation(model, rho=0.1).state_dict()  # from the plain model
    wrapped, _ = fabric().setup(model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert NuclearPerturbation(wrapped, rho=0.1, include="3.*").parameter_names == ["3.weight"]
    loaded = NuclearPerturbation(wrapped, rho=0.1)
    loaded.load_state_dict(saved)
    assert loaded.state_dict()["u"].keys() == saved["u"].keys() == {"0.weight", "3.weight"}
    assert all(torch.equal(loaded.state_dict()["u"][k], saved["u"][k]) for k in saved["u"])


def test_two_process_ddp_equals_one_process_and_reduces_vectors(tmp_path):
    command = [sys.executable, str(ROOT / "examples" / "fabric.py"), "--devices", "2", "--strategy", "ddp",
               "--steps", "8", "--dropout", "0", "--save", str(tmp_path)]
    result = subprocess.run(command, env=subprocess_env(str(ROOT / "tests")), capture_output=True, text=True,
                            timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"fabric_rank{r}.pt", weights_only=False) for r in range(2))
    assert rank0["first_pass_without_all_reduce"] and rank0["names"] == ["0.weight", "3.weight"]
    assert max_weight_difference(rank0["weights"], rank1["weights"]) == 0.0
    torch.manual_seed(1)
    single, _ = example.train(fabric(), steps=8, model=example.make_model(dropout=0.0))
    deviation = max_weight_difference(rank0["weights"], list(single.parameters()))
    print(f"Fabric DDP (2 processes) vs one process on the joined batch, 8 steps: {deviation:.2e}")
    assert deviation <= 1e-5


def test_the_example_learns_the_teacher():
    assert example.main(["--precision", "bf16-mixed"]) > 0.85
