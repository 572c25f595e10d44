"""``python -m lightning_nusam`` is the ``nusam`` command."""

from lightning_nusam.cli import main

main()
