"""pytest fixtures for the local Slurm test cluster (see ``tests/cluster/slurm.py``).

In ``tests/conftest.py``::

    from tests.cluster.fixtures import slurm_cluster  # noqa: F401  (session fixture)

and in a test::

    @pytest.mark.slurm
    def test_something(slurm_cluster):
        jobid = slurm_cluster.sbatch(["--wait", "--wrap", "hostname"])
        assert slurm_cluster.sacct(jobid, ["State"], allocations_only=True)[0]["State"] == "COMPLETED"

The fixture starts one cluster per pytest session (2 nodes x 2 CPUs x 4000 MB x 2 fake
GPUs, partition ``debug``; 1 CPU-only node, partition ``cpu``; account ``lab``; about 4 s)
and stops it at the end.  It skips,
with the reason shown by ``pytest -rs``, only where Slurm truly cannot run here (not root,
not Linux, packages missing and apt-get unavailable or failing); a cluster that should
start but does not is a test *error* carrying the daemon log tail.

For another shape: ``slurm_cluster_3n = slurm_cluster_fixture("slurm_cluster_3n", nodes=3)``.

Under pytest-xdist the controlling process starts the cluster before its workers
(``pytest_configure``, which ``tests/conftest.py`` takes in) and names it in
``MNISTFLOW_SLURM_CLUSTER``; each worker's fixture then uses that cluster and neither starts
nor stops it. A skip or a start error reaches the Slurm tests as it would in one process.
"""

from __future__ import annotations

import json
import os

import pytest

from tests.cluster.slurm import SlurmCluster, SlurmInUse, SlurmStartError

# One cluster per process: the fixture may be collected twice (imported by tests/conftest.py and
# by a test module), which gives pytest two session fixtures; they share the running cluster.
_shared: dict = {"cluster": None, "kwargs": None, "refs": 0, "skip_reason": None}

# Set by start_for_workers in the controlling process: {"kwargs": ...}, {"skip": reason} or
# {"error": message}.
WORKERS_ENV = "MNISTFLOW_SLURM_CLUSTER"
SESSION = pytest.StashKey()


def pytest_configure(config):
    """Under pytest-xdist (`make test` runs two workers): one cluster for the session, started
    here, in the controlling process, before the workers, which use it."""
    if getattr(config.option, "numprocesses", None) and not hasattr(config, "workerinput"):
        config.stash[SESSION] = start_for_workers()


def pytest_unconfigure(config):
    session = config.stash.get(SESSION, None)
    if session is not None:
        session.close()  # stops the cluster


def start_for_workers(**kwargs):
    """Start the session's cluster in this (controlling) process for the workers to use.

    Returns a generator to close when the session ends, which stops the cluster.
    """
    session = _cluster_session(**kwargs)
    try:
        next(session)
        os.environ[WORKERS_ENV] = json.dumps({"kwargs": kwargs})
    except pytest.skip.Exception as skipped:
        os.environ[WORKERS_ENV] = json.dumps({"skip": str(skipped.msg)})
    except Exception as failed:  # each Slurm test's error, as in one process; the other tests run
        os.environ[WORKERS_ENV] = json.dumps({"error": f"{type(failed).__name__}: {failed}"})
    return session


def _cluster_session(**kwargs):
    started_for_us = json.loads(os.environ.get(WORKERS_ENV) or "null")
    if started_for_us is not None and _shared["cluster"] is None:  # an xdist worker
        if "skip" in started_for_us:
            pytest.skip(started_for_us["skip"])
        if "error" in started_for_us:
            raise SlurmStartError(f"the session's Slurm test cluster did not start: {started_for_us['error']}")
        if started_for_us["kwargs"] != kwargs:
            raise RuntimeError(f"the session's Slurm test cluster has {started_for_us['kwargs']}, not {kwargs}")
        cluster = SlurmCluster(**kwargs)
        cluster.started = True
        yield cluster
        return
    if _shared["skip_reason"]:
        pytest.skip(_shared["skip_reason"])
    if _shared["cluster"] is not None:
        if _shared["kwargs"] != kwargs:
            raise RuntimeError(
                f"a Slurm test cluster with {_shared['kwargs']} is already running in this session; "
                f"cannot start another one with {kwargs} (one cluster per machine)"
            )
    else:
        cluster = SlurmCluster(**kwargs)
        try:
            reason = cluster.start_or_reason()
        except SlurmInUse as busy:  # another pytest session's cluster: neither use nor stop it
            _shared["skip_reason"] = f"Slurm test cluster unavailable: {busy}"
            pytest.skip(_shared["skip_reason"])
        except BaseException:
            cluster.stop()  # leave no half-started daemons; their logs stay in /var/log/slurm
            raise
        if reason:
            _shared["skip_reason"] = f"Slurm test cluster unavailable: {reason}"
            pytest.skip(_shared["skip_reason"])
        _shared.update(cluster=cluster, kwargs=kwargs)
    _shared["refs"] += 1
    try:
        yield _shared["cluster"]
    finally:
        _shared["refs"] -= 1
        if _shared["refs"] == 0:
            cluster, _shared["cluster"], _shared["kwargs"] = _shared["cluster"], None, None
            notes = cluster.stop()
            if notes:
                print(f"[slurm test cluster] stop: {'; '.join(notes)}")


def slurm_cluster_fixture(name: str, **kwargs):
    """Return a session-scoped fixture called ``name`` yielding a started ``SlurmCluster(**kwargs)``.

    Usage in a conftest: ``slurm_cluster_3n = slurm_cluster_fixture("slurm_cluster_3n", nodes=3)``.
    Only one cluster can run at a time on a machine (fixed ports and paths): don't use two
    differently shaped cluster fixtures in one session.
    """

    @pytest.fixture(scope="session", name=name)
    def _fixture():
        """Session-wide local Slurm cluster; skips only if Slurm cannot run on this machine."""
        yield from _cluster_session(**kwargs)

    return _fixture


slurm_cluster = slurm_cluster_fixture("slurm_cluster")
