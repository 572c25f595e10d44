"""The package as a user installs it: a wheel in a folder outside the clone, run from an empty
directory; configs by name; outputs in the working directory, none in the installed package."""

import os
import subprocess
import sys
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


def test_the_wheel_installed_outside_the_clone_runs_the_quickstart_from_an_empty_directory(tmp_path):
    wheels, target, work = tmp_path / "wheels", tmp_path / "site", tmp_path / "empty"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(wheels), str(ROOT)],
        cwd=tmp_path, env=env)
    (wheel,) = wheels.glob("lightning_nusam-0.3.0-*.whl")
    run([sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--target", str(target), str(wheel)],
        cwd=tmp_path, env=env)
    env = {**env, "PYTHONPATH": str(target)}
    where = "import lightning_nusam; print(lightning_nusam.__file__)"
    imported = run([sys.executable, "-c", where], work, env)
    assert Path(imported.strip()).is_relative_to(target)  # the installed copy, not src/
    installed_files = files_below(target)
    assert Path("lightning_nusam/py.typed") in installed_files
    assert Path("lightning_nusam/configs/quickstart.yaml") in installed_files

    nusam = str(target / "bin" / "nusam")
    listing = run([nusam, "configs"], work, env)
    assert "quickstart" in listing and "methods/nusam" in listing and str(target) in listing
    run([nusam, "fit", "-c", "quickstart", "--trainer.max_epochs=1", "--trainer.limit_train_batches=3",
         "--trainer.limit_val_batches=2", "--trainer.enable_progress_bar=false"], work, env)
    assert (work / "runs" / "quickstart" / "checkpoints" / "last.ckpt").is_file()
    assert (work / "runs" / "quickstart" / "csv").is_dir()
    run([nusam, "configs", "copy", "methods/nusam"], work, env)
    assert (work / "nusam.yaml").read_text().startswith("# nuSAM")
    assert files_below(target) == installed_files  # nothing written into the installed package


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
    with pytest.raises(FileNotFoundError, match=r"no packaged config.*quickstart"):
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
