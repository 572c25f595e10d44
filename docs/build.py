"""Build the API reference from the docstrings with pdoc, into ``docs/api`` (``make docs``).

Fails (exit 1) when pdoc warns: a docstring it cannot parse, a module it cannot import, a
reference it cannot resolve. Warnings that importing third-party packages raises (deprecations)
are not pdoc's and are not counted.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

MODULES = [
    "lightning_nusam",
    "lightning_nusam.perturbations",
    "lightning_nusam.perturbations.nuclear",
    "lightning_nusam.perturbations.l2",
    "lightning_nusam.perturbations.gaussian",
    "lightning_nusam.perturbations.exact",
    "lightning_nusam.perturbations.selection",
    "lightning_nusam.callbacks",
    "lightning_nusam.module",
    "lightning_nusam.engine",
    "lightning_nusam.policy",
    "lightning_nusam.optim",
    "lightning_nusam.fabric",
    "lightning_nusam.data",
    "lightning_nusam.models",
    "lightning_nusam.cli",
    "lightning_nusam.packaged_configs",
    "lightning_nusam.memory",
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "api")
    args = parser.parse_args(argv)
    import pdoc
    import pdoc.render

    for module in MODULES:  # import first: warnings of the imports themselves are not pdoc's
        __import__(module)
    pdoc.render.configure(docformat="google", search=False, show_source=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pdoc.pdoc(*MODULES, output_directory=args.out)
    problems = [w for w in caught if not issubclass(w.category, DeprecationWarning | FutureWarning)]
    for problem in problems:
        print(f"docs: {problem.category.__name__}: {problem.message}", file=sys.stderr)
    pages = sorted(p.relative_to(args.out) for p in args.out.rglob("*.html"))
    print(f"docs: {len(pages)} pages in {args.out}, {len(problems)} warnings")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
