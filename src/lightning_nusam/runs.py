"""Run folders of the ``nusam`` command: every run gets its own, nothing of another run is replaced.

``nusam fit -c quickstart`` writes everything of one run under one versioned folder::

    runs/quickstart/version_0/{checkpoints/, metrics.csv, events.out.tfevents.*, config.yaml, hparams.yaml}
    runs/quickstart/version_1/...                          (the second fit)
    runs/quickstart/test/version_0/{metrics.csv, ...}      (`nusam test`: a folder of its own)

The loggers of a config that give no ``version`` all get the same one, the next free number in
each of their folders (Lightning would number each logger on its own, so that the CSV of a run
could sit in ``version_1`` and its TensorBoard events in ``version_0``); ``ModelCheckpoint``
without a ``dirpath`` writes into the first logger's folder. ``validate``/``test``/``predict``
write under a sub-folder named after themselves, so that they never replace a training log.
``--ckpt_path last`` is the ``last.ckpt`` of the newest run.

Example:
    >>> import tempfile
    >>> root = Path(tempfile.mkdtemp())
    >>> next_version([root]), (root / "version_0").mkdir(), (root / "version_3").mkdir()
    (0, None, None)
    >>> next_version([root, root / "other"])
    4
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from lightning_nusam.usage import UsageError

_VERSION = re.compile(r"^version_(\d+)$")


def versions(root: Path) -> list[int]:
    """The numbers of the ``version_N`` folders in ``root``, in increasing order."""
    if not root.is_dir():
        return []
    return sorted(int(m.group(1)) for p in root.iterdir() if p.is_dir() and (m := _VERSION.match(p.name)))


def next_version(roots: list[Path]) -> int:
    """The smallest number above every ``version_N`` folder of all ``roots`` (0 when none)."""
    return max((max(versions(root), default=-1) + 1 for root in roots), default=0)


def _logger_configs(trainer_config: Any) -> list[Any]:
    """The ``init_args`` of the loggers configured by ``class_path`` that have a ``save_dir``."""
    loggers = trainer_config.get("logger") if trainer_config is not None else None
    items = loggers if isinstance(loggers, list) else [loggers]
    found = []
    for item in items:
        init_args = getattr(item, "init_args", None) if hasattr(item, "class_path") else None
        if init_args is not None and init_args.get("save_dir") is not None:
            found.append(init_args)
    return found


def _folder(init_args: Any) -> Path:
    return Path(str(init_args.get("save_dir"))).expanduser() / str(init_args.get("name") or "")


def runs_root(trainer_config: Any) -> Path | None:
    """Where the training runs of this config are numbered: the first logger's folder."""
    loggers = _logger_configs(trainer_config)
    return _folder(loggers[0]) if loggers else None


def assign_run_folder(trainer_config: Any, subcommand: str) -> Path | None:
    """Give every configured logger without a ``version`` the same, new version (see the module's
    docstring); evaluation subcommands log under ``<save_dir>/<subcommand>`` when the logger has
    no ``name``. Returns the run's folder (the first logger's), or ``None`` without loggers."""
    loggers = _logger_configs(trainer_config)
    if subcommand != "fit":
        for init_args in loggers:
            if not init_args.get("name"):
                init_args["name"] = subcommand
    unversioned = [init_args for init_args in loggers if init_args.get("version") is None]
    if unversioned:
        version = next_version([_folder(init_args) for init_args in unversioned])
        for init_args in unversioned:
            init_args["version"] = version
    if not loggers:
        return None
    first = loggers[0]
    version = first.get("version")
    return _folder(first) / (f"version_{version}" if isinstance(version, int) else str(version or ""))


def resolve_checkpoint(ckpt_path: str | None, root: Path | None) -> str | None:
    """``last`` → the ``last.ckpt`` of the newest run under ``root``; a path of the flat layout of
    earlier versions (``<root>/checkpoints/X.ckpt``) that does not exist → the same file of the
    newest run that has it. Any other value is returned unchanged."""
    if ckpt_path is None or root is None:
        return ckpt_path
    if ckpt_path == "last":
        name = "last.ckpt"
    else:
        path = Path(ckpt_path).expanduser()
        if path.exists() or path.parent != root / "checkpoints":
            return ckpt_path
        name = path.name
    for version in reversed(versions(root)):
        candidate = root / f"version_{version}" / "checkpoints" / name
        if candidate.is_file():
            return str(candidate)
    raise UsageError(f"--ckpt_path {ckpt_path}: no run under {root} has checkpoints/{name}; train one "
                     "first (`nusam fit ...`), or give the path of a .ckpt file")
