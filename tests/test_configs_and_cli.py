"""Every YAML config parses and runs one step at reduced size through the `nusam` CLI."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import write_fake_cifar
from lightning_nusam.cli import cli_main

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
# the GLUE configs need a tokenizer and text files: tests/test_text.py runs them
MODEL_CONFIGS = sorted(p for p in CONFIGS.rglob("*.yaml") if p.parent.name not in ("methods", "glue"))
METHOD_CONFIGS = sorted((CONFIGS / "methods").glob("*.yaml"))


@pytest.fixture(scope="module")
def fake_cifar(tmp_path_factory) -> Path:
    return write_fake_cifar(tmp_path_factory.mktemp("fake_cifar"))


def reduced_size_arguments(config: Path, tmp_path: Path, fake_cifar: Path) -> list[str]:
    text = config.read_text()
    # two steps: the methods start after 10% of the steps, so the second step perturbs
    args = ["--trainer.fast_dev_run=2", "--trainer.accelerator=cpu", "--trainer.devices=1",
            "--trainer.precision=32-true", f"--trainer.default_root_dir={tmp_path}"]
    if "mixer_b16" in text:  # timm's Mixer entry points fix the width: build the class instead
        args += ["--model.init_args.model_name=timm.models.mlp_mixer.MlpMixer",
                 "--model.init_args.patch_size=16"]
    if "MlpMixer" in text or "mixer_b16" in text:
        args.append('--model.init_args.model_kwargs={"num_blocks": 1, "embed_dim": 32}')
    else:
        args.append('--model.init_args.model_kwargs={"depth": 1, "embed_dim": 32, "num_heads": 2}')
    if "CIFARDataModule" in text:
        args += [f"--data.init_args.npz_dir={fake_cifar}", "--data.init_args.batch_size=4",
                 "--data.init_args.num_workers=0", "--data.init_args.auto_augment=false"]
    if "resize: 224" in text:
        args.append("--data.init_args.resize=64")
        args.append("--model.init_args.img_size=64")
    if "pretrained_file" in text:
        args.append(f"--model.init_args.pretrained_file={make_weights(config, tmp_path)}")
    return args


def make_weights(config: Path, tmp_path: Path) -> Path:
    """An 'ImageNet' checkpoint (1000 classes) of the reduced architecture, saved locally."""
    import timm
    from timm.models.mlp_mixer import MlpMixer

    path = tmp_path / "imagenet_weights.pth"
    if "mixer" in config.name:
        model = MlpMixer(img_size=64, patch_size=16, num_blocks=1, embed_dim=32, num_classes=1000)
    else:
        model = timm.create_model("vit_base_patch16_224", img_size=64, depth=1, embed_dim=32, num_heads=2)
    torch.save(model.state_dict(), path)
    return path


@pytest.mark.parametrize("config", MODEL_CONFIGS, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_config_runs_one_fast_step(config, tmp_path, fake_cifar):
    args = ["fit", "-c", str(config)]
    if "callbacks" not in config.read_text():
        args += ["-c", str(CONFIGS / "methods" / "nusam.yaml")]
    cli = cli_main([*args, *reduced_size_arguments(config, tmp_path, fake_cifar)])
    assert cli.trainer.state.finished and cli.trainer.global_step == 2
    # the start is 10 % of the steps (the second step perturbs) or an epoch not reached here
    expected = 0.0 if "start_epoch" in config.read_text() else 1.0
    assert cli.trainer.callback_metrics["sam/active_step"] == expected


@pytest.mark.parametrize("method", METHOD_CONFIGS, ids=lambda p: p.stem)
def test_every_method_composes_with_a_model_config(method, tmp_path, fake_cifar):
    model = CONFIGS / "cifar10" / "mixer_s4.yaml"
    cli = cli_main(["-c", str(model), "-c", str(method),
                    *reduced_size_arguments(model, tmp_path, fake_cifar)], run=False)
    names = [type(cb).__name__ for cb in cli.trainer.callbacks]
    expected = {"adamw": None, "sam": "SAM", "asam": "SAM", "samon": "SAMON", "nusam": "NuSAM",
                "nusam_every2": "NuSAM", "nusam_one_pass": "NuSAM"}[method.stem]
    assert (expected in names) if expected else not any(n in names for n in ("SAM", "SAMON", "NuSAM"))
    assert "ModelCheckpoint" in names and "LearningRateMonitor" in names
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)


def test_validate_test_and_predict_subcommands(tmp_path):
    config = str(CONFIGS / "quickstart.yaml")
    common = ["--trainer.fast_dev_run=1", f"--trainer.default_root_dir={tmp_path}"]
    for subcommand in ("validate", "test", "predict"):
        cli = cli_main([subcommand, "-c", config, *common])
        assert cli.trainer.state.finished and cli.trainer.state.fn == subcommand
        if subcommand == "predict":
            predictions = cli.trainer.predict_loop.predictions
            assert predictions and predictions[0].shape[-1] == 10  # class probabilities of the digits
        else:
            assert f"{'val' if subcommand == 'validate' else 'test'}/acc1" in cli.trainer.callback_metrics


def test_console_script_and_module_entry_point():
    for command in ([sys.executable, "-m", "lightning_nusam", "--help"],
                    [str(Path(sys.executable).parent / "nusam"), "fit", "--help"]):
        result = subprocess.run(command, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr[-2000:]
        assert "fit" in result.stdout or "--trainer" in result.stdout


CALLBACK_CLASSES = ["NuSAM", "NuSAMNorm", "SAM", "SAMON", "GaussSAM"]


@pytest.mark.parametrize("name", CALLBACK_CLASSES)
def test_cli_help_shows_every_argument_of_every_callback(name, capsys):
    """Every option of the method's perturbation class and every common option, read from their
    signatures (the options are declared there only)."""
    import inspect

    import lightning_nusam
    from lightning_nusam import SharpnessAwareCallback

    callback = getattr(lightning_nusam, name)
    own = [n for n in inspect.signature(callback.perturbation_class).parameters if n != "model"]
    common = [n for n, p in inspect.signature(SharpnessAwareCallback.__init__).parameters.items()
              if p.kind is inspect.Parameter.KEYWORD_ONLY]
    assert {"rho", "start_fraction", "same_random_draws"} <= set(own + common)
    with pytest.raises(SystemExit) as done:
        cli_main(["fit", f"--trainer.callbacks=lightning_nusam.{name}", "--trainer.callbacks.help",
                  f"lightning_nusam.{name}"])
    assert done.value.code in (0, None)
    shown = capsys.readouterr().out
    for option in own + common:
        assert f"--trainer.callbacks.{option} " in shown, (name, option)


def test_every_common_option_is_accepted_from_yaml(tmp_path):
    config = tmp_path / "options.yaml"
    config.write_text("""
trainer:
  callbacks:
    - class_path: lightning_nusam.NuSAM
      init_args:
        rho: 0.2
        power_iterations: 2
        include: "*mlp*"
        start_epoch: 1
        every_n_steps: 2
        rho_schedule: linear
        rho_final: 0.05
        one_pass: true
        sync_first_pass: true
        resync_every: 10
        batchnorm_update: first
""")
    cli = cli_main(["-c", str(CONFIGS / "quickstart.yaml"), "-c", str(config), "--trainer.fast_dev_run=1",
                    f"--trainer.default_root_dir={tmp_path}"], run=False)
    sam = next(cb for cb in cli.trainer.callbacks if type(cb).__name__ == "NuSAM")
    options, schedule = sam.perturbation_options, sam.schedule
    assert (sam.rho, options["power_iterations"], options["include"], schedule.start_epoch,
            schedule.every_n_steps) == (0.2, 2, ("*mlp*",), 1, 2)
    assert (schedule.rho_schedule, schedule.rho_final, schedule.one_pass, sam.resync_every) == (
        "linear", 0.05, True, 10)
