"""``venv-python``: a tiny conda package whose ``bin/python`` runs the test venv's Python.

Part of the conda TEST DOUBLE (see tests/conda/__init__.py), for running the real
workflow's rules under ``--sdm conda`` offline.  The rules run ``python -m mnistflow.<step>``
and need torch, Lightning and matplotlib; the local test channel holds only
tiny packages.  An environment that lists ``venv-python`` gets ``bin/python`` (and
``bin/python3``): a ``/bin/sh`` script that execs the interpreter running the tests
(``sys.executable`` when the channel is built, normally ``.venv/bin/python``).

So a job is truly inside its activated environment (``CONDA_PREFIX`` is the environment,
its ``bin/`` is first on ``PATH``, and ``python`` resolves there; with no venv on
``PATH``, nothing else would find torch), while the Python packages come from the venv.
What this does NOT show: that conda-forge can solve envs/*.yaml, or that the pinned
packages work together -- nothing in CI does.
"""

from __future__ import annotations

import asyncio
import json
import shlex
import sys
from pathlib import Path

from .channel import LocalChannel, PackageFile, build_package

NAME = "venv-python"
VERSION = "1.0"

SHIM = """#!/bin/sh
# venv-python {version}: part of the conda TEST DOUBLE (tests/conda/venv_python.py) -- not Python.
exec {python} "$@"
"""


def build_venv_python_channel(dest: Path, python: str | None = None) -> LocalChannel:
    """A local channel in ``dest`` with the one noarch package ``venv-python`` 1.0."""
    from rattler.index import index_fs

    dest = Path(dest)
    noarch, linux64 = dest / "noarch", dest / "linux-64"
    noarch.mkdir(parents=True, exist_ok=True)
    linux64.mkdir(parents=True, exist_ok=True)
    script = SHIM.format(version=VERSION, python=shlex.quote(python or sys.executable))
    build_package(
        noarch,
        NAME,
        VERSION,
        [],
        {"bin/python": (script, 0o755), "bin/python3": (script, 0o755)},
    )
    asyncio.run(index_fs(dest, write_zst=False, write_shards=False, force=True))
    empty = {"info": {"subdir": "linux-64"}, "packages": {}, "packages.conda": {}, "removed": [], "repodata_version": 1}
    (linux64 / "repodata.json").write_text(json.dumps(empty, indent=2))

    channel = LocalChannel(path=dest)
    for fn, rec in channel.repodata("noarch").get("packages", {}).items():
        channel.packages.append(
            PackageFile(
                rec["name"], rec["version"], noarch / fn, (noarch / fn).resolve().as_uri(), rec["md5"], rec["sha256"]
            )
        )
    if [(p.name, p.version) for p in channel.packages] != [(NAME, VERSION)]:
        raise RuntimeError(f"index of {dest} lists {channel.packages}, expected {NAME}-{VERSION}")
    return channel
