"""Mistakes a user can fix from the command line, and how the ``nusam`` command reports them.

A :class:`UsageError` carries a message that names the option (or the config, the file, the
extra) and the fix; the console script prints it alone, in one or two lines, and exits with
status 2, instead of a traceback (``NUSAM_TRACEBACK=1`` shows the traceback too). Raised from
Python (``cli_main``, ``copy_config``, ...) it is an ordinary exception, and also an instance of
the built-in type it refines (``FileNotFoundError``, ``FileExistsError``, ``ValueError``,
``ModuleNotFoundError``), so existing ``except`` clauses keep working.

Example:
    >>> close_names("quickstrat", ["quickstart", "quickstart_noise", "methods/sam"])
    ['quickstart', 'quickstart_noise']
    >>> condense('''Parser key "method":
    ...   Does not validate against any of the Union subtypes
    ...   Errors:
    ...     - Problem with given class_path 'lightning_nusam.NuSAM':
    ...         Parser key "rho":
    ...           Expected a <class 'float'>. Got value: abc
    ...     - Expected a <class 'NoneType'>
    ...   Given value: NestedArg(key='rho', val='abc')''')
    '--method.rho: expected a float, got value: abc'
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable


class UsageError(Exception):
    """A mistake in the command line or the config that the user can fix; the message says how."""


class ConfigNotFoundError(UsageError, FileNotFoundError):
    """``-c NAME``: no such file, and no packaged config of that name."""


class DestinationExistsError(UsageError, FileExistsError):
    """``nusam configs copy``: the destination file exists."""


class MissingExtraError(UsageError, ModuleNotFoundError):
    """An optional dependency is missing: the message names the extra that installs it."""


class BadOptionError(UsageError, ValueError):
    """A value that a class rejected when the CLI built it (``--method.rho -1``, a model name)."""


def close_names(name: str, names: Iterable[str], count: int = 3) -> list[str]:
    """Up to ``count`` of ``names`` that look like ``name`` (a misspelling), closest first."""
    return difflib.get_close_matches(name, list(names), n=count, cutoff=0.6)


def did_you_mean(name: str, names: Iterable[str]) -> str:
    """``" (did you mean X?)"`` or ``" (did you mean X or Y?)"``, or ``""`` when none is close."""
    matches = close_names(name, names)
    return f" (did you mean {' or '.join(matches)}?)" if matches else ""


#: jsonargparse's lines that explain its search rather than the mistake
_NOISE = (
    "Does not validate against any of the Union subtypes",
    "Subtypes:",
    "Errors:",
    "Given value",
    "Expected a <class 'NoneType'>",
    "Problem with given class_path",
)


def condense(message: str) -> str:
    """jsonargparse's error (``Parser key "method": ... Parser key "rho": Expected ...``) as one
    line: the dotted option and what was wrong with it. The message unchanged when it has no
    such structure."""
    keys: list[str] = []
    details: list[str] = []
    for line in message.splitlines():
        text = line.strip()
        key = re.match(r'^(?:error: )?Parser key "([^"]+)":?\s*(.*)$', text)
        if key:
            keys.append(key.group(1))
            text = key.group(2)
        text = text.removeprefix("- ")
        if not text or text.startswith(_NOISE):
            continue
        text = re.sub(r"<class '(?:[\w.]+\.)?(\w+)'>", r"\1", text)  # <class 'float'> → float
        text = re.sub(r"^Expected a (\w+)\. Got value:", r"expected a \1, got value:", text)
        details.append(text)
    if not details:
        return message.strip()
    option = f"--{'.'.join(keys)}: " if keys else ""
    return option + "; ".join(dict.fromkeys(details))


def check_timm_model(name: str, argument: str = "model_name") -> None:
    """A :class:`BadOptionError` when ``name`` is not a timm model name, with the closest names."""
    import timm

    if not timm.is_model(name):
        raise BadOptionError(
            f"`{argument}` {name!r} is not a timm model{did_you_mean(name, timm.list_models())}; "
            f"timm.list_models('{name.split('_')[0]}*') lists the names"
        )
