"""Environment record: what the training environment holds, written by the chain's first rule.

    python -m mnistflow.envinfo --out env.json
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import sys

from .atomic import write_json
from .cli import run_and_exit

PACKAGES = ("torch", "torchvision", "pytorch-lightning", "numpy", "matplotlib")


def package_versions(packages=PACKAGES) -> dict[str, str | None]:
    versions = {}
    for name in packages:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def record() -> dict:
    """Versions and host facts, read without importing torch (1.3 s): package metadata only.

    The devices a run trained on are in its own record (train.json `device`), written on the
    node that ran it; this job may run on another node.
    """
    return {
        "python": platform.python_version(),
        "executable": sys.executable,
        "platform": platform.platform(),
        "packages": package_versions(),
        "cpu_count": os.cpu_count(),
        "conda_prefix": os.environ.get("CONDA_PREFIX"),
        # Environment modules loaded for the job (Lmod and Environment Modules both set it).
        "modules": [m for m in os.environ.get("LOADEDMODULES", "").split(":") if m],
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m mnistflow.envinfo", description=__doc__)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    write_json(args.out, record())
    return 0


if __name__ == "__main__":
    run_and_exit(main)
