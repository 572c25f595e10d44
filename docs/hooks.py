"""mkdocs hook: publish the benchmark plots (``benchmarks/results/**/*.png``) with the site, at the
same relative path as in the repository, so that the pages show them without a copy in docs/."""

from __future__ import annotations

from pathlib import Path

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[1]


def on_files(files: Files, config) -> Files:
    for plot in sorted((ROOT / "benchmarks" / "results").rglob("*.png")):
        path = str(plot.relative_to(ROOT))
        files.append(File(path, str(ROOT), config["site_dir"], config["use_directory_urls"]))
    return files
