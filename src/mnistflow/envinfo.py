"""Environment record: what the training environment holds, written by the chain's first rule.

    python -m mnistflow.envinfo --out env.json

It lists the packages that training imports (found in its code, codedigest.third_party_imports),
and only those: training depends on the record, so a package that only evaluation or the
summary uses (matplotlib) must not retrain. Those rules carry their own packages' versions
as params (`packages=versions_imported_by(...)` in workflow/rules/).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import sys

from .atomic import write_json
from .cli import run_and_exit
from .codedigest import third_party_imports

# Import names whose distribution is named otherwise, where importlib.metadata cannot tell
# (packages_distributions() could, but scans every installed package: 0.2 s at each parse).
# lightning_fabric ships inside the pytorch-lightning wheel.
DISTRIBUTIONS = {"pytorch_lightning": "pytorch-lightning", "lightning_fabric": "pytorch-lightning"}


def package_versions(packages) -> dict[str, str | None]:
    """{distribution: version or None} for import or distribution names."""
    versions = {}
    for name in packages:
        dist = DISTRIBUTIONS.get(name, name)
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    return dict(sorted(versions.items()))


def versions_imported_by(entry: str) -> dict[str, str | None]:
    """The versions of the packages an entry point (e.g. mnistflow.train) imports."""
    return package_versions(third_party_imports(entry))


def record() -> dict:
    """Versions and host facts, read without importing torch (1.3 s): package metadata only.

    The devices a run trained on are in its own record (train.json `device`), written on the
    node that ran it; this job may run on another node.
    """
    return {
        "python": platform.python_version(),
        "executable": sys.executable,
        "platform": platform.platform(),
        "packages": versions_imported_by("mnistflow.train"),
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
