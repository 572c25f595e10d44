"""The package as a user installs it: a wheel in a folder outside the clone, run from an empty
directory; configs by name; outputs in the working directory, none in the installed package."""

import os
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

import lightning_nusam
from lightning_nusam.packaged_configs import available_configs, copy_config, resolve_config_arguments

ROOT = Path(__file__).resolve().parents[1]


def run(command: list[str], cwd: Path, env: dict[str, str], timeout: int = 600) -> str:
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{command}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def files_below(folder: Path) -> set[Path]:
    return {p.relative_to(folder) for p in folder.rglob("*") if "__pycache__" not in p.parts}


#: what the extras and the development tools install (modules and their distributions' metadata),
#: and this project's own installation: left out of the base install below
NOT_BASE = ("sklearn", "scikit_learn", "matplotlib", "mpl_toolkits", "transformers", "tokenizers", "pdoc",
            "pytorch_optimizer", "lightning_nusam", "__editable__", "_lightning_nusam")


def base_dependencies(folder: Path) -> Path:
    """A folder of links to what this test's environment holds, without the extras' packages."""
    folder.mkdir()
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        if not entry.name.replace("-", "_").startswith(NOT_BASE) and entry.suffix != ".pth":
            (folder / entry.name).symlink_to(entry)
    return folder


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    wheels = tmp_path_factory.mktemp("wheels")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w",
         str(wheels), str(ROOT)], cwd=wheels, env=env)
    (built,) = wheels.glob("lightning_nusam-0.3.0-*.whl")
    return built


def test_the_wheel_ships_the_licence_the_digits_and_the_configs(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata = archive.read("lightning_nusam-0.3.0.dist-info/METADATA").decode()
    assert "lightning_nusam-0.3.0.dist-info/licenses/LICENSE" in names
    assert {"lightning_nusam/data/digits.npz", "lightning_nusam/data/digits_source.txt",
            "lightning_nusam/configs/quickstart.yaml", "lightning_nusam/py.typed"} <= names
    assert not any(name.startswith(("examples/", "tests/")) for name in names)  # the sdist has them
    assert "License-Expression: Apache-2.0" in metadata
    assert "Requires-Dist: scikit-learn" not in metadata  # the digits need no extra
    licence = (ROOT / "LICENSE").read_text()
    assert "Apache License" in licence[:200] and "Version 2.0" in licence[:200] and len(licence) > 10_000


def test_the_sdist_has_the_examples_and_the_tests(tmp_path):
    pytest.importorskip("setuptools", minversion="77")  # what pyproject.toml's build-system requires
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    build = ("import sys; from setuptools import build_meta; "
             "print(build_meta.build_sdist(sys.argv[1]))")
    name = run([sys.executable, "-c", build, str(tmp_path)], cwd=ROOT, env=env).strip().splitlines()[-1]
    with tarfile.open(tmp_path / name) as archive:
        names = {member.split("/", 1)[1] for member in archive.getnames() if "/" in member}
    assert {"LICENSE", "examples/dropin.py", "examples/plain_pytorch.py", "tests/test_packaging.py",
            "src/lightning_nusam/data/digits.npz"} <= names


def test_the_base_install_runs_the_first_hour_from_an_empty_directory(wheel, tmp_path):
    """``pip install lightning-nusam`` (no extras), then ``nusam fit -c quickstart`` twice, ``nusam
    test`` of the checkpoint the fit printed, and ``python -m lightning_nusam.demo``, in an empty
    directory.

    How the base install is made, honestly and fast: a fresh virtualenv gets the wheel (``pip
    --python venv/bin/python install --no-deps``, so its own copy, console script included). Its
    base dependencies (torch, lightning, ...) are the ones of this test's environment, seen through
    a ``.pth`` line naming a folder of links to that environment's packages without those of the
    extras (scikit-learn, matplotlib, transformers, ...): downloading torch into every test run
    would take minutes, and importing an extra fails as on a base install. The wheel's own
    requirements (without extras) are checked against what the virtualenv sees.
    """
    venv, work = tmp_path / "venv", tmp_path / "empty"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp_path, env)
    python = venv / "bin" / "python"
    run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--quiet", str(wheel)],
        tmp_path, env)
    (site,) = (venv / "lib").glob("python3*/site-packages")
    (site / "base_dependencies.pth").write_text(f"{base_dependencies(tmp_path / 'base')}\n")

    check = ("import importlib.metadata as m, lightning_nusam, sys; from packaging.requirements import "
             "Requirement; reqs = [Requirement(r) for r in m.requires('lightning-nusam')]; "
             "base = [r for r in reqs if r.marker is None]; "
             "bad = [str(r) for r in base if m.version(r.name) not in r.specifier]; "
             "print(lightning_nusam.__file__); print(bad); import sklearn")
    result = subprocess.run([str(python), "-c", check], cwd=work, env=env, capture_output=True, text=True)
    imported, unmet = result.stdout.splitlines()[:2]
    assert Path(imported).is_relative_to(venv) and unmet == "[]", result.stdout + result.stderr
    assert "No module named 'sklearn'" in result.stderr  # the extras are not there

    nusam = str(venv / "bin" / "nusam")
    short = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=2",
             "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
    listing = run([nusam, "configs"], work, env)
    assert "quickstart" in listing and "methods/nusam" in listing and str(venv) in listing
    installed_files = files_below(venv)
    first = run([nusam, "fit", "-c", "quickstart", *short], work, env)
    second = run([nusam, "fit", "-c", "quickstart", *short], work, env)
    runs = work / "runs" / "quickstart"
    for version, output in enumerate((first, second)):  # each run its own folder, named in its output
        folder = runs / f"version_{version}"
        assert (folder / "checkpoints" / "last.ckpt").is_file() and (folder / "metrics.csv").is_file()
        assert f"this run: {Path('runs/quickstart') / f'version_{version}'}" in output
    trained = (runs / "version_1" / "metrics.csv").read_text()
    test_command = next(line for line in second.splitlines() if line.startswith("test it:"))
    assert test_command.split(":", 1)[1].split() == [
        "nusam", "test", "-c", "quickstart", "--ckpt_path", "runs/quickstart/version_1/checkpoints/last.ckpt"]
    tested = run([str(venv / "bin" / t) if t == "nusam" else t for t in test_command.split(":", 1)[1].split()]
                 + ["--trainer.limit_test_batches=2", "--trainer.enable_progress_bar=false"], work, env)
    assert "test/acc1" in tested
    assert (runs / "version_1" / "metrics.csv").read_text() == trained  # the training log is kept
    assert (runs / "test" / "version_0" / "metrics.csv").is_file()

    demo = run([str(python), "-m", "lightning_nusam.demo", "--noise-config", "", *short], work, env)
    assert "test accuracy (best checkpoint)" in demo
    assert "plots skipped: matplotlib is not installed (pip install 'lightning-nusam[demo]'" in demo
    run([nusam, "configs", "copy", "methods/nusam"], work, env)
    assert (work / "nusam.yaml").read_text().startswith("# nuSAM")
    assert files_below(venv) == installed_files  # nothing written into the installed package


def test_config_arguments_resolve_packaged_names_and_keep_real_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = Path(lightning_nusam.__file__).parent / "configs"
    resolved = resolve_config_arguments(["fit", "-c", "cifar10/mixer_s4", "--config=methods/nusam.yaml",
                                         "--config", "configs/quickstart.yaml", "--trainer.max_epochs=1"])
    assert resolved == ["fit", "-c", str(root / "cifar10" / "mixer_s4.yaml"),
                        f"--config={root / 'methods' / 'nusam.yaml'}", "--config",
                        str(root / "quickstart.yaml"), "--trainer.max_epochs=1"]
    (tmp_path / "quickstart.yaml").write_text("trainer: {max_epochs: 1}\n")
    assert resolve_config_arguments(["-c", "quickstart.yaml"]) == ["-c", "quickstart.yaml"]  # a file wins
    inline = "{trainer: {max_epochs: 1}}"
    assert resolve_config_arguments(["-c", inline]) == ["-c", inline]
    with pytest.raises(FileNotFoundError, match=r"no packaged config of that name; `nusam configs` lists"):
        resolve_config_arguments(["-c", "no_such_config"])


def test_copy_config_refuses_to_overwrite(tmp_path):
    target = copy_config("quickstart", tmp_path)
    assert target == tmp_path / "quickstart.yaml" and target.is_file()
    with pytest.raises(FileExistsError):
        copy_config("quickstart", tmp_path)
    assert {"quickstart", "quickstart_noise", "methods/nusam_every2", "fsdp2/vit_l4_cifar100"} <= set(
        available_configs())


def test_version_matches_the_package_metadata():
    from importlib.metadata import version

    assert lightning_nusam.__version__ == version("lightning-nusam") == "0.3.0"
