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

from lightning_nusam.usage import ConfigNotFoundError, DestinationExistsError, did_you_mean

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
    return str(packaged_config(value))


def packaged_config(value: str) -> Path:
    """The packaged config named ``value`` (``quickstart``, ``configs/methods/nusam.yaml``, ...),
    whether or not a file of that name exists here; a :class:`ConfigNotFoundError` naming the
    closest names otherwise."""
    name = value.removeprefix("configs/").removesuffix(".yaml")
    candidate = config_directory() / f"{name}.yaml"
    if candidate.is_file():
        return candidate
    names = available_configs()
    raise ConfigNotFoundError(
        f"config {value!r}: no such file here, and no packaged config of that name"
        f"{did_you_mean(name, names)}; `nusam configs` lists the {len(names)} packaged configs"
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
    source = packaged_config(name)
    target = Path(destination) if destination is not None else Path.cwd() / source.name
    if target.is_dir():
        target = target / source.name
    if target.exists():
        raise DestinationExistsError(
            f"{target} exists and is left as it is; copy to another file with "
            f"`nusam configs copy {name} --to OTHER.yaml`, or remove it first")
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
