"""``make gpu-check``: the CUDA test tier and a step benchmark on one GPU, in one command.

    make gpu-check GPU_PYTHON=python3 OUT=/some/dir   # a GPU machine: under 8 minutes on an H200
    python benchmarks/gpu_check.py --out DIR          # the same without make (PYTHONPATH=src)
    python benchmarks/gpu_check.py --tiny             # anywhere (chosen without CUDA): tiny models

1. The CUDA tier, ``pytest tests/test_cuda.py``, in a child process; its junit xml and log go to
   the output folder (on a machine without CUDA every test skips).
2. The step benchmark: ViT-S/16 (batch 128), ViT-B/16 (64) and Mixer-B/16 (64) at 224 px (timm,
   random weights) and BERT-base (``BertConfig()``, sequence 128, batch 32); the forward pass
   under bf16 autocast, AdamW as the base optimizer, ρ = 0.05. For each model and method, on a
   fresh model:

   - the step time: the median over the timed steps after warm-up, each step between two CUDA
     events on the current stream (the GPU's timeline; gaps while the host is behind count);
   - the peak memory: ``torch.cuda.max_memory_allocated`` from the model's creation to the end
     of its steps (on a CPU: the peak RSS of the process, which only grows);
   - for νSAM and SAM, perturb() + restore() alone: its median time between CUDA events, the
     host time to issue it, the GPU activities (kernels, copies, fills) it launches (counted by
     ``torch.profiler``; CUDA only), and its bandwidth limit: the bytes it must move over the measured
     device-to-device copy bandwidth. νSAM moves ``(2·T·g + 4·w)`` bytes per perturbed entry
     (each of T power iterations reads the gradient twice, for ``Gᵀu`` and ``Gv``; adding ε and
     removing it each read and write the weight); SAM ``(2·g + 5·w)`` (the gradient read for
     its norm and for ε; the weight read, copied and written, then written back from the copy),
     ``g`` and ``w`` the bytes of a gradient and a weight entry (24 and 28 bytes in fp32).

   Methods: ``adamw`` (one pass), ``two_pass`` (two forward-backward passes and one AdamW step:
   the floor of any SAM), ``nusam`` and ``sam`` (this package's NuclearPerturbation and
   L2Perturbation, each step through its StepEngine as every way in takes it), ``nusam_compiled``
   (``NuclearPerturbation(execution="compiled")``: its first step compiles, the seconds it took
   are shown; by default on CUDA only, as on a CPU the compilation costs more than the tiny run)
   and ``peer_sam`` (``pytorch_optimizer.SAM``; "n/a" where it is not installed).

Each model runs in a child process on CUDA, so that a crash or a hang costs that model only, and
the run keeps to ``--budget-s``. ``gpu_check.md`` and ``gpu_check.json`` are rewritten after every
model (and each method's row is appended to ``gpu_check_rows.jsonl`` as it is measured), so a run
cut short still leaves its figures. The exit status is 1 when a test failed or a section broke.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import math
import os
import platform
import re
import resource
import shlex
import statistics
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "benchmarks" / "results" / "gpu_check"
MODELS = ("vit_s16", "vit_b16", "mixer_b16", "bert_base")
METHODS = ("adamw", "two_pass", "nusam", "nusam_compiled", "sam", "peer_sam")
PERTURBING = ("nusam", "nusam_compiled", "sam")
#: run by default on CUDA only (on a CPU its compilation costs more than the tiny run)
CUDA_ONLY_METHODS = ("nusam_compiled",)
RHO, LR = 0.05, 1e-4
MiB = 2**20
#: vendor figures of HBM bandwidth (bytes/s), shown beside the measured one
NOMINAL_BANDWIDTH = {"H200": 4.8e12, "H100 80GB HBM3": 3.35e12}
#: a batch on a device: (the model's inputs, the labels)
BatchMaker = Callable[[torch.device], tuple[Any, torch.Tensor]]


# ------------------------------------------------------------------------------------ the models
@dataclass(frozen=True)
class ModelSpec:
    """A benchmarked model: its name, its batch, how to build it and a batch, and its logits."""

    label: str
    batch_size: int
    build: Callable[[], nn.Module]
    make_batch: BatchMaker
    logits: Callable[[nn.Module, Any], torch.Tensor]


def image_batch(batch_size: int, size: int, classes: int) -> BatchMaker:
    def make(device: torch.device) -> tuple[Any, torch.Tensor]:
        return (torch.randn(batch_size, 3, size, size, device=device),
                torch.randint(0, classes, (batch_size,), device=device))
    return make


def token_batch(batch_size: int, length: int, vocabulary: int) -> BatchMaker:
    def make(device: torch.device) -> tuple[Any, torch.Tensor]:
        tokens = torch.randint(0, vocabulary, (batch_size, length), device=device)
        return (tokens, torch.ones_like(tokens)), torch.randint(0, 2, (batch_size,), device=device)
    return make


def build_vit(name: str, tiny: bool) -> nn.Module:
    import timm

    if tiny:  # one block, 32 px; the base model twice as wide as the small one
        width = 64 if "base" in name else 32
        return timm.create_model(name, pretrained=False, num_classes=10, img_size=32, patch_size=8, depth=1,
                                 embed_dim=width, num_heads=2)
    return timm.create_model(name, pretrained=False)


def build_mixer(tiny: bool) -> nn.Module:
    import timm
    from timm.models.mlp_mixer import MlpMixer

    if tiny:
        return MlpMixer(num_classes=10, img_size=32, patch_size=8, num_blocks=1, embed_dim=32)
    return timm.create_model("mixer_b16_224", pretrained=False)


def build_bert(tiny: bool) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    if tiny:
        config = BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=64, max_position_embeddings=32, num_labels=2)
    else:
        config = BertConfig(num_labels=2)  # BERT-base
    return BertForSequenceClassification(config)


def model_specs(tiny: bool) -> dict[str, ModelSpec]:
    """The four models at their benchmark sizes, or tiny versions of them (32 px, one block)."""
    size, classes = (32, 10) if tiny else (224, 1000)
    length, vocabulary = (16, 128) if tiny else (128, 30522)
    batch = (lambda full: 2) if tiny else (lambda full: full)
    px = f"{size} px"

    def image_logits(model: nn.Module, images: Any) -> torch.Tensor:
        return model(images)

    def bert_logits(model: nn.Module, inputs: Any) -> torch.Tensor:
        tokens, mask = inputs
        return model(input_ids=tokens, attention_mask=mask).logits

    return {
        "vit_s16": ModelSpec(f"ViT-S/16, {px}", batch(128), lambda: build_vit("vit_small_patch16_224", tiny),
                             image_batch(batch(128), size, classes), image_logits),
        "vit_b16": ModelSpec(f"ViT-B/16, {px}", batch(64), lambda: build_vit("vit_base_patch16_224", tiny),
                             image_batch(batch(64), size, classes), image_logits),
        "mixer_b16": ModelSpec(f"Mixer-B/16, {px}", batch(64), lambda: build_mixer(tiny),
                               image_batch(batch(64), size, classes), image_logits),
        "bert_base": ModelSpec(f"BERT-base, sequence {length}", batch(32), lambda: build_bert(tiny),
                               token_batch(batch(32), length, vocabulary), bert_logits),
    }


# ------------------------------------------------------------------------------------ measuring
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_ms(action: Callable[[], Any], repeats: int, device: torch.device) -> list[float]:
    """Milliseconds of each of ``repeats`` calls of ``action``: between two CUDA events recorded
    on the current stream, without synchronising between calls; on a CPU, by the host clock."""
    if device.type == "cuda":
        pairs = []
        synchronize(device)
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            action()
            end.record()
            pairs.append((start, end))
        synchronize(device)
        return [start.elapsed_time(end) for start, end in pairs]
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        action()
        times.append(1000 * (time.perf_counter() - start))
    return times


def free_memory(device: torch.device) -> None:
    """Collect what the last method left and start a new peak."""
    gc.collect()
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_mib(device: torch.device) -> float:
    if device.type == "cuda":
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) / MiB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def copy_bandwidth(device: torch.device, tiny: bool) -> dict[str, Any]:
    """Device-to-device copy bandwidth (bytes read + written per second, median of the copies of
    a 1 GiB fp32 tensor on a GPU, 16 MiB tiny), with the vendor's HBM figure where known."""
    numel = (1 << 22) if tiny or device.type != "cuda" else (1 << 28)
    source = torch.ones(numel, device=device)
    target = torch.empty_like(source)
    target.copy_(source)
    median_ms = statistics.median(timed_ms(lambda: target.copy_(source), 10, device))
    measured = 2 * source.nbytes / (median_ms / 1000)
    name = device_name(device)
    nominal = next((value for key, value in NOMINAL_BANDWIDTH.items() if key in name), None)
    return {"measured_bytes_per_s": measured, "copy_bytes": source.nbytes, "copy_ms": median_ms,
            "nominal_bytes_per_s": nominal}


def minimum_bytes(method: str, perturbation: Any) -> int:
    """The bytes perturb() + restore() must move (see the module docstring for the counts)."""
    total = 0
    for parameter in perturbation.parameters:
        weight = parameter.element_size()
        gradient = parameter.grad.element_size() if parameter.grad is not None else weight
        if method in ("nusam", "nusam_compiled"):
            total += parameter.numel() * (2 * perturbation.power_iterations * gradient + 4 * weight)
        else:
            total += parameter.numel() * (2 * gradient + 5 * weight)
    return total


def make_step(method: str, model: nn.Module, spec: ModelSpec,
              device: torch.device) -> tuple[Callable[[], None], Any]:
    """One training step of ``method`` on a fixed batch (and the perturbation, for νSAM and SAM)."""
    from lightning_nusam.engine import LossPasses, StepEngine
    from lightning_nusam.perturbations import L2Perturbation, NuclearPerturbation

    inputs, labels = spec.make_batch(device)

    def loss(batch: Any = None, batch_idx: int = 0) -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return nn.functional.cross_entropy(spec.logits(model, inputs).float(), labels)

    def forward_backward() -> None:
        loss().backward()

    if method == "peer_sam":
        from pytorch_optimizer import SAM

        peer = SAM(model.parameters(), torch.optim.AdamW, rho=RHO, lr=LR)

        def closure() -> None:
            peer.zero_grad()
            forward_backward()

        def peer_step() -> None:
            forward_backward()
            peer.step(closure)
            peer.zero_grad()

        return peer_step, None
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    if method == "adamw":
        def adamw_step() -> None:
            forward_backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return adamw_step, None
    if method == "two_pass":
        def two_pass_step() -> None:
            forward_backward()
            optimizer.zero_grad(set_to_none=True)
            forward_backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return two_pass_step, None
    if method not in PERTURBING:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    if method == "sam":
        perturbation = L2Perturbation(model, rho=RHO)
    else:
        perturbation = NuclearPerturbation(model, rho=RHO,
                                           execution="compiled" if method == "nusam_compiled" else "eager")
    engine, passes, micro_batches = StepEngine(model, perturbation), LossPasses(loss), [((inputs, labels), 0)]

    def engine_step() -> None:
        engine.step(passes, micro_batches, optimizer)

    return engine_step, perturbation


def measure(spec: ModelSpec, method: str, device: torch.device, steps: int, warmup: int,
            repeats: int) -> dict[str, Any]:
    """A fresh model: its step time, peak memory and (νSAM, SAM) perturb() + restore() alone."""
    free_memory(device)
    torch.manual_seed(0)
    model = spec.build().to(device).train()
    step, perturbation = make_step(method, model, spec, device)
    first_step_s = None
    for _ in range(warmup):
        start = time.perf_counter()
        step()
        synchronize(device)
        first_step_s = time.perf_counter() - start if first_step_s is None else first_step_s
    times = timed_ms(step, steps, device)
    row: dict[str, Any] = {"parameters": sum(p.numel() for p in model.parameters()),
                           "median_ms": statistics.median(times), "step_ms": times,
                           "peak_mib": peak_mib(device), "first_step_s": first_step_s}
    if perturbation is not None:  # the gradients of the last step's second pass are still there
        def perturb_restore() -> None:
            perturbation.perturb()
            perturbation.restore()

        perturb_restore()
        pairs = timed_ms(perturb_restore, repeats, device)
        synchronize(device)
        start = time.perf_counter()
        for _ in range(repeats):
            perturb_restore()
        host_ms = 1000 * (time.perf_counter() - start) / repeats
        synchronize(device)
        row.update(perturbed_tensors=len(perturbation.parameters),
                   perturbed_numel=sum(p.numel() for p in perturbation.parameters),
                   perturb_restore_ms=statistics.median(pairs), perturb_restore_host_ms=host_ms,
                   perturb_restore_kernels=gpu_activities(perturb_restore, device),
                   minimum_bytes=minimum_bytes(method, perturbation))
    return row


def gpu_activities(action: Callable[[], Any], device: torch.device) -> int | None:
    """How many kernels, copies and fills one call of ``action`` launches on the GPU (counted by
    ``torch.profiler``); None on a CPU or where the profiler cannot tell."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    try:
        synchronize(device)
        with profile(activities=[ProfilerActivity.CUDA]) as profiler:
            action()
            synchronize(device)
        return sum(1 for event in profiler.events() if event.device_type == torch.autograd.DeviceType.CUDA)
    except Exception:  # a profiler that cannot run here: the column stays empty
        traceback.print_exc()
        return None


def run_model(key: str, spec: ModelSpec, methods: list[str], device: torch.device, steps: int, warmup: int,
              repeats: int, rows_path: Path) -> None:
    """Every method on ``spec``, each in its own try/except; each row is appended to ``rows_path``."""
    for method in methods:
        row: dict[str, Any] = {"model": key, "label": spec.label, "batch_size": spec.batch_size,
                               "method": method}
        try:
            if method == "peer_sam" and importlib.util.find_spec("pytorch_optimizer") is None:
                row["unavailable"] = "pytorch_optimizer is not installed"
            else:
                row.update(measure(spec, method, device, steps, warmup, repeats))
        except Exception as error:  # recorded in the table; the next method runs
            traceback.print_exc()
            row["error"] = f"{type(error).__name__}: {error}"[:1000]
        free_memory(device)
        with rows_path.open("a") as stream:
            stream.write(json.dumps(row) + "\n")
        shown = (f"{row['median_ms']:9.2f} ms  {row['peak_mib']:9.0f} MiB" if "median_ms" in row
                 else row.get("error") or row.get("unavailable"))
        print(f"  {key:10s} {method:9s} {shown}", flush=True)


# ------------------------------------------------------------------------------------ the tier
def run_tier(out: Path, timeout_s: float, env: dict[str, str]) -> dict[str, Any]:
    """``pytest tests/test_cuda.py`` in a child process: its outcomes from the junit xml (or, if it
    was stopped, from its log), its summary line and exit status."""
    xml, log = out / "cuda_tier.xml", out / "cuda_tier.log"
    xml.unlink(missing_ok=True)
    command = [sys.executable, "-m", "pytest", "tests/test_cuda.py", "-v", "-rfEs", "-p", "no:cacheprovider",
               f"--junitxml={xml}"]
    if importlib.util.find_spec("pytest_timeout") is not None:
        command.append("--timeout=120")
    started = time.monotonic()
    with log.open("w") as stream:
        try:
            returncode: int | None = subprocess.run(command, cwd=REPO, env=env, stdout=stream,
                                                    stderr=subprocess.STDOUT, timeout=timeout_s).returncode
        except subprocess.TimeoutExpired:
            returncode = None
    text = log.read_text(errors="replace")
    result = summarize_junit(xml) if xml.exists() else summarize_log(text)
    lines = [line.strip("= ") for line in text.splitlines()
             if re.search(r"\d+ (passed|failed|skipped|error)", line) and " in " in line]
    result.update(command=shlex.join(command[1:]), returncode=returncode, wall_s=time.monotonic() - started,
                  summary_line=lines[-1] if lines else None,
                  timed_out=returncode is None)
    return result


def summarize_junit(path: Path) -> dict[str, Any]:
    """Each test's outcome (passed, failed, error, skipped), time and first message line."""
    tests = []
    for case in ElementTree.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("error", "failure", "skipped"):
            found = case.find(tag)
            if found is not None:
                outcome = {"failure": "failed"}.get(tag, tag)
                message = (found.get("message") or found.text or "").strip().splitlines()[:1]
                message = message[0][:300] if message else ""
                break
        tests.append({"name": case.get("name"), "outcome": outcome, "time_s": float(case.get("time") or 0),
                      "message": message})
    return {"tests": tests, "counts": count_outcomes(tests)}


def summarize_log(text: str) -> dict[str, Any]:
    """The outcomes a ``pytest -v`` log shows (a run stopped before it wrote its xml)."""
    found = re.findall(r"::(\S+) (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)", text)
    tests = [{"name": name, "outcome": outcome.lower().replace("xfail", "skipped"), "time_s": None,
              "message": ""} for name, outcome in found]
    return {"tests": tests, "counts": count_outcomes(tests)}


def count_outcomes(tests: list[dict[str, Any]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for test in tests:
        counts[test["outcome"]] = counts.get(test["outcome"], 0) + 1
    return counts


# ------------------------------------------------------------------------------------ the report
def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"


def add_ratios(rows: list[dict[str, Any]], bandwidth: float | None) -> None:
    """× two passes, × AdamW, peak memory against AdamW's, the bandwidth limit and × limit."""
    by_key = {(r["model"], r["method"]): r for r in rows if "median_ms" in r}
    for row in rows:
        if "median_ms" not in row:
            continue
        for reference, name in (("two_pass", "x_two_pass"), ("adamw", "x_adamw")):
            other = by_key.get((row["model"], reference))
            row[name] = row["median_ms"] / other["median_ms"] if other else None
        adamw = by_key.get((row["model"], "adamw"))
        row["peak_vs_adamw_mib"] = row["peak_mib"] - adamw["peak_mib"] if adamw else None
        if "minimum_bytes" in row and bandwidth:
            row["limit_ms"] = 1000 * row["minimum_bytes"] / bandwidth
            row["x_limit"] = row["perturb_restore_ms"] / row["limit_ms"]


def number(value: Any, digits: int = 2, signed: bool = False) -> str:
    if not isinstance(value, int | float) or not math.isfinite(value):
        return "–"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def markdown(report: dict[str, Any]) -> str:
    settings, bandwidth = report["settings"], report.get("bandwidth") or {}
    lines = [f"# GPU check on {report['device_name']}", "",
             f"torch {report['torch']} (CUDA {report['cuda']}), Python {report['python']}; "
             f"{'tiny models; ' if settings['tiny'] else ''}command: `{report['command']}`; "
             f"{report['elapsed_s']:.0f} s.", ""]
    tier = report.get("tier")
    if tier:
        counts = ", ".join(f"{n} {outcome}" for outcome, n in sorted(tier["counts"].items())) or "no test ran"
        stopped = " (stopped at its time limit)" if tier["timed_out"] else ""
        lines += [f"## CUDA tier: {counts}{stopped}", "",
                  f"`{tier['command']}`: {tier.get('summary_line') or 'no summary line'} (exit status "
                  f"{tier['returncode']}).", "",
                  "| test | outcome | time (s) | message |", "|---|---|---:|---|"]
        for test in tier["tests"]:
            message = test["message"].replace("|", "\\|")
            lines.append(f"| {test['name']} | {test['outcome']} | {number(test['time_s'], 1)} | {message} |")
        lines.append("")
    if bandwidth:
        nominal = bandwidth.get("nominal_bytes_per_s")
        lines += [f"Copy bandwidth measured: {bandwidth['measured_bytes_per_s'] / 1e9:.0f} GB/s (read + "
                  f"write of a {bandwidth['copy_bytes'] / MiB:.0f} MiB copy)"
                  + (f"; nominal HBM bandwidth {nominal / 1e9:.0f} GB/s" if nominal else "")
                  + ". The limits below use the measured figure.", ""]
    lines += ["## Step benchmark", "",
              f"bf16 autocast, AdamW (lr {LR}), ρ = {RHO}. Step: median of {settings['steps']} steps after "
              f"{settings['warmup']} warm-up steps"
              + (", each between two CUDA events" if report["device"].startswith("cuda") else "")
              + f". Peak: {report['memory']}. perturb + restore: median of {settings['repeats']} pairs, and "
              "the host time to issue one; limit: the bytes it must move (νSAM (2T·g + 4·w), SAM (2·g + 5·w) "
              "per perturbed entry) over the measured copy bandwidth.", ""]
    rows = report["rows"]
    for key in settings["models"]:
        group = [r for r in rows if r["model"] == key]
        error = report["errors"].get(key)
        if not group:
            lines += [f"### {key}: {error or 'not measured'}", ""]
            continue
        first = next((r for r in group if "parameters" in r), group[0])
        params = f" ({first['parameters']:,} parameters)" if "parameters" in first else ""
        nusam = next((r for r in group if r["method"] == "nusam" and r.get("x_two_pass")), None)
        lines += [f"### {first['label']}, batch {first['batch_size']}{params}", ""]
        if nusam:
            lines += [f"νSAM / two passes = {nusam['x_two_pass']:.3f}", ""]
        if error:
            lines += [f"({error})", ""]
        lines += ["| method | step (ms) | × two passes | × AdamW | peak (MiB) | vs AdamW (MiB) "
                  "| perturb + restore (ms) | host (ms) | GPU launches | limit (ms) | × limit "
                  "| first step (s) |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in group:
            if "median_ms" not in r:
                lines.append(f"| {r['method']} | n/a ({r.get('unavailable') or r.get('error')}) |"
                             + " |" * 10)
                continue
            lines.append(
                f"| {r['method']} | {number(r['median_ms'])} | {number(r.get('x_two_pass'), 3)} | "
                f"{number(r.get('x_adamw'), 3)} | {number(r['peak_mib'], 0)} | "
                f"{number(r.get('peak_vs_adamw_mib'), 0, signed=True)} | "
                f"{number(r.get('perturb_restore_ms'), 3)} | "
                f"{number(r.get('perturb_restore_host_ms'), 3)} | "
                f"{number(r.get('perturb_restore_kernels'), 0)} | {number(r.get('limit_ms'), 3)} | "
                f"{number(r.get('x_limit'), 1)} | "
                f"{number(r.get('first_step_s'), 1)} |")
        lines.append("")
    for section, error in report["errors"].items():
        if section not in settings["models"]:
            lines += [f"Error in {section}: {error}", ""]
    return "\n".join(lines)


def write_report(out: Path, report: dict[str, Any]) -> None:
    """``gpu_check.json`` and ``gpu_check.md``, each replaced whole (a reader never sees half)."""
    for name, text in (("gpu_check.json", json.dumps(report, indent=1)), ("gpu_check.md", markdown(report))):
        partial = out / f".{name}.partial"
        partial.write_text(text + "\n")
        os.replace(partial, out / name)


def read_rows(path: Path) -> list[dict[str, Any]]:
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a child stopped while writing its last line
            continue
    return rows


def child_environment() -> dict[str, str]:
    """This environment with ``src`` first on PYTHONPATH (what else is there, such as a folder of
    wheels installed with ``--target``, stays)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO / "src"), env.get("PYTHONPATH")) if p)
    return env


# ------------------------------------------------------------------------------------ main
def default_methods(device: torch.device) -> list[str]:
    """Every method on CUDA; on another device, all but :data:`CUDA_ONLY_METHODS`."""
    return [m for m in METHODS if device.type == "cuda" or m not in CUDA_ONLY_METHODS]


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default %(default)s)")
    parser.add_argument("--tiny", action="store_true",
                        help="tiny models and 2 steps (the default without CUDA)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=None,
                        help="default: all on CUDA; elsewhere all but " + ", ".join(CUDA_ONLY_METHODS))
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 10; tiny 2)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 3; tiny 1)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed perturb+restore pairs (default 20; tiny 3)")
    parser.add_argument("--no-tier", action="store_true",
                        help="skip the CUDA tier (pytest tests/test_cuda.py)")
    parser.add_argument("--tier-timeout-s", type=float, default=180.0)
    parser.add_argument("--model-timeout-s", type=float, default=240.0,
                        help="per model, its compilation for nusam_compiled included (default %(default)s)")
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="models that would start after this many seconds are skipped "
                             "(default %(default)s)")
    parser.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                        help="each model in a child process (default: on CUDA)")
    parser.add_argument("--child", choices=MODELS, help=argparse.SUPPRESS)
    parser.add_argument("--rows", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    started = time.monotonic()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tiny = args.tiny or device.type != "cuda"
    steps = args.steps or (2 if tiny else 10)
    warmup = args.warmup if args.warmup is not None else (1 if tiny else 3)
    repeats = args.repeats or (3 if tiny else 20)
    specs = model_specs(tiny)
    args.methods = args.methods or default_methods(device)
    if args.child:  # one model, in its own process; its rows go to args.rows
        run_model(args.child, specs[args.child], args.methods, device, steps, warmup, repeats, args.rows)
        return 0

    out = args.out.resolve()  # the children run in the repository's root
    out.mkdir(parents=True, exist_ok=True)
    isolate = device.type == "cuda" if args.isolate is None else args.isolate
    report: dict[str, Any] = {
        "device": str(device), "device_name": device_name(device), "torch": torch.__version__,
        "cuda": torch.version.cuda, "python": platform.python_version(),
        "command": "python benchmarks/gpu_check.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "memory": ("torch.cuda.max_memory_allocated from a fresh model's creation to the end of its steps"
                   if device.type == "cuda" else "peak RSS of the process (it only grows: not per method)"),
        "settings": {"tiny": tiny, "steps": steps, "warmup": warmup, "repeats": repeats,
                     "models": args.models, "methods": args.methods, "isolate": isolate,
                     "rho": RHO, "lr": LR},
        "bandwidth": None, "tier": None, "rows": [], "errors": {}, "elapsed_s": 0.0,
    }

    def save() -> None:
        report["elapsed_s"] = time.monotonic() - started
        add_ratios(report["rows"], (report["bandwidth"] or {}).get("measured_bytes_per_s"))
        write_report(out, report)

    print(f"{report['device_name']}, torch {torch.__version__}; writing to {out}", flush=True)
    save()
    try:
        report["bandwidth"] = copy_bandwidth(device, tiny)
        print(f"copy bandwidth {report['bandwidth']['measured_bytes_per_s'] / 1e9:.0f} GB/s", flush=True)
    except Exception as error:
        traceback.print_exc()
        report["errors"]["bandwidth"] = f"{type(error).__name__}: {error}"
    free_memory(device)
    save()
    env = child_environment()
    if not args.no_tier:
        print("CUDA tier: pytest tests/test_cuda.py", flush=True)
        try:
            report["tier"] = run_tier(out, args.tier_timeout_s, env)
            print(f"CUDA tier: {report['tier']['summary_line']} ({report['tier']['counts']})", flush=True)
        except Exception as error:
            traceback.print_exc()
            report["errors"]["tier"] = f"{type(error).__name__}: {error}"
        save()
    rows_path = out / "gpu_check_rows.jsonl"
    rows_path.write_text("")
    for key in args.models:
        remaining = args.budget_s - (time.monotonic() - started)
        if remaining < 20:
            report["errors"][key] = f"skipped: {args.budget_s:.0f} s budget spent"
            print(f"{key}: {report['errors'][key]}", flush=True)
            continue
        print(f"{key}: {specs[key].label}, batch {specs[key].batch_size}", flush=True)
        try:
            if isolate:
                command = [sys.executable, str(Path(__file__).resolve()), "--child", key,
                           "--rows", str(rows_path), "--device", str(device), "--steps", str(steps),
                           "--warmup", str(warmup), "--repeats", str(repeats), "--methods", *args.methods]
                command += ["--tiny"] if tiny else []
                result = subprocess.run(command, cwd=REPO, env=env, check=False,
                                        timeout=min(args.model_timeout_s, remaining))
                if result.returncode != 0:
                    report["errors"][key] = f"its process ended with status {result.returncode}"
            else:
                run_model(key, specs[key], args.methods, device, steps, warmup, repeats, rows_path)
        except subprocess.TimeoutExpired:
            report["errors"][key] = f"stopped after {min(args.model_timeout_s, remaining):.0f} s"
        except Exception as error:
            traceback.print_exc()
            report["errors"][key] = f"{type(error).__name__}: {error}"
        report["rows"] = read_rows(rows_path)
        save()
    print("\n" + markdown(report), flush=True)
    tier = report["tier"] or {}
    failed = tier.get("counts", {}).get("failed", 0) + tier.get("counts", {}).get("error", 0)
    broken = report["errors"] or any("error" in r for r in report["rows"]) or tier.get("timed_out")
    return 1 if failed or broken else 0


if __name__ == "__main__":
    sys.exit(main())
