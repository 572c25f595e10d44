"""A griffe extension for the API reference: reads the docstrings as they are written for pdoc
and the doctests.

- ``Example:`` sections hold doctests: they become griffe's ``Examples:`` section, which renders
  ``>>>`` lines as Python code (an ``Example:`` admonition would render them as prose).
- Sphinx roles (``:class:`~a.b.C``` , ``:meth:`x```, ...) become inline code, as pdoc shows them.
- A paragraph that ends in ``::`` (reStructuredText's "a code block follows") ends in ``:``; the
  indented block after it is a Markdown code block already.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:class|func|meth|attr|mod|obj|data|exc):`(~?)([^`]+)`")
EXAMPLE = re.compile(r"^(\s*)Example:\s*$", re.M)
LITERAL = re.compile(r"(\S)::$", re.M)


def _role(match: re.Match[str]) -> str:
    short, target = match.groups()
    return f"`{target.rsplit('.', 1)[-1] if short else target}`"


def rewrite(text: str) -> str:
    """``rewrite(":class:`~a.B` and :meth:`c`")`` is ``"`B` and `c`"``."""
    return LITERAL.sub(r"\1:", EXAMPLE.sub(r"\1Examples:", ROLE.sub(_role, text)))


class PdocDocstrings(griffe.Extension):
    """Rewrite each docstring once, when griffe has read the object."""

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = rewrite(obj.docstring.value)
