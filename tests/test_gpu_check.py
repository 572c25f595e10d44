"""``make gpu-check`` on a CPU: the benchmark with tiny models writes a row of finite numbers for
every model and method, and the CUDA tier's outcomes are read from pytest's junit xml."""

import importlib.util
import json
import math

import pytest
import torch

from helpers import load_script
from lightning_nusam.perturbations.compiled import device_problem, torch_compile_problem


def test_tiny_gpu_check_writes_every_model_and_method_with_finite_numbers(tmp_path):
    bench = load_script("benchmarks/gpu_check.py")
    status = bench.main(["--tiny", "--device", "cpu", "--no-tier", "--steps", "1", "--warmup", "0",
                         "--repeats", "1", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert status == 0 and report["errors"] == {} and report["settings"]["tiny"]
    assert report["bandwidth"]["measured_bytes_per_s"] > 0
    rows = {(r["model"], r["method"]): r for r in report["rows"]}
    methods = bench.default_methods(torch.device("cpu"))
    assert "nusam_compiled" not in methods  # on CUDA only, unless asked for (next test)
    assert sorted(rows) == sorted((m, k) for m in bench.MODELS for k in methods)
    peer_installed = importlib.util.find_spec("pytorch_optimizer") is not None
    for (model, method), row in rows.items():
        if method == "peer_sam" and not peer_installed:
            assert row["unavailable"]
            continue
        names = ["median_ms", "peak_mib", "x_two_pass", "x_adamw", "peak_vs_adamw_mib"]
        if method in bench.PERTURBING:
            names += ["perturb_restore_ms", "perturb_restore_host_ms", "limit_ms", "x_limit"]
            assert row["minimum_bytes"] > 0 and 0 < row["perturbed_numel"] <= row["parameters"]
        for name in names:
            assert math.isfinite(row[name]), (model, method, name)
        assert row["median_ms"] > 0 and row["peak_mib"] > 0
    assert rows[("vit_s16", "two_pass")]["x_two_pass"] == 1.0
    # νSAM perturbs the matrices only; SAM every parameter
    assert rows[("vit_s16", "nusam")]["perturbed_numel"] < rows[("vit_s16", "sam")]["perturbed_numel"]
    table = (tmp_path / "gpu_check.md").read_text()
    for spec in bench.model_specs(tiny=True).values():
        assert f"### {spec.label}, batch {spec.batch_size}" in table
    for method in methods:
        assert table.count(f"| {method} | ") == len(bench.MODELS)
    assert len((tmp_path / "gpu_check_rows.jsonl").read_text().splitlines()) == len(rows)


@pytest.mark.skipif((torch_compile_problem() or device_problem(torch.device("cpu"))) is not None,
                    reason="no torch.compile here")
def test_tiny_gpu_check_measures_compiled_nusam_when_asked(tmp_path):
    bench = load_script("benchmarks/gpu_check.py")
    status = bench.main(["--tiny", "--device", "cpu", "--no-tier", "--steps", "1", "--warmup", "1",
                         "--repeats", "1", "--models", "vit_s16", "--methods", "two_pass", "nusam_compiled",
                         "--out", str(tmp_path)])
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert status == 0 and report["errors"] == {}
    row = next(r for r in report["rows"] if r["method"] == "nusam_compiled")
    for name in ["median_ms", "x_two_pass", "perturb_restore_ms", "perturb_restore_host_ms", "limit_ms",
                 "first_step_s"]:
        assert math.isfinite(row[name]), name
    assert row["perturb_restore_kernels"] is None  # counted on CUDA only
    assert "| nusam_compiled | " in (tmp_path / "gpu_check.md").read_text()


def test_the_tier_outcomes_come_from_the_junit_xml_and_a_stopped_run_from_its_log(tmp_path):
    bench = load_script("benchmarks/gpu_check.py")
    xml = tmp_path / "tier.xml"
    xml.write_text(
        '<testsuites><testsuite name="pytest" tests="3">'
        '<testcase classname="tests.test_cuda" name="test_a" time="1.5"/>'
        '<testcase classname="tests.test_cuda" name="test_b[nusam]" time="0.2">'
        '<failure message="RuntimeError: called a synchronizing CUDA operation">trace</failure></testcase>'
        '<testcase classname="tests.test_cuda" name="test_c" time="0"><skipped message="no CUDA"/></testcase>'
        '</testsuite></testsuites>')
    summary = bench.summarize_junit(xml)
    assert summary["counts"] == {"passed": 1, "failed": 1, "skipped": 1}
    assert summary["tests"][1] == {"name": "test_b[nusam]", "outcome": "failed", "time_s": 0.2,
                                   "message": "RuntimeError: called a synchronizing CUDA operation"}
    log = ("tests/test_cuda.py::test_a PASSED [ 50%]\n"
           "tests/test_cuda.py::test_b[sam-fp32] FAILED [100%]\n")
    assert [(t["name"], t["outcome"]) for t in bench.summarize_log(log)["tests"]] == [
        ("test_a", "passed"), ("test_b[sam-fp32]", "failed")]
