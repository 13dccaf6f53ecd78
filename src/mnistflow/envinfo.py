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
    import torch

    cuda = torch.cuda.is_available()
    return {
        "python": platform.python_version(),
        "executable": sys.executable,
        "platform": platform.platform(),
        "packages": package_versions(),
        "torch_cuda_build": torch.version.cuda,
        "cuda_available": cuda,
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
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
