"""The ``nusam`` command: LightningCLI with ``fit``, ``validate``, ``test`` and ``predict``, and the
package's own ``configs`` and ``memory``.

Model, data and the method come from YAML (``-c``, composable) or the command line. A ``-c``
value that is not a file names a config shipped with the package. The sharpness-aware method
has a key of its own, ``method:`` (LightningCLI's ``add_lightning_class_args`` in subclass
mode), so that a method config replaces the method of the configs before it, and nothing of
the previous method survives::

    nusam fit -c quickstart                                  # the packaged quickstart, from anywhere
    nusam fit -c quickstart -c methods/sam                   # the same with SAM instead of νSAM
    nusam fit -c cifar10/mixer_s4 -c methods/nusam --method.rho 0.2
    nusam fit -c my_config.yaml --trainer.max_epochs 5       # your own file
    nusam configs                                            # list the packaged configs
    nusam configs copy cifar10/mixer_s4                      # copy one here to edit
    nusam memory --model vit_base_patch16_224                # the paper's Table 1 for any timm model

A method may also be listed under ``trainer.callbacks`` (``class_path: lightning_nusam.NuSAM``),
as in configs written before the ``method:`` key; it then composes like any other callback.

Every run writes to a folder of its own (``runs/quickstart/version_N``, see
:mod:`lightning_nusam.runs`); ``fit`` prints it and the ``nusam test`` command that tests it;
``--ckpt_path last`` is the newest run's ``last.ckpt``. Mistakes in the command line or the
config end in one or two lines that name the option and the fix, not a traceback (exit status 2;
``NUSAM_TRACEBACK=1`` shows the traceback as well).
"""

from __future__ import annotations

import itertools
import os
import re
import shlex
import sys
import warnings
from pathlib import Path
from typing import Any, NoReturn

import lightning.pytorch as pl
import yaml
from jsonargparse import ActionConfigFile
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_only

from lightning_nusam.lightning.callback import SharpnessAwareCallback
from lightning_nusam.packaged_configs import resolve_config_arguments
from lightning_nusam.runs import assign_run_folder, resolve_checkpoint, runs_root
from lightning_nusam.usage import BadOptionError, UsageError, condense

#: The config key of the sharpness-aware method.
METHOD_KEY = "method"

SUBCOMMANDS = {
    "fit": "train a model (and validate it)",
    "validate": "run the validation loop once",
    "test": "run the test loop once (e.g. --ckpt_path last: the newest run's last.ckpt)",
    "predict": "run the prediction loop once",
    "configs": "list the packaged configs, or `configs copy NAME` to copy one here to edit",
    "memory": "what SAM and νSAM hold for a timm or Hugging Face model (the paper's Table 1)",
}


class ShortErrorParser(LightningArgumentParser):
    """LightningCLI's parser, whose errors are one line naming the option (and a line saying where
    the options are listed) instead of the usage text and jsonargparse's search through types."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error or os.environ.get("JSONARGPARSE_DEBUG"):
            super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        prog = parser.prog.replace(" [options]", "")
        sys.stderr.write(f"{prog}: error: {condense(message)}\n  `{prog} --help` lists the options\n")
        sys.exit(2)


class NuSAMCLI(LightningCLI):
    """LightningCLI taking any LightningModule / LightningDataModule by ``class_path``, and the
    sharpness-aware method (any :class:`~lightning_nusam.SharpnessAwareCallback`) under ``method:``;
    ``method: null`` trains with the base optimizer alone. Each run gets a folder of its own."""

    #: the folder of this run's logs and checkpoints (``None`` when the config has no logger)
    run_folder: Path | None = None

    def __init__(self, *args: Any, config_arguments: tuple[str, ...] = (), **kwargs: Any) -> None:
        #: the ``-c`` values as the user gave them (to print the command that tests a run)
        self.config_arguments = tuple(config_arguments)
        super().__init__(*args, **kwargs)

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        kwargs.setdefault("dump_header", [f"lightning.pytorch=={pl.__version__}"])
        parser = ShortErrorParser(**kwargs)
        parser.add_argument("-c", "--config", action=ActionConfigFile,
                            help="Path to a configuration file in json or yaml format.")
        return parser

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(SharpnessAwareCallback, METHOD_KEY, subclass_mode=True,
                                        required=False)

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else self.config
        root = runs_root(config.get("trainer"))
        self.run_folder = assign_run_folder(config.get("trainer"), subcommand or "fit")
        if self.run_folder is not None:
            # the folder is new: the CSV logger finds only this run's config.yaml and events there
            folder = re.escape(str(self.run_folder))
            warnings.filterwarnings("ignore", message=f"Experiment logs directory {folder} exists and is not")
        ckpt_path = config.get("ckpt_path")
        resolved = resolve_checkpoint(ckpt_path, root)
        if resolved != ckpt_path:
            config["ckpt_path"] = resolved
            rank_zero_only(print)(f"--ckpt_path {ckpt_path}: {resolved}")

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except (ValueError, TypeError, RuntimeError, ModuleNotFoundError, FileNotFoundError) as error:
            if isinstance(error, UsageError):
                raise
            raise BadOptionError(self.describe(error)) from error

    def describe(self, error: Exception) -> str:
        """A class rejected its arguments while the CLI built it: the message with the config key
        of that class (``--method.rho: `rho` must be ...``) when it can be found."""
        message = condense(str(error))
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else self.config
        for key in (METHOD_KEY, "model", "data"):
            class_path = str(getattr(config.get(key), "class_path", "") or "")
            if class_path and f"class_path='{class_path}'" in str(error):
                arguments = config[key].get("init_args")
                names = list(arguments.keys()) if arguments is not None else []
                named = [name for name in names if f"`{name}`" in message]
                option = f"--{key}.{named[0]}" if named else f"--{key} ({class_path})"
                return f"{option}: {message}"
        return message

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        # `method: null` (a config without a sharpness-aware method) adds no callback
        trainer.callbacks = [callback for callback in trainer.callbacks if callback is not None]
        return trainer

    @rank_zero_only
    def after_fit(self) -> None:
        """Say where the run went and how to test it."""
        checkpoint = next((cb for cb in self.trainer.callbacks if isinstance(cb, ModelCheckpoint)), None)
        folder = self.run_folder or (Path(self.trainer.log_dir) if self.trainer.log_dir else None)
        if folder is not None:
            print(f"\nthis run: {folder}  (logs, config.yaml and checkpoints/)")
        path = checkpoint and (checkpoint.last_model_path or checkpoint.best_model_path)
        if path:
            command = ["nusam", "test", *(f"-c {shlex.quote(c)}" for c in self.config_arguments),
                       f"--ckpt_path {shlex.quote(str(path))}"]
            print(f"test it:  {' '.join(command)}")
            if Path(path).name == "last.ckpt":
                print("          (or --ckpt_path last: the last.ckpt of the newest run)")


def sets_the_method(config: str) -> bool:
    """Whether the YAML file (or inline document) ``config`` has a top-level ``method`` key."""
    path = Path(config).expanduser()
    try:
        document = yaml.safe_load(path.read_text() if path.is_file() else config)
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(document, dict) and METHOD_KEY in document


def replacing_methods(arguments: list[str]) -> list[str]:
    """``--method=null`` before every config that sets the method, so that it replaces the method
    instead of merging into it (jsonargparse keeps the options two classes share when a
    ``class_path`` changes: NuSAM's ``start_epoch`` would survive in SAM)."""
    result: list[str] = []
    expects_config = False
    for argument in arguments:
        if expects_config:
            if sets_the_method(argument):
                result[-1:] = [f"--{METHOD_KEY}=null", result[-1]]
            expects_config = False
        elif argument.startswith(("-c=", "--config=")) and sets_the_method(argument.split("=", 1)[1]):
            result.append(f"--{METHOD_KEY}=null")
        expects_config = argument in ("-c", "--config")
        result.append(argument)
    return result


def cli_main(args: list[str] | None = None, run: bool = True) -> NuSAMCLI:
    """Build (and with ``run``, execute) the CLI from ``args`` (default: ``sys.argv``)."""
    given = sys.argv[1:] if args is None else args
    configs = tuple(value for flag, value in itertools.pairwise(given) if flag in ("-c", "--config"))
    if args is not None:
        args = replacing_methods(resolve_config_arguments(args))
    else:
        sys.argv[1:] = replacing_methods(resolve_config_arguments(sys.argv[1:]))
    return NuSAMCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
        config_arguments=configs,
    )


def usage() -> str:
    lines = ["usage: nusam {" + ",".join(SUBCOMMANDS) + "} ...", "",
             "νSAM (nuclear-norm sharpness-aware minimization) for PyTorch Lightning.", "", "subcommands:"]
    lines += [f"  {name:10s} {text}" for name, text in SUBCOMMANDS.items()]
    lines += ["", "`nusam SUBCOMMAND --help` describes one; e.g. `nusam fit -c quickstart`,",
              "`nusam fit -c cifar10/mixer_s4 -c methods/nusam --method.rho 0.2`."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """The ``nusam`` console script (it returns nothing: a console script's result is its exit code).
    A :class:`~lightning_nusam.usage.UsageError` ends it with its message alone and status 2."""
    try:
        dispatch(argv)
    except UsageError as error:
        if os.environ.get("NUSAM_TRACEBACK"):
            raise
        sys.stderr.write(f"nusam: error: {error}\n")
        sys.exit(2)


def dispatch(argv: list[str] | None = None) -> Any:
    """``nusam memory``/``nusam configs`` are this package's (``memory`` returns its report);
    everything else goes to LightningCLI (the CLI object is returned)."""
    arguments = sys.argv[1:] if argv is None else argv
    if arguments[:1] in ([], ["-h"], ["--help"]):
        print(usage())
        return None
    if arguments[:1] == ["memory"]:
        from lightning_nusam.memory import main as memory_main

        return memory_main(arguments[1:])
    if arguments[:1] == ["configs"]:
        from lightning_nusam.packaged_configs import main as configs_main

        configs_main(arguments[1:])
        return None
    # From the console, LightningCLI reads sys.argv itself (passing it again as `args` only
    # makes it warn that both were given).
    return cli_main(argv)


if __name__ == "__main__":
    main()
