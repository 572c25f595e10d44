"""Every YAML config parses and runs one step at reduced size through the `nusam` CLI."""

import importlib.util
import inspect
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import lightning_nusam
from helpers import write_fake_cifar
from lightning_nusam import SharpnessAwareCallback
from lightning_nusam.cli import cli_main
from lightning_nusam.packaged_configs import resolve_config

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
    if "\nmethod:" not in config.read_text():  # a model config: add the method
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
    signatures (the options are declared there only), under ``method`` and ``trainer.callbacks``."""
    callback = getattr(lightning_nusam, name)
    own = [n for n in inspect.signature(callback.perturbation_class).parameters if n != "model"]
    common = [n for n, p in inspect.signature(SharpnessAwareCallback.__init__).parameters.items()
              if p.kind is inspect.Parameter.KEYWORD_ONLY]
    assert {"rho", "start_fraction", "same_random_draws"} <= set(own + common)
    for key in ("method", "trainer.callbacks"):
        with pytest.raises(SystemExit) as done:
            cli_main(["fit", f"--{key}=lightning_nusam.{name}", f"--{key}.help", f"lightning_nusam.{name}"])
        assert done.value.code in (0, None)
        shown = capsys.readouterr().out
        for option in own + common:
            assert f"--{key}.{option} " in shown, (key, name, option)


def test_every_common_option_is_accepted_from_yaml(tmp_path):
    config = tmp_path / "options.yaml"
    config.write_text("""
method:
  class_path: lightning_nusam.NuSAM
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
    first_pass_reduction: gradients
    resync_every: 10
    batchnorm_update: first
    same_random_draws: false
""")
    cli = cli_main(["-c", str(CONFIGS / "quickstart.yaml"), "-c", str(config), "--trainer.fast_dev_run=1",
                    f"--trainer.default_root_dir={tmp_path}"], run=False)
    sam = the_method(cli)
    assert type(sam).__name__ == "NuSAM"
    options, schedule = sam.perturbation_options, sam.schedule
    assert (sam.rho, options["power_iterations"], options["include"], schedule.start_epoch,
            schedule.every_n_steps) == (0.2, 2, ("*mlp*",), 1, 2)
    assert (schedule.rho_schedule, schedule.rho_final, schedule.one_pass, sam.resync_every) == (
        "linear", 0.05, True, 10)
    assert (sam.first_pass_reduction, sam.same_random_draws) == ("gradients", False)


# configs that compose ------------------------------------------------------------------------------
def the_method(cli) -> SharpnessAwareCallback | None:
    found = [cb for cb in cli.trainer.callbacks if isinstance(cb, SharpnessAwareCallback)]
    assert len(found) <= 1
    return found[0] if found else None


def every_option(callback: SharpnessAwareCallback) -> dict:
    """The callback's options, the perturbation's defaults filled in."""
    parameters = inspect.signature(callback.perturbation_class).parameters
    defaults = {n: p.default for n, p in parameters.items() if n != "model"}
    options = {**callback.perturbation_class.check_options(defaults), **callback.perturbation_options}
    names = ("sync_first_pass", "first_pass_reduction", "resync_every", "batchnorm_update",
             "same_random_draws")
    common = {name: getattr(callback, name) for name in names}
    return {"class": type(callback), "schedule": callback.schedule, **options, **common}


def composed(tmp_path: Path, *args: str):
    return cli_main([*args, "--trainer.fast_dev_run=1", f"--trainer.default_root_dir={tmp_path}"], run=False)


@pytest.mark.parametrize(("before", "method"), [(["quickstart"], "sam"),
                                                (["quickstart", "methods/nusam_every2"], "sam"),
                                                (["quickstart"], "nusam_one_pass"),
                                                (["quickstart", "methods/asam"], "samon")])
def test_a_method_config_replaces_the_method_and_nothing_survives(tmp_path, before, method):
    configs = [argument for config in [*before, f"methods/{method}"] for argument in ("-c", config)]
    cli = composed(tmp_path, *configs)
    spec = yaml.safe_load((CONFIGS / "methods" / f"{method}.yaml").read_text())["method"]
    expected = getattr(lightning_nusam, spec["class_path"].rsplit(".", 1)[1])(**spec["init_args"])
    assert every_option(the_method(cli)) == every_option(expected)


def test_the_method_options_from_the_command_line(tmp_path):
    cli = composed(tmp_path, "-c", "quickstart", "--method.rho", "0.2", "--method.every_n_steps", "2")
    sam = the_method(cli)
    assert type(sam).__name__ == "NuSAM" and sam.rho == 0.2 and sam.schedule.every_n_steps == 2
    assert sam.schedule.start_epoch == 2  # the rest of quickstart's method stays
    cli = composed(tmp_path, "-c", "quickstart", "-c", "methods/sam", "--method.rho", "0.3")
    assert type(the_method(cli)).__name__ == "SAM" and the_method(cli).rho == 0.3
    cli = composed(tmp_path, "-c", "quickstart", "--method", "lightning_nusam.GaussSAM", "--method.seed", "3")
    assert type(the_method(cli)).__name__ == "GaussSAM" and the_method(cli).perturbation_options["seed"] == 3


def test_methods_adamw_removes_the_method_and_keeps_the_other_callbacks(tmp_path):
    cli = composed(tmp_path, "-c", "quickstart", "-c", "methods/adamw")
    assert the_method(cli) is None
    names = [type(cb).__name__ for cb in cli.trainer.callbacks]
    assert "ModelCheckpoint" in names and "LearningRateMonitor" in names


def test_a_method_listed_under_trainer_callbacks_still_works(tmp_path):
    legacy = tmp_path / "legacy.yaml"
    legacy.write_text("trainer:\n  callbacks:\n    - class_path: lightning_nusam.SAM\n"
                      "      init_args: {rho: 0.2, start_epoch: 0}\n")
    cli = composed(tmp_path, "-c", "cifar10/mixer_s4", "-c", str(legacy))
    assert type(the_method(cli)).__name__ == "SAM" and the_method(cli).rho == 0.2
    both = composed(tmp_path, "-c", "quickstart", "-c", str(legacy))  # and a method under method:
    with pytest.raises(ValueError, match="more than one sharpness-aware callback"):
        both.trainer.fit(both.model, datamodule=both.datamodule)


def test_nusam_help_lists_every_subcommand():
    result = subprocess.run([str(Path(sys.executable).parent / "nusam"), "--help"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    for subcommand in ("fit", "validate", "test", "predict", "configs", "memory"):
        assert f"  {subcommand} " in result.stdout, subcommand


# every documented command runs -----------------------------------------------------------------------
def documented_commands() -> list[tuple[str, str]]:
    """``(where, command)`` for every ``nusam ...`` command in the README and the documentation
    pages (code blocks and inline code), in the config headers and in the ``nusam configs``
    descriptions, in that order."""
    found: list[tuple[str, str]] = []
    readme = "\n".join(p.read_text() for p in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))])
    for block in re.findall(r"```bash\n(.*?)```", readme, re.S):
        for command in block.replace("\\\n", " ").splitlines():
            if command.strip().startswith("nusam "):
                found.append(("README", command.split(" #")[0].strip()))
    found += [("README", c.strip()) for c in re.findall(r"`(nusam [^`]+)`", readme)]
    for config in sorted(CONFIGS.rglob("*.yaml")):
        for line in config.read_text().splitlines():
            match = re.match(r"#\s*(?:then:\s*)?(nusam [^(#]+)", line)
            if match:
                found.append((str(config.relative_to(CONFIGS)), match.group(1).strip()))
    unique: dict[str, str] = {}
    for where, command in found:
        command = " ".join(command.split())
        if "NAME" not in command:  # a placeholder, as in `nusam configs copy NAME`
            unique.setdefault(command, where)
    fits_first = sorted(unique.items(), key=lambda item: " test " in item[0] or " validate " in item[0])
    return [(where, command) for command, where in fits_first]


COMMANDS = documented_commands()


@pytest.fixture(scope="module")
def documented_world(tmp_path_factory, fake_cifar) -> Path:
    """A working directory with what the documented commands read: a tiny BERT where the GLUE
    configs expect BERT-base, the GLUE tasks' files, ImageNet weights where the fine-tuning
    configs look for them."""
    from helpers import save_tiny_bert, write_glue

    world = tmp_path_factory.mktemp("documented")
    if importlib.util.find_spec("transformers") is not None:
        save_tiny_bert(world / "models" / "bert-base-uncased")
        write_glue(world / "data" / "glue")
    return world


def run_documented(command: str, world: Path, fake_cifar: Path, capsys) -> None:
    """Run ``command`` (shortened: a few batches, a small model, the fake data) and check what it
    did: a finished Trainer (steps taken by ``fit``), the help shown, the configs listed or copied,
    the memory report."""
    from lightning_nusam.cli import dispatch

    argv = shlex.split(command)[1:]
    if argv[0] in ("fit", "validate", "test", "predict") and "help" not in command:
        configs = [argv[i + 1] for i, a in enumerate(argv) if a == "-c"]
        model_config = Path(resolve_config(configs[0])) if configs else CONFIGS / "quickstart.yaml"
        argv += ["--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1",
                 "--trainer.limit_test_batches=1", "--trainer.limit_predict_batches=1",
                 "--trainer.num_sanity_val_steps=0", "--trainer.accelerator=cpu", "--trainer.devices=1",
                 "--trainer.precision=32-true"]
        text = model_config.read_text()
        if "--data.init_args.subset" in command:  # the fake CIFAR has 64 images
            argv.append("--data.init_args.subset=32")
        if "TextClassifier" in text:
            argv += ["--data.init_args.batch_size=4", "--data.init_args.max_length=16"]
        elif "CIFARDataModule" in text or ("ImageClassifier" in text and "Digits" not in text):
            argv += [a for a in reduced_size_arguments(model_config, world, fake_cifar)
                     if not a.startswith(("--trainer.fast_dev_run", "--trainer.default_root_dir"))]
        cli = cli_main(argv)
        assert cli.trainer.state.finished and cli.trainer.state.fn == argv[0], command
        if argv[0] == "fit":
            assert cli.trainer.global_step == 2, command
        return
    try:
        result = dispatch(argv)
    except SystemExit as done:  # --help
        assert done.code in (0, None), command
        assert "--method.rho" in capsys.readouterr().out or "help" not in command, command
        return
    shown = capsys.readouterr().out
    if argv[0] == "memory":
        assert result.perturbed_matrices > 0 and "νSAM perturbs these" in shown, command
    elif argv[:2] == ["configs", "copy"]:
        assert (world / f"{Path(argv[2]).name}.yaml").is_file(), command
    else:
        assert "quickstart" in shown and "methods/nusam" in shown, command


@pytest.mark.parametrize(("where", "command"), COMMANDS, ids=[c for _, c in COMMANDS])
def test_every_documented_command_runs(where, command, documented_world, fake_cifar, monkeypatch, capsys):
    if " glue/" in command or "--transformers" in command:
        pytest.importorskip("transformers")
    monkeypatch.chdir(documented_world)
    run_documented(command, documented_world, fake_cifar, capsys)


def test_the_documented_commands_were_found():
    commands = [c for _, c in COMMANDS]
    assert "nusam fit -c quickstart -c methods/sam" in commands
    assert any(c.startswith("nusam test -c quickstart --ckpt_path ") for c in commands)
    assert any(c.startswith("nusam memory") for c in commands) and "nusam configs" in commands
    assert sum(where != "README" for where, _ in COMMANDS) >= 20  # the config headers


# mistakes end in a short message, runs do not mix ------------------------------------------------
MISTAKES = [
    (["fit", "-c", "quickstrat"], "did you mean quickstart"),
    (["fit", "-c", "quickstart", "--method.rho", "-1"], "--method.rho: `rho` must be a finite number >= 0"),
    (["fit", "-c", "quickstart", "--method.rho=abc"], "--method.rho: expected a float, got value: abc"),
    (["fit", "-c", "quickstart", "--model.init_args.model_name", "vit_smal_patch16_224"],
     "`model_name` 'vit_smal_patch16_224' is not a timm model (did you mean vit_small_patch16_224"),
    (["memory", "--model", "resnt18"], "`--model` 'resnt18' is not a timm model (did you mean resnet18"),
    (["test", "-c", "quickstart", "--ckpt_path", "last"], "--ckpt_path last: no run under runs/quickstart"),
]


@pytest.mark.parametrize(("argv", "expected"), MISTAKES, ids=[" ".join(a) for a, _ in MISTAKES])
def test_a_mistake_ends_in_one_or_two_lines_naming_the_fix(argv, expected, tmp_path):
    command = [sys.executable, "-m", "lightning_nusam", *argv]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    # Lightning's own "Seed set to 0" (with a "[rank: 0] " prefix where a rank is in the environment)
    lines = [line for line in result.stderr.splitlines() if line.strip() and "Seed set to" not in line]
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and 1 <= len(lines) <= 2, result.stderr[-3000:]
    assert expected in lines[0], lines
    assert not (tmp_path / "runs").exists()  # nothing started


def test_memory_of_a_text_model_without_the_text_extra_names_the_extra(monkeypatch, capsys):
    from lightning_nusam.cli import main

    monkeypatch.setitem(sys.modules, "transformers", None)  # as without the extra: the import fails
    with pytest.raises(SystemExit) as ended:
        main(["memory", "--transformers", "bert"])
    assert ended.value.code == 2
    assert capsys.readouterr().err == ("nusam: error: --transformers needs Hugging Face transformers, which "
                                       "the `text` extra installs: pip install 'lightning-nusam[text]'\n")


def test_configs_copy_refuses_to_replace_a_file_in_one_line(tmp_path):
    command = [sys.executable, "-m", "lightning_nusam", "configs", "copy", "quickstart"]
    first = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0 and (tmp_path / "quickstart.yaml").is_file(), first.stderr
    (tmp_path / "quickstart.yaml").write_text("# mine\n")
    second = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert second.returncode == 2 and second.stderr.count("\n") == 1, second.stderr
    assert "quickstart.yaml exists" in second.stderr and "--to" in second.stderr
    assert (tmp_path / "quickstart.yaml").read_text() == "# mine\n"


def test_each_fit_has_its_own_run_folder_and_test_keeps_the_training_log(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    short = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1",
             "--trainer.limit_test_batches=1", "--trainer.enable_progress_bar=false"]
    for _ in range(2):
        cli_main(["fit", "-c", "quickstart", *short])
    runs = Path("runs/quickstart")
    assert sorted(p.name for p in runs.iterdir()) == ["version_0", "version_1"]
    for folder in runs.iterdir():  # checkpoints, CSV, TensorBoard events and config together
        names = {p.name for p in folder.iterdir()}
        assert {"checkpoints", "metrics.csv", "config.yaml", "hparams.yaml"} <= names
        assert any(folder.glob("events.out.tfevents.*")) and (folder / "checkpoints" / "last.ckpt").is_file()
    shown = capsys.readouterr().out
    assert "this run: runs/quickstart/version_1" in shown
    assert "nusam test -c quickstart --ckpt_path runs/quickstart/version_1/checkpoints/last.ckpt" in shown
    logs = {path: path.read_bytes() for path in runs.rglob("*") if path.is_file()}

    tested = cli_main(["test", "-c", "quickstart", "--ckpt_path", "last", *short])
    assert tested.trainer.ckpt_path == str(runs / "version_1" / "checkpoints" / "last.ckpt")
    # the flat path of the earlier layout is the newest run's file
    old = cli_main(["validate", "-c", "quickstart", "--ckpt_path", "runs/quickstart/checkpoints/last.ckpt",
                    *short])
    assert old.trainer.ckpt_path == str(runs / "version_1" / "checkpoints" / "last.ckpt")
    assert all(path.read_bytes() == content for path, content in logs.items())  # nothing replaced
    assert (runs / "test" / "version_0" / "metrics.csv").is_file()
    assert (runs / "validate" / "version_0" / "metrics.csv").is_file()


def test_the_top_level_namespace_is_the_public_api():
    public = set(lightning_nusam.__all__)
    assert set(dir(lightning_nusam)) == public
    assert {"NuSAM", "SAM", "SAMON", "SAMMixin", "NuclearPerturbation", "__version__"} <= public
    assert not any(name in public for name in ("importlib", "annotations", "TYPE_CHECKING", "Any"))
    for name in public:
        assert getattr(lightning_nusam, name) is not None
