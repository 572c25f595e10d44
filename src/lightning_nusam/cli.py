"""The ``nusam`` command: LightningCLI with ``fit``, ``validate``, ``test`` and ``predict``.

Model, data and callbacks come from YAML (``-c``, composable) or the command line::

    nusam fit -c configs/cifar10/mixer_s4.yaml -c configs/methods/nusam.yaml
    nusam fit -c configs/quickstart.yaml --trainer.max_epochs 5
    nusam memory --model vit_base_patch16_224      # the paper's Table 1 for any timm model
"""

from __future__ import annotations

import sys

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI


class NuSAMCLI(LightningCLI):
    """LightningCLI taking any LightningModule / LightningDataModule by ``class_path``."""


def cli_main(args: list[str] | None = None, run: bool = True) -> NuSAMCLI:
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
    """``nusam memory ...`` prints the memory report; everything else goes to LightningCLI."""
    arguments = sys.argv[1:] if argv is None else argv
    if arguments[:1] == ["memory"]:
        from lightning_nusam.memory import main as memory_main

        memory_main(arguments[1:])
        return
    # From the console, LightningCLI reads sys.argv itself (passing it again as `args` only
    # makes it warn that both were given).
    cli_main(argv)


if __name__ == "__main__":
    main()
