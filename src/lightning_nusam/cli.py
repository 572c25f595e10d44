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
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lightning_nusam.callbacks import SharpnessAwareCallback
from lightning_nusam.packaged_configs import resolve_config_arguments

#: The config key of the sharpness-aware method.
METHOD_KEY = "method"

SUBCOMMANDS = {
    "fit": "train a model (and validate it)",
    "validate": "run the validation loop once",
    "test": "run the test loop once (e.g. --ckpt_path runs/quickstart/checkpoints/last.ckpt)",
    "predict": "run the prediction loop once",
    "configs": "list the packaged configs, or `configs copy NAME` to copy one here to edit",
    "memory": "what SAM and νSAM hold for a timm or Hugging Face model (the paper's Table 1)",
}


class NuSAMCLI(LightningCLI):
    """LightningCLI taking any LightningModule / LightningDataModule by ``class_path``, and the
    sharpness-aware method (any :class:`~lightning_nusam.SharpnessAwareCallback`) under ``method:``;
    ``method: null`` trains with the base optimizer alone."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(SharpnessAwareCallback, METHOD_KEY, subclass_mode=True,
                                        required=False)

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        # `method: null` (a config without a sharpness-aware method) adds no callback
        trainer.callbacks = [callback for callback in trainer.callbacks if callback is not None]
        return trainer


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
    )


def usage() -> str:
    lines = ["usage: nusam {" + ",".join(SUBCOMMANDS) + "} ...", "",
             "νSAM (nuclear-norm sharpness-aware minimization) for PyTorch Lightning.", "", "subcommands:"]
    lines += [f"  {name:10s} {text}" for name, text in SUBCOMMANDS.items()]
    lines += ["", "`nusam SUBCOMMAND --help` describes one; e.g. `nusam fit -c quickstart`,",
              "`nusam fit -c cifar10/mixer_s4 -c methods/nusam --method.rho 0.2`."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """The ``nusam`` console script (it returns nothing: a console script's result is its exit code)."""
    dispatch(argv)


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
