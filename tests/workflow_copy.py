"""A private copy of the workflow, where Snakemake runs as a user would run it (tests and benchmarks)."""

from __future__ import annotations

import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# What a copy of the workflow needs: everything a user would check out, minus outputs.
WORKFLOW_FILES = ("Snakefile", "workflow", "config", "envs", "profiles", "src", ".test")


def copy_workflow(destination: Path) -> Path:
    destination.mkdir(parents=True, exist_ok=True)
    for name in WORKFLOW_FILES:
        source = REPO / name
        if source.is_dir():
            ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".snakemake", "results")
            shutil.copytree(source, destination / name, ignore=ignore)
        elif source.exists():
            shutil.copy2(source, destination / name)
    return destination
