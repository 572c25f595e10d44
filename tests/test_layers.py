"""The package's layers: imports point one way (no cycle, function-local and ``TYPE_CHECKING``
imports included), the layers below the Lightning one import no Lightning, and the pure-PyTorch
modules load without Lightning or torchvision installed."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "lightning_nusam"

#: each layer may import from itself and the layers before it, never from a later one
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("core", ("checks", "perturbations")),
    ("step", ("plan", "step_options", "pass_state", "radius_watch", "policy", "engine")),
    ("torch ways in", ("optim", "fabric")),
    ("lightning", ("lightning",)),
    ("applications", ("models", "data", "usage", "runs", "packaged_configs", "memory", "cli", "demo",
                      "callbacks", "module", "__main__", "")),
]
#: the layers that never import Lightning (Fabric's helpers import it only when called with a Fabric)
WITHOUT_LIGHTNING = ("core", "step", "torch ways in")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SOURCE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(path): path for path in sorted((SOURCE / PACKAGE).rglob("*.py"))}


def imports(name: str) -> list[tuple[str, bool]]:
    """``(imported module, at module level outside TYPE_CHECKING)`` for every import in ``name``'s
    file; ``from package import submodule`` counts as an import of the submodule."""
    tree = ast.parse(MODULES[name].read_text())
    package = name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]
    found: list[tuple[str, bool]] = []

    def visit(node: ast.AST, top_level: bool) -> None:
        for child in ast.iter_child_nodes(node):
            function = isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            nested = top_level and not function
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                nested = False
            if isinstance(child, ast.Import):
                found.extend((alias.name, top_level) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:  # relative: from the package, up level - 1
                    parent = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join([*parent, base]).strip(".")
                for alias in child.names:
                    submodule = f"{base}.{alias.name}"
                    found.append((submodule if submodule in MODULES else base, top_level))
            visit(child, nested)

    visit(tree, True)
    return found


def layer_of(name: str) -> int:
    relative = name.removeprefix(PACKAGE).lstrip(".")
    first = relative.split(".")[0]
    for index, (_, members) in enumerate(LAYERS):
        if first in members:
            return index
    raise AssertionError(f"{name} belongs to no layer: add it to LAYERS")


GRAPH = {name: sorted({target for target, _ in imports(name)
                       if target.split(".")[0] == PACKAGE and target != name}) for name in MODULES}


def test_every_module_is_in_a_layer() -> None:
    for name in MODULES:
        layer_of(name)


def test_there_is_no_import_cycle() -> None:
    """Tarjan's strongly connected components over the package's import graph."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in GRAPH.get(node, []):
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in GRAPH:
        if node not in index:
            connect(node)
    assert not cycles, cycles


def test_imports_point_down_the_layers() -> None:
    upward = [(name, target) for name, targets in GRAPH.items() for target in targets
              if target in MODULES and layer_of(target) > layer_of(name)]
    assert not upward, upward


@pytest.mark.parametrize("name", [n for n in MODULES if LAYERS[layer_of(n)][0] in WITHOUT_LIGHTNING])
def test_the_layers_below_lightning_import_no_lightning(name: str) -> None:
    found = [(target, top) for target, top in imports(name)
             if target.split(".")[0] in ("lightning", "pytorch_lightning")]
    if name == f"{PACKAGE}.fabric":  # only inside the helpers that are given a Fabric
        found = [(target, top) for target, top in found if top]
    assert not found, found


def test_the_pure_pytorch_modules_load_without_lightning_and_torchvision() -> None:
    """In a fresh interpreter where ``lightning``, ``pytorch_lightning`` and ``torchvision`` cannot
    be imported: the core, the step, SAMOptimizer (one step), Fabric's helpers and the resumable
    data loader."""
    code = """
import importlib.abc, sys

class Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("lightning", "pytorch_lightning", "torchvision"):
            raise ImportError(f"{name} is not installed here")

sys.meta_path.insert(0, Blocked())
import torch
import lightning_nusam.engine, lightning_nusam.fabric, lightning_nusam.policy, lightning_nusam.plan
from lightning_nusam.data.resumable import ResumableDataLoader
from lightning_nusam.optim import SAMOptimizer
from lightning_nusam.perturbations import NuclearPerturbation

model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
optimizer = SAMOptimizer(NuclearPerturbation(model, rho=0.1), torch.optim.SGD(model.parameters(), lr=0.1))
x, y = torch.randn(6, 4), torch.randint(0, 2, (6,))

def closure():
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    return loss

optimizer.step(closure)
loader = ResumableDataLoader(torch.utils.data.TensorDataset(x, y), batch_size=2, shuffle=True, seed=0)
assert len(list(loader)) == 3
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


def test_the_old_import_paths_work_with_a_deprecation_warning() -> None:
    import lightning_nusam

    for old, name in [("lightning_nusam.callbacks", "NuSAM"), ("lightning_nusam.callbacks", "sam_pass"),
                      ("lightning_nusam.module", "SAMMixin")]:
        module = __import__(old, fromlist=[name])
        with pytest.warns(DeprecationWarning, match=f"{old}.{name} moved to"):
            assert getattr(module, name) is getattr(lightning_nusam, name)
