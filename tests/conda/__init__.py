"""Offline ``conda`` TEST DOUBLE for testing ``snakemake --sdm conda``.

* ``channel.py``      builds a tiny local channel (noarch ``tinytool``/``tinylib``).
* ``conda_double.py`` the double itself (only the calls Snakemake 9.27.1 makes),
  launched by ``bin/conda``; ``bin/activate``/``bin/deactivate`` do activation.
* ``fixtures.py``     the session-scoped ``conda_double`` pytest fixture.
* ``venv_python.py``  a channel with ``venv-python``, whose ``bin/python`` runs the test
  venv's Python: the real workflow's rules run inside double-made environments.

:func:`double_env` returns the environment variables a subprocess (Snakemake)
needs to find and use the double.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
#: Directory to put first on PATH: holds ``conda`` (and ``activate``/``deactivate``).
BIN_DIR = HERE / "bin"

#: Slurm client commands (Debian package ``slurm-client``).  When ``sinfo`` is on
#: PATH, snakemake-executor-plugin-slurm runs ``scontrol show config`` (5 s
#: timeout, twice) while Snakemake builds its CLI, i.e. on *every* start, even
#: for local runs; with no Slurm controller that costs ~10 s per call.
SLURM_CLIENT_TOOLS = frozenset(
    {
        "sacct",
        "sacctmgr",
        "salloc",
        "sattach",
        "sbatch",
        "sbcast",
        "scancel",
        "scontrol",
        "scrontab",
        "sdiag",
        "sinfo",
        "sprio",
        "squeue",
        "sreport",
        "srun",
        "sshare",
        "sstat",
        "strigger",
        "sview",
    }
)


def path_without(
    names=SLURM_CLIENT_TOOLS, path: str | None = None, shadow_root: Path | None = None
) -> str:
    """``path`` (default ``$PATH``) with the commands ``names`` made unresolvable.

    Each PATH directory that contains one of ``names`` is replaced by a "shadow"
    directory under ``shadow_root`` holding symlinks to every *other* entry of
    the original, so everything else (``bash``, ``which``, coreutils, ...)
    resolves exactly as before.  Directories without such commands are kept.
    Creating a shadow of /usr/bin (~1200 symlinks) takes a few ms.
    """
    if path is None:
        path = os.environ.get("PATH", "")
    if shadow_root is None:
        raise ValueError(
            "shadow_root is required (a writable directory, e.g. a tmp dir)"
        )
    shadow_root = Path(shadow_root)
    out: list[str] = []
    for i, d in enumerate(path.split(os.pathsep)):
        if not d:
            continue
        try:
            entries = os.listdir(d)
        except OSError:
            out.append(d)
            continue
        if not set(entries) & set(names):
            out.append(d)
            continue
        shadow = shadow_root / f"{i:02d}-{d.strip('/').replace('/', '_') or 'root'}"
        if not shadow.is_dir():
            shadow.mkdir(parents=True)
            for entry in entries:
                if entry not in names:
                    os.symlink(os.path.join(d, entry), shadow / entry)
        out.append(str(shadow))
    return os.pathsep.join(out)


def double_env(
    *,
    channel_url: str,
    state_dir: Path,
    log_path: Path | None = None,
    python: str | None = None,
    base_env: dict | None = None,
    hide_slurm: bool = True,
) -> dict:
    """Environment for a subprocess that should see the conda double as ``conda``.

    * ``PATH``: ``tests/conda/bin`` first, then ``base_env['PATH']`` (default
      ``os.environ``), with the Slurm client tools hidden if ``hide_slurm``
      (shadow dirs are created under ``state_dir / "path-shadow"``).
    * ``CONDA_DOUBLE_PYTHON``: ``python`` (default ``sys.executable``, i.e. the
      interpreter running the tests, which must have py-rattler).
    * ``CONDA_DOUBLE_CHANNEL``: ``channel_url`` (channel names in env files map to it).
    * ``CONDA_DOUBLE_ROOT``: ``state_dir`` (package cache, repodata cache, named envs).
    * ``CONDA_DOUBLE_LOG``: ``log_path`` if given.

    Conda variables that would leak a real installation into the test
    (``CONDA_PREFIX``, ``CONDA_EXE``, ``CONDARC``, ...) are removed.
    """
    env = dict(os.environ if base_env is None else base_env)
    for key in list(env):
        if key.startswith(("CONDA_", "_CE_", "MAMBA_")) or key in {
            "CONDARC",
            "SNAKEMAKE_CONDA_PREFIX",
        }:
            del env[key]
    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    path = env.get("PATH", os.defpath)
    if hide_slurm:
        path = path_without(SLURM_CLIENT_TOOLS, path, state_dir / "path-shadow")
    env["PATH"] = os.pathsep.join([str(BIN_DIR), path])
    env["CONDA_DOUBLE_PYTHON"] = python or sys.executable
    env["CONDA_DOUBLE_CHANNEL"] = channel_url
    env["CONDA_DOUBLE_ROOT"] = str(state_dir)
    if log_path is not None:
        env["CONDA_DOUBLE_LOG"] = str(log_path)
    return env
