"""Start the processes of a distributed run: under srun on Slurm, or locally as real nodes.

The training entry point calls `relaunch` first. A run of one process just goes on. A
distributed run that has not been launched yet is started again as `nodes x devices`
processes:

* inside a Slurm allocation, by `srun` with the step geometry from `Geometry.srun_args`
  (Lightning's SLURMEnvironment then reads ranks from SLURM_*);
* elsewhere, as `nodes` launcher processes on this machine, each given NODE_RANK,
  MASTER_ADDR and MASTER_PORT as a real node would be; Lightning in each of them starts
  `devices` processes, so the rendezvous is the genuine multi-node one.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Sequence

from .geometry import Geometry

log = logging.getLogger(__name__)

LAUNCHED = "MNISTFLOW_LAUNCHED"
WORLD_SIZE = "MNISTFLOW_WORLD_SIZE"
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def in_slurm_allocation(env=os.environ) -> bool:
    return "SLURM_JOB_ID" in env


def relaunch(geometry: Geometry, module: str, argv: Sequence[str], cpus_per_task: int) -> int | None:
    """Start the run's processes if this is the unlaunched parent; return its exit code.

    Returns None when this process is itself one of the run's processes and should train.
    """
    if not geometry.distributed or os.environ.get(LAUNCHED):
        return None
    command = [sys.executable, "-m", module, *argv]
    env = {**os.environ, LAUNCHED: "1", WORLD_SIZE: str(geometry.world_size)}
    if in_slurm_allocation():
        srun = geometry.srun_args(cpus_per_task)
        # Lightning derives MASTER_PORT from the job id (15000 + its last 4 digits), which
        # collides between jobs sharing a node; an explicit free port on this host, the
        # allocation's first node where rank 0 runs, takes precedence.
        env.setdefault("MASTER_PORT", str(free_port()))
        log.info("launching under Slurm: %s (MASTER_PORT %s)", " ".join(srun), env["MASTER_PORT"])
        os.execvpe(srun[0], srun + command, env)
    return run_local(geometry, command, env)


def run_local(geometry: Geometry, command: Sequence[str], env: dict, grace_s: float = 10.0) -> int:
    """One process per node on this machine; the first failure stops the others."""
    port = free_port()
    env = {**env, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # every "node" is on this host's loopback
    procs = []
    for node_rank in range(geometry.nodes):
        procs.append(subprocess.Popen(command, env={**env, "NODE_RANK": str(node_rank)}))
    log.info("local launch: %d node process(es) x %d device(s), master 127.0.0.1:%d", geometry.nodes, geometry.devices, port)

    def forward(signum, _frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in FORWARDED_SIGNALS}
    try:
        failed = None
        while failed is None and any(p.poll() is None for p in procs):
            failed = _first_failure(procs)
            time.sleep(0.2)
        if failed is None:
            failed = _first_failure(procs)
        if failed is None:
            return 0
        code = procs[failed].returncode
        log.error("node rank %d %s; stopping the other node(s)", failed, _describe(code))
        _stop(procs, grace_s)
        return code if code > 0 else 128 - code
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _first_failure(procs) -> int | None:
    """The node rank to name among those that failed so far: one killed by a signal (the
    others then fail because it left the collective), else the lowest; None if none failed."""
    failed = [rank for rank, p in enumerate(procs) if p.poll() not in (None, 0)]
    killed = [rank for rank in failed if procs[rank].returncode < 0]
    return (killed or failed or [None])[0]


def _describe(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name} (exit code {code})"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def _stop(procs, grace_s: float) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + grace_s
    for rank, p in enumerate(procs):
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.error("node rank %d did not stop within %g s of SIGTERM (hung, e.g. in a collective); killing it", rank, grace_s)
            p.kill()
            p.wait()
