"""The accuracy study driver (benchmarks/accuracy.py): both phases, resuming, reruns, the report."""

import csv
from pathlib import Path

import numpy as np
import pytest

from helpers import load_script, write_fake_cifar


def load_study():
    return load_script("benchmarks/accuracy.py")


def read(path: Path) -> list[dict]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


def test_study_runs_both_phases_resumes_and_reports(tmp_path):
    study = load_study()
    data, out = write_fake_cifar(tmp_path / "cifar", train=300, test=150), tmp_path / "out"
    common = ["--plan", "smoke", "--data", str(data), "--out", str(out), "--accelerator", "cpu"]

    study.main([*common, "--max-runs", "3"])  # phase 1: every ρ with seed 0
    first = read(out / "runs.csv")
    assert [r["run_id"] for r in first] == ["mixer_32_2-adamw-rho0-start0-seed0",
                                            "mixer_32_2-nusam-rho0.05-start0.1-seed0",
                                            "mixer_32_2-nusam-rho0.2-start0.1-seed0"]

    study.main(common)  # resumes: phase 2 at the best ρ of seed 0, plus νSAM without the delay
    rows = read(out / "runs.csv")
    assert rows[:3] == first  # finished runs are not rerun
    best = max(first[1:], key=lambda r: float(r["best_test_acc"]))["rho"]
    assert [r["run_id"] for r in rows[3:]] == ["mixer_32_2-adamw-rho0-start0-seed1",
                                               f"mixer_32_2-nusam-rho{float(best):g}-start0.1-seed1",
                                               f"mixer_32_2-nusam-rho{float(best):g}-start0-seed0"]
    for row in rows:
        assert 0.0 <= float(row["final_test_acc"]) <= float(row["best_test_acc"]) <= 1.0
        assert float(row["final_train_loss"]) > 0 and float(row["peak_mib"]) > 0 and row["epochs"] == "1"
        assert f"--only {row['run_id']}" in row["command"] and str(out) in row["command"]

    # A rerun of one run replaces its row and, with the data order fixed by the seed, repeats it exactly.
    study.main([*common, "--only", "mixer_32_2-adamw-rho0-start0-seed0"])
    rerun = read(out / "runs.csv")
    assert len(rerun) == 6 and len({r["run_id"] for r in rerun}) == 6
    again = next(r for r in rerun if r["run_id"] == "mixer_32_2-adamw-rho0-start0-seed0")
    for key in ("best_test_acc", "final_test_acc", "final_train_loss"):
        assert again[key] == first[0][key]
    assert rows[3]["final_train_loss"] != first[0]["final_train_loss"]  # another seed, another order

    table = (out / "results.md").read_text()
    adamw = next(line for line in table.splitlines() if line.startswith("| mixer_32_2 | adamw |"))
    accs = [float(r["best_test_acc"]) for r in rerun if r["method"] == "adamw"]
    assert f"| 2 | {100 * np.mean(accs):.2f} ± {100 * np.std(accs, ddof=1):.2f} |" in adamw
    assert table.count("`python benchmarks/accuracy.py") == 6
    assert (out / "results.png").stat().st_size > 0

    with pytest.raises(SystemExit, match="not a run of plan"):
        study.main([*common, "--only", "mixer_32_2-sam-rho0.1-start0.1-seed0"])


def test_noise_plan_records_memorisation_on_the_training_set(tmp_path):
    study = load_study()
    data, out = write_fake_cifar(tmp_path / "cifar", train=300, test=150), tmp_path / "out"
    study.main(["--plan", "noise_smoke", "--data", str(data), "--out", str(out), "--accelerator", "cpu",
                "--max-runs", "1"])
    (row,) = read(out / "runs.csv")
    assert row["run_id"] == "mixer_32_2-adamw-rho0-start0-seed0" and float(row["label_noise"]) == 0.4
    for key in ("train_acc_clean", "train_acc_noisy_memorised", "train_acc_noisy_true"):
        assert 0.0 <= float(row[key]) <= 1.0
    # the noisy part's wrong and true labels differ everywhere, so the two accuracies cannot overlap
    assert float(row["train_acc_noisy_memorised"]) + float(row["train_acc_noisy_true"]) <= 1.0
    table = (out / "results.md").read_text()
    assert "noisy part memorised (%)" in table and "40 % of the training labels" in table
