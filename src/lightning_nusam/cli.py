"""The ``nusam`` command: LightningCLI with ``fit``, ``validate``, ``test`` and ``predict``.

Model, data and callbacks come from YAML (``-c``, composable) or the command line. A ``-c``
value that is not a file names a config shipped with the package::

    nusam fit -c quickstart                                  # the packaged quickstart, from anywhere
    nusam fit -c cifar10/mixer_s4 -c methods/nusam           # model config + method config
    nusam fit -c my_config.yaml --trainer.max_epochs 5       # your own file
    nusam configs                                            # list the packaged configs
    nusam configs copy cifar10/mixer_s4                      # copy one here to edit
    nusam memory --model vit_base_patch16_224                # the paper's Table 1 for any timm model
"""

from __future__ import annotations

import sys

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI

from lightning_nusam.packaged_configs import resolve_config_arguments


class NuSAMCLI(LightningCLI):
    """LightningCLI taking any LightningModule / LightningDataModule by ``class_path``."""


def cli_main(args: list[str] | None = None, run: bool = True) -> NuSAMCLI:
    """Build (and with ``run``, execute) the CLI from ``args`` (default: ``sys.argv``)."""
    if args is not None:
        args = resolve_config_arguments(args)
    else:
        sys.argv[1:] = resolve_config_arguments(sys.argv[1:])
    return NuSAMCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


def main(argv: list[str] | None = None) -> None:
    """``nusam memory``/``nusam configs`` are this package's; everything else goes to LightningCLI."""
    arguments = sys.argv[1:] if argv is None else argv
    if arguments[:1] == ["memory"]:
        from lightning_nusam.memory import main as memory_main

        memory_main(arguments[1:])
        return
    if arguments[:1] == ["configs"]:
        from lightning_nusam.packaged_configs import main as configs_main

        configs_main(arguments[1:])
        return
    # From the console, LightningCLI reads sys.argv itself (passing it again as `args` only
    # makes it warn that both were given).
    cli_main(argv)


if __name__ == "__main__":
    main()
