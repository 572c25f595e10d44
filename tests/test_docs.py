"""Every Python block of the README and of the documentation pages (docs/**/*.md) runs as written,
alone, in a fresh namespace and an empty working directory, and does what it says: every Trainer
it fits finishes with steps taken, every sharpness-aware callback on it perturbed, every
perturbation it built perturbed and was restored. A block that cannot run alone is preceded by
``<!-- not-run: reason -->`` (or opens with ```python title="fragment"); there are few."""

from __future__ import annotations

import contextlib
import io
import re
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import pytest
import torch

from lightning_nusam import SharpnessAwareCallback
from lightning_nusam.optim import SAMOptimizer
from lightning_nusam.perturbations import Perturbation

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
BLOCK = re.compile(r"^(?:<!--\s*not-run:\s*(?P<reason>[^>]*?)\s*-->\n)?"  # the mark of a fragment
                   r"```python(?P<info>[^\n]*)\n(?P<code>.*?)^```", re.M | re.S)


@dataclass(frozen=True)
class Block:
    page: str
    line: int
    code: str
    not_run: str | None  # the reason, for a block marked as a fragment

    @property
    def name(self) -> str:
        return f"{self.page}:{self.line}"


def python_blocks() -> list[Block]:
    blocks = []
    for page in PAGES:
        text = page.read_text()
        for match in BLOCK.finditer(text):
            fragment = 'title="fragment"' in match["info"]
            line = text.count("\n", 0, match.start("code"))  # the ```python line, 1-based
            blocks.append(Block(str(page.relative_to(ROOT)), line, match["code"],
                                match["reason"] or ("fragment" if fragment else None)))
    return blocks


BLOCKS = python_blocks()
RUN = [b for b in BLOCKS if b.not_run is None]


@pytest.fixture
def fitted(monkeypatch) -> list[L.Trainer]:
    """The Trainers whose ``fit`` a block calls, wherever it builds them (a function, a loop)."""
    trainers: list[L.Trainer] = []
    fit = L.Trainer.fit

    def recording_fit(self, *args, **kwargs):
        trainers.append(self)
        return fit(self, *args, **kwargs)

    monkeypatch.setattr(L.Trainer, "fit", recording_fit)
    return trainers


def run_block(block: Block, tmp_path: Path, monkeypatch) -> tuple[dict, str]:
    monkeypatch.chdir(tmp_path)  # logs and checkpoints of the examples go there
    torch.manual_seed(0)
    namespace: dict = {"__name__": "__main__"}
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(block.code, block.name, "exec"), namespace)
    return namespace, printed.getvalue()


def check_what_it_ran(block: Block, namespace: dict, fitted: list[L.Trainer]) -> None:
    for trainer in fitted:
        assert trainer.state.finished and trainer.state.fn == "fit", block.name
        assert trainer.global_step > 0, block.name
        for callback in trainer.callbacks:
            if isinstance(callback, SharpnessAwareCallback):
                assert callback.perturbation.steps > 0 and not callback.perturbation.is_perturbed, block.name
        for optimizer in trainer.optimizers:
            if isinstance(optimizer, SAMOptimizer):
                assert optimizer.perturbation.steps == trainer.global_step, block.name
    perturbations = [v for v in namespace.values() if isinstance(v, Perturbation)]
    perturbations += [v.perturbation for v in namespace.values()  # a SAMOptimizer's, a StepEngine's
                      if isinstance(getattr(v, "perturbation", None), Perturbation)]
    for perturbation in perturbations:
        assert perturbation.steps > 0 and not perturbation.is_perturbed, block.name
    assert fitted or perturbations, f"{block.name} neither fits a Trainer nor builds a perturbation"


README_EXAMPLE = next(b for b in BLOCKS if b.page == "README.md")
(RHO_COMPARISON,) = [b for b in BLOCKS if "def validation_accuracy" in b.code]
OTHERS = [b for b in RUN if b not in (README_EXAMPLE, RHO_COMPARISON)]  # these two have their own test


@pytest.mark.parametrize("block", OTHERS, ids=[b.name for b in OTHERS])
def test_every_python_block_runs_as_written(block, tmp_path, monkeypatch, fitted):
    namespace, _ = run_block(block, tmp_path, monkeypatch)
    check_what_it_ran(block, namespace, fitted)


def test_the_readme_example_learns_the_digits_with_nusam(tmp_path, monkeypatch, fitted):
    assert "trainer.fit(" in README_EXAMPLE.code and "NuSAM(" in README_EXAMPLE.code  # the complete one
    namespace, printed = run_block(README_EXAMPLE, tmp_path, monkeypatch)
    check_what_it_ran(README_EXAMPLE, namespace, fitted)
    (trainer,) = fitted
    accuracy = float(re.search(r"validation accuracy: ([0-9.]+)", printed).group(1))
    assert accuracy > 0.8  # 10 classes: chance is 0.1
    assert trainer.current_epoch == 3 and trainer.callback_metrics["sam/active_epoch"] == 1.0
    assert (tmp_path / "lightning_logs").is_dir()  # a Trainer's defaults, in the working directory


def test_the_rho_comparison_prints_one_accuracy_per_rho(tmp_path, monkeypatch, fitted):
    namespace, printed = run_block(RHO_COMPARISON, tmp_path, monkeypatch)
    check_what_it_ran(RHO_COMPARISON, namespace, fitted)
    rows = re.findall(r"rho=(\S+): validation accuracy ([0-9.]+)", printed)
    assert [rho for rho, _ in rows] == ["None", "0.01", "0.05", "0.2"]
    assert len(fitted) == 4 and not any(isinstance(c, SharpnessAwareCallback) for c in fitted[0].callbacks)
    assert all(0.0 <= float(accuracy) <= 1.0 for _, accuracy in rows)


def test_fragments_are_rare_and_say_why():
    fragments = [b for b in BLOCKS if b.not_run is not None]
    assert len(fragments) <= 3, [b.name for b in fragments]
    assert all(b.not_run.strip() for b in fragments)
    assert len(RUN) >= 10  # the README, the landing page and the guide pages


def test_every_page_is_in_the_site_navigation():
    import yaml

    def pages(entry) -> list[str]:
        if isinstance(entry, str):
            return [entry]
        if isinstance(entry, list):
            return [p for item in entry for p in pages(item)]
        return [p for value in entry.values() for p in pages(value)]

    config = yaml.load((ROOT / "mkdocs.yml").read_text(), Loader=yaml.BaseLoader)
    in_nav = set(pages(config["nav"]))
    on_disk = {str(p.relative_to(ROOT / "docs")) for p in (ROOT / "docs").rglob("*.md")}
    assert in_nav == on_disk
