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
        log.info("launching under Slurm: %s", " ".join(srun))
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
            for rank, p in enumerate(procs):
                if p.poll() not in (None, 0):
                    failed = rank
                    break
            time.sleep(0.2)
        if failed is None:
            failed = next((rank for rank, p in enumerate(procs) if p.returncode), None)
        if failed is None:
            return 0
        code = procs[failed].returncode
        log.error("node rank %d exited with code %s; stopping the other node(s)", failed, code)
        _stop(procs, grace_s)
        return code if code > 0 else 128 - code
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _stop(procs, grace_s: float) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
