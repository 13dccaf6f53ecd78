"""Processes of a workflow run in a test: Snakemake in the background, and its jobs found by
command line. Processes are only ever signalled by id: the Snakemake a test started (its
process group) or a job process found in /proc by its command line and its working
directory, which is the test's private copy of the workflow."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

from tests.conftest import Workflow


class Background:
    """Snakemake started in its own session (process group), its output in a file."""

    def __init__(self, wf: Workflow, *args, env: dict | None = None):
        self.output_path = wf.root / f"snakemake-{time.monotonic_ns()}.out"
        with open(self.output_path, "w") as out:
            self.proc = subprocess.Popen(
                wf.command(*args), cwd=wf.root, env={**wf.env(), **(env or {})},
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout=timeout)

    def output(self) -> str:
        return self.output_path.read_text()

    def kill_group(self) -> None:
        """SIGKILL Snakemake and every job it started (they share its process group)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=30)


@contextlib.contextmanager
def background(wf: Workflow, *args, env: dict | None = None):
    bg = Background(wf, *args, env=env)
    try:
        yield bg
    finally:
        bg.kill_group()  # whatever the test left running: only this test's processes


def wait_for(predicate, timeout: float, what: str, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)
    return value


def job_processes(wf: Workflow, module: str, run: str | None = None, node_rank: int | None = None) -> list[int]:
    """Ids of the `python -m mnistflow.<module>` processes running in this workflow copy."""
    root = os.path.realpath(wf.root)
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            args = [a.decode(errors="replace") for a in Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")]
            if f"mnistflow.{module}" not in args or os.readlink(f"/proc/{entry}/cwd") != root:
                continue
            if run is not None and (args[args.index("--run") + 1] if "--run" in args else None) != run:
                continue
            if node_rank is not None:
                env = dict(
                    kv.split("=", 1) for kv in Path(f"/proc/{entry}/environ").read_bytes().decode(errors="replace").split("\0") if "=" in kv
                )
                if env.get("NODE_RANK") != str(node_rank):
                    continue
        except (OSError, ValueError, IndexError):
            continue  # exited meanwhile
        found.append(int(entry))
    return found


def one_process(wf, module, run=None, node_rank=None, timeout=120) -> int:
    pids = wait_for(lambda: job_processes(wf, module, run, node_rank), timeout, f"the {module} process of {run}")
    assert len(pids) == 1, pids
    return pids[0]
