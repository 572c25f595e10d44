import json

import pytest

from helpers import load_script
from lightning_nusam.cli import main as nusam
from lightning_nusam.memory import memory_report


def test_memory_report_reproduces_table_1_and_the_sgd_saving():
    report = memory_report("vit_base_patch16_224")
    assert report.parameters == 86_567_656
    assert report.nusam_perturbation == 149_224 and report.perturbed_matrices == 49
    assert report.perturbation_saving > 0.998
    assert report.training_state("SGD")["saving"] == pytest.approx(1 / 3, abs=0.001)
    assert report.training_state("AdamW")["saving"] == pytest.approx(1 / 5, abs=0.001)


def test_nusam_memory_subcommand(capsys):
    nusam(["memory", "--model", "vit_large_patch16_224", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert out["nusam_perturbation"] == 395_240
    nusam(["memory", "--model", "mixer_b16_224"])
    assert "| SGD |" in capsys.readouterr().out


def test_benchmark_script_writes_table_json_and_chart(tmp_path):
    bench = load_script("benchmarks/memory_speed.py")
    rows = bench.main(["--models", "vit_t4", "--methods", "adamw", "two_pass", "peer_sam", "nusam_t1",
                       "--steps", "2", "--warmup", "0", "--batch-size", "2", "--out", str(tmp_path)])
    by_method = {r["method"]: r for r in rows}
    assert by_method["adamw"]["x_adamw"] == 1.0 and by_method["peer_sam"]["x_peer"] == 1.0
    parameters = by_method["adamw"]["parameters"]
    assert by_method["peer_sam"]["held_numel"] == parameters  # the peer copies every weight
    assert 0 < by_method["nusam_t1"]["held_numel"] < parameters / 20
    for suffix in ("md", "json", "png"):
        assert (tmp_path / f"memory_speed_cpu.{suffix}").stat().st_size > 0
    assert "| nusam_t1 |" in (tmp_path / "memory_speed_cpu.md").read_text()


def test_ddp_communication_benchmark_counts_what_a_step_sends(tmp_path):
    """Two gloo processes, one step each: νSAM's synced first pass adds only its vectors."""
    bench = load_script("benchmarks/ddp_communication.py")
    bench.main(["--models", "vit_t4", "--methods", "adamw", "sam", "nusam_vectors", "--links", "unlimited",
                "--steps", "1", "--warmup", "0", "--batch-size", "2", "--out", str(tmp_path)])
    rows = {r["method"]: r for r in json.loads((tmp_path / "ddp_communication_cpu.json").read_text())["rows"]}
    adamw = rows["adamw"]["bytes_per_step"]
    assert 1.9 < rows["sam"]["bytes_per_step"] / adamw < 2.1  # the gradient, twice
    assert rows["nusam_vectors"]["bytes_per_step"] / adamw < 1.05  # the gradient once, and vectors
    assert "| unlimited | nusam_vectors |" in (tmp_path / "ddp_communication_cpu.md").read_text()


def test_the_report_states_the_share_of_the_weights_it_covers(capsys):
    import timm
    import torch

    from lightning_nusam.memory import main as memory

    report = memory(["--model", "resnet18"])
    shown = capsys.readouterr().out
    with torch.device("meta"):
        model = timm.create_model("resnet18")
    fc = model.fc.weight.numel()  # the one matrix νSAM perturbs in a ResNet (the rest are convolutions)
    total = sum(p.numel() for p in model.parameters())
    assert report.perturbed_matrices == 1 and report.covered == fc
    assert report.coverage == pytest.approx(fc / total)
    assert f"{100 * fc / total:.1f} % of the weights" in shown and "SAM perturbs all of them" in shown
