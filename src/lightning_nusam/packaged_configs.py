"""The YAML configs shipped inside the package, resolvable by name from anywhere.

``nusam fit -c quickstart`` (or ``-c cifar10/mixer_s4 -c methods/nusam``) uses the packaged
config of that name when no such file exists in the working directory; real paths always win.
``nusam configs`` lists them and ``nusam configs copy NAME`` copies one into the working
directory to edit.

Example:
    >>> "quickstart" in available_configs() and "methods/nusam" in available_configs()
    True
    >>> resolve_config("quickstart").endswith("quickstart.yaml")
    True
"""

from __future__ import annotations

import argparse
import shutil
from importlib import resources
from pathlib import Path

_CONFIG_FLAGS = ("-c", "--config")


def config_directory() -> Path:
    """Where the packaged configs are (inside the installed package)."""
    return Path(str(resources.files("lightning_nusam").joinpath("configs")))


def available_configs() -> list[str]:
    """Names of the packaged configs: their paths below ``configs/`` without ``.yaml``."""
    root = config_directory()
    return sorted(str(path.relative_to(root).with_suffix("")) for path in root.rglob("*.yaml"))


def _looks_like_a_name(value: str) -> bool:
    """A path or a name, not an inline YAML document (which jsonargparse also accepts)."""
    return not any(character in value for character in "{}:\n")


def resolve_config(value: str) -> str:
    """``value`` if it is an existing file, else the packaged config it names.

    Accepted names: ``quickstart``, ``quickstart.yaml``, ``cifar10/mixer_s4``,
    ``configs/methods/nusam.yaml``. An inline YAML string is returned unchanged.
    """
    if Path(value).expanduser().is_file() or not _looks_like_a_name(value):
        return value
    name = value.removeprefix("configs/").removesuffix(".yaml")
    candidate = config_directory() / f"{name}.yaml"
    if candidate.is_file():
        return str(candidate)
    raise FileNotFoundError(
        f"config {value!r}: no such file here, and no packaged config of that name. Packaged configs: "
        + ", ".join(available_configs())
    )


def resolve_config_arguments(arguments: list[str]) -> list[str]:
    """Replace the value of every ``-c``/``--config`` option by :func:`resolve_config`'s."""
    resolved: list[str] = []
    expects_value = False
    for argument in arguments:
        if expects_value:
            resolved.append(resolve_config(argument))
            expects_value = False
            continue
        flag, equals, value = argument.partition("=")
        if flag in _CONFIG_FLAGS and equals:
            resolved.append(f"{flag}={resolve_config(value)}")
            continue
        expects_value = argument in _CONFIG_FLAGS
        resolved.append(argument)
    return resolved


def copy_config(name: str, destination: Path | None = None) -> Path:
    """Copy the packaged config ``name`` to ``destination`` (default: ``./<its file name>``)."""
    source = Path(resolve_config(name if name.endswith(".yaml") else f"{name}.yaml"))
    if config_directory() not in source.parents:
        raise FileNotFoundError(f"{name!r} is not a packaged config; packaged: "
                                f"{', '.join(available_configs())}")
    target = Path(destination) if destination is not None else Path.cwd() / source.name
    if target.is_dir():
        target = target / source.name
    if target.exists():
        raise FileExistsError(f"{target} exists; pass another destination (--to)")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    return target


def main(argv: list[str] | None = None) -> None:
    """``nusam configs [list]`` and ``nusam configs copy NAME [--to PATH]``."""
    parser = argparse.ArgumentParser(prog="nusam configs",
                                     description="The configs shipped with lightning-nusam.")
    commands = parser.add_subparsers(dest="command")
    commands.add_parser("list", help="list the packaged configs (the default)")
    copy = commands.add_parser("copy", help="copy a packaged config into the working directory to edit")
    copy.add_argument("name", help="e.g. quickstart, cifar10/mixer_s4, methods/nusam")
    copy.add_argument("--to", type=Path, default=None, help="file or folder (default: ./<name>.yaml)")
    args = parser.parse_args(argv)
    if args.command == "copy":
        target = copy_config(args.name, args.to)
        print(f"copied {args.name} to {target}; run it with: nusam fit -c {target}")
        return
    root = config_directory()
    print(f"Packaged configs ({root}); use them by name, e.g. `nusam fit -c quickstart`:")
    for name in available_configs():
        first_line = (root / f"{name}.yaml").read_text().splitlines()[0].lstrip("# ").strip()
        print(f"  {name:32s} {first_line}")
