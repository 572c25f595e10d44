"""Where test failures point: inject one small bug at a time into a copy of ``src/`` and record
which test files (and how many tests in each) fail.

Each bug is one textual replacement in one module of ``lightning_nusam``, made in a temporary
copy of the source tree that ``PYTHONPATH`` points the test run at; the working tree is never
changed, and the copy is removed afterwards. The goal (issue 30): a bug in one module fails tests
named for it (a drop-in bug in ``test_dropin.py``, a mixin bug in ``test_mixin.py``, ...).

    .venv/bin/python benchmarks/failure_pointing.py                    # every bug, the default files
    .venv/bin/python benchmarks/failure_pointing.py --bugs engine-batchnorm --files tests/test_engine.py
    .venv/bin/python benchmarks/failure_pointing.py --out pointing.json  # the table as JSON too
    .venv/bin/python benchmarks/failure_pointing.py --bugs none --durations=0  # (pytest options pass through)

Without ``--files``, the Lightning-layer test files of issue 30 that exist are run. ``--bugs
none`` runs the unchanged copy (every listed file must pass).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Bug:
    module: str  # relative to src/lightning_nusam
    old: str  # must occur exactly once
    new: str
    what: str


BUGS = {
    "none": Bug("engine.py", "", "", "no bug: the unchanged source"),
    "dropin-first-loss": Bug(
        "lightning/dropin.py",
        "if isinstance(loss, torch.Tensor) and self._host_ran_first_pass:",
        "if False:",
        "the drop-in forgets Lightning's first-pass loss (the step's clean loss is never recorded)"),
    "dropin-after-backward": Bug(
        "lightning/dropin.py",
        "if self._own_pass or self.owner.inert:  # the engine follows",
        "if True:  # the engine follows",
        "the drop-in skips the engine's after_backward for Lightning's own backward"),
    "mixin-clipping": Bug(
        "lightning/mixin.py",
        "if self.gradient_clip_val is not None:\n            self.clip_gradients(",
        "if False:\n            self.clip_gradients(",
        "the mixin never clips (gradient_clip_val ignored)"),
    "engine-batchnorm": Bug(
        "engine.py",
        'batchnorm_update == "first":\n                stack.enter_context(frozen_',
        'batchnorm_update == "second":\n                stack.enter_context(frozen_',
        "the engine freezes BatchNorm statistics in the wrong pass (the default 'first' updates both)"),
    "callback-state-first-step": Bug(
        "lightning/callback.py",
        '"first_step": self._first_step,',
        '"first_step": None,',
        "the callback's state_dict drops the schedule's first step"),
}

DEFAULT_FILES = [
    "tests/test_dropin.py", "tests/test_mixin.py", "tests/test_callback.py", "tests/test_engine.py",
    "tests/test_ways_in.py", "tests/test_accumulation.py", "tests/test_real_programs.py",
    "tests/test_lightning_step.py", "tests/test_lightning_errors_and_checkpoints.py",
    "tests/test_side_effects.py", "tests/test_coverage_and_programs.py", "tests/test_one_pass.py",
    "tests/test_schedules.py", "tests/test_sam_optimizer.py", "tests/test_fabric.py",
]

FAILED = re.compile(r"^(FAILED|ERROR) (tests/[\w/]+\.py)(::\S+)?")
SUMMARY = re.compile(r"(\d+ (passed|failed|errors?)\b.*) in ([\d.]+)s")


def copy_with_bug(bug: Bug, destination: Path) -> Path:
    """``src/`` copied to ``destination`` with ``bug`` applied; returns the copy's ``src``."""
    source = destination / "src"
    shutil.copytree(ROOT / "src", source, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    if bug.old:
        path = source / "lightning_nusam" / bug.module
        text = path.read_text()
        if text.count(bug.old) != 1:
            raise SystemExit(f"{bug.module}: the text to replace occurs {text.count(bug.old)} times, "
                             f"not once (the source moved: update BUGS)\n{bug.old}")
        path.write_text(text.replace(bug.old, bug.new))
    return source


def run(bug_name: str, files: list[str], extra: list[str]) -> dict:
    bug = BUGS[bug_name]
    with tempfile.TemporaryDirectory(prefix=f"pointing-{bug_name}-") as folder:
        source = copy_with_bug(bug, Path(folder))
        env = {**os.environ, "PYTHONPATH": str(source), "PYTHONDONTWRITEBYTECODE": "1"}
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE",
                   "--no-header", *extra, *files]
        start, cpu = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
        result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu_seconds = after.ru_utime + after.ru_stime - cpu.ru_utime - cpu.ru_stime
    failures: dict[str, list[str]] = collections.defaultdict(list)
    for line in result.stdout.splitlines():
        match = FAILED.match(line)
        if match:
            failures[match.group(2)].append((match.group(3) or "").removeprefix("::"))
    summary = next((m.group(1) for m in map(SUMMARY.search, result.stdout.splitlines()[::-1]) if m), "?")
    return {"bug": bug_name, "what": bug.what, "files": {f: len(v) for f, v in sorted(failures.items())},
            "tests": {f: sorted(set(v)) for f, v in sorted(failures.items())},
            "summary": summary, "seconds": round(seconds, 1), "cpu_seconds": round(cpu_seconds, 1),
            "returncode": result.returncode}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bugs", default=",".join(b for b in BUGS if b != "none"),
                        help=f"comma-separated, from: {', '.join(BUGS)}")
    parser.add_argument("--files", nargs="*", default=None,
                        help="test files (default: the Lightning layer's)")
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    parser.add_argument("--names", action="store_true", help="list the failing tests too")
    args, extra = parser.parse_known_args(argv)
    files = args.files or [f for f in DEFAULT_FILES if (ROOT / f).exists()]
    results = []
    for name in args.bugs.split(","):
        outcome = run(name, files, extra)
        results.append(outcome)
        failing = ", ".join(f"{Path(f).name} {n}" for f, n in outcome["files"].items()) or "nothing fails"
        print(f"| {name} | {failing} | {outcome['summary']} | {outcome['seconds']:.0f} s "
              f"({outcome['cpu_seconds']:.0f} s CPU) |", flush=True)
        if args.names:
            for file, tests in outcome["tests"].items():
                for test in tests:
                    print(f"    {file}::{test}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
