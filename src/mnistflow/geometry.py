"""The one place a run's geometry becomes numbers.

A run's geometry (`nodes`, `devices` per node, `accelerator`) is written once in config.
This module turns it into the three things that must agree:

* the Slurm request of the training rule (`slurm_resources`),
* the Trainer's `num_nodes` / `devices` / `strategy` (`trainer_kwargs`),
* the process layout of a launch, under srun or the local launcher (`srun_args`,
  `check_environment`).

`PartitionNodes` holds what a Slurm partition's nodes offer (from `sinfo`), so a geometry that
no node of the partition can hold is refused before anything is submitted: Slurm itself
accepts such a job and leaves it pending for ever (reason PartitionConfig).

It imports nothing heavy: the Snakefile calls it at parse time.
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import asdict, dataclass
from typing import Mapping

ACCELERATORS = ("auto", "cpu", "gpu")


class GeometryError(Exception):
    """The granted processes do not match the geometry the run asked for."""


@dataclass(frozen=True)
class Geometry:
    nodes: int = 1
    devices: int = 1  # processes (one per GPU, or CPU processes) on each node
    accelerator: str = "auto"

    def __post_init__(self):
        if not isinstance(self.nodes, int) or self.nodes < 1:
            raise ValueError(f"nodes: {self.nodes!r} is not an integer >= 1")
        if not isinstance(self.devices, int) or self.devices < 1:
            raise ValueError(f"devices: {self.devices!r} is not an integer >= 1")
        if self.accelerator not in ACCELERATORS:
            raise ValueError(f"accelerator: {self.accelerator!r} is not one of {list(ACCELERATORS)}")

    @classmethod
    def from_run(cls, run: Mapping) -> "Geometry":
        return cls(int(run.get("nodes", 1)), int(run.get("devices", 1)), run.get("accelerator", "auto"))

    @property
    def world_size(self) -> int:
        return self.nodes * self.devices

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def requests_gpus(self) -> bool:
        # `auto` asks a cluster for GPUs and lets the Trainer fall back to CPU processes when
        # none are visible; set `accelerator: cpu` for a CPU-only partition.
        return self.accelerator != "cpu"

    def as_dict(self) -> dict:
        return asdict(self)

    # ---- reader 1: the Trainer ------------------------------------------------------------
    def trainer_kwargs(self) -> dict:
        # Always pass num_nodes and devices: under srun, a Trainer left with defaults trains
        # every task alone, silently, with no DDP at all.
        return {
            "accelerator": self.accelerator,
            "num_nodes": self.nodes,
            "devices": self.devices,
            "strategy": "ddp" if self.distributed else "auto",
        }

    # ---- reader 2: Slurm (snakemake-executor-plugin-slurm resources) ------------------------
    def slurm_resources(self) -> dict:
        """Resources for the training rule; cpus, memory and time come from the profile.

        How the plugin (2.8.0) maps them: `nodes` -> --nodes; with the `mpi` resource the job
        is not wrapped in `srun -n1`, and `tasks` -> --ntasks or `tasks_per_node` ->
        --ntasks-per-node (it takes one of the two, each > 1); `gres="gpu:N"` is per node,
        whereas `gpu=N` would be per job. On a GPU job the plugin turns `tasks` into
        --ntasks-per-gpu unless `tasks_per_gpu` is given: 0 leaves it out.
        """
        res: dict = {"nodes": self.nodes}
        if self.distributed:
            res["mpi"] = "srun"
            if self.devices > 1:
                res["tasks_per_node"] = self.devices
            else:  # one task per node: --nodes=N --ntasks=N puts exactly one on each
                res["tasks"] = self.world_size
        if self.requests_gpus:
            res["gres"] = f"gpu:{self.devices}"
            res["tasks_per_gpu"] = 0
        return res

    def partition_problem(self, partition: "PartitionNodes") -> str | None:
        """Why no allocation of `partition` can hold this geometry, and the fix; None if one can."""
        if self.requests_gpus and partition.gpus and not any(partition.gpus):
            return (
                f"it asks for GPUs (`accelerator: {self.accelerator}` asks Slurm for {self.devices} GPU(s) a node), "
                f"but Slurm partition '{partition.name}' has no GPUs ({partition.describe()}); "
                "set the run's `accelerator: cpu` to train on CPU processes there, or choose a GPU partition"
            )
        if self.requests_gpus:
            fitting = sum(g >= self.devices for g in partition.gpus)
            need = f"{self.nodes} node(s) with {self.devices} GPU(s) each (`nodes`, `devices`)"
        else:
            fitting = len(partition.gpus)
            need = f"{self.nodes} node(s) (`nodes`)"
        if fitting >= self.nodes:
            return None
        return (
            f"it asks for {need}, but Slurm partition '{partition.name}' has {fitting} such node(s) "
            f"({partition.describe()}); lower the run's `devices` or `nodes`, or choose another slurm_partition"
        )

    # ---- reader 3: the launch -------------------------------------------------------------
    def srun_args(self, cpus_per_task: int) -> list[str]:
        """srun's step geometry; the batch step's SLURM_* are stripped by the plugin, so say it all."""
        args = [
            "srun",
            f"--nodes={self.nodes}",
            f"--ntasks={self.world_size}",
            f"--ntasks-per-node={self.devices}",
            f"--cpus-per-task={cpus_per_task}",
            "--kill-on-bad-exit=1",
            # The plugin strips SLURM_JOB_NAME, so srun would name the step after the program;
            # Lightning treats a step named "bash" as interactive and ignores Slurm.
            "--job-name=mnistflow-train",
        ]
        if self.requests_gpus:
            args.append(f"--gres=gpu:{self.devices}")
        return args

    def local_gpus(self, node_rank: int, gpu_count: int) -> tuple[list[int], bool]:
        """GPU indices for one node process of the local launcher, and whether GPUs are shared.

        Every "node" of a local run sees all of this machine's GPUs, so node k takes the k-th
        slice of `devices` of them. With fewer GPUs than processes the slices wrap around and
        processes share GPUs, which NCCL refuses: the caller then uses gloo.
        """
        if gpu_count < 1:
            raise ValueError("no GPU to lay out")
        first = node_rank * self.devices
        return [(first + k) % gpu_count for k in range(self.devices)], self.world_size > gpu_count

    def check_environment(self, env: Mapping[str, str] = os.environ) -> dict:
        """Compare the processes this run was given with the geometry it asked for.

        Under Slurm (SLURM_NTASKS set) this checks nodes, tasks per node and, for
        `accelerator: gpu`, GPUs visible per task; under the local launcher, the world
        size and node rank. Raises GeometryError naming what was requested and what was
        granted, instead of letting DDP hang at "Initializing distributed".
        """
        requested = f"{self.nodes} node(s) x {self.devices} device(s) = {self.world_size} process(es)"
        if "SLURM_NTASKS" in env and "SLURM_STEP_ID" in env:
            granted_nodes = int(env.get("SLURM_NNODES", env.get("SLURM_STEP_NUM_NODES", "1")))
            ntasks = int(env["SLURM_NTASKS"])
            per_node = _first_count(env.get("SLURM_NTASKS_PER_NODE") or env.get("SLURM_STEP_TASKS_PER_NODE") or "")
            granted = f"{granted_nodes} node(s), {ntasks} task(s), tasks per node {per_node or 'unset'}"
            problems = []
            if granted_nodes != self.nodes:
                problems.append(f"SLURM_NNODES={granted_nodes} but nodes={self.nodes}")
            if ntasks != self.world_size:
                problems.append(f"SLURM_NTASKS={ntasks} but nodes x devices={self.world_size}")
            if self.distributed and per_node != self.devices:
                problems.append(f"SLURM_NTASKS_PER_NODE={per_node or 'unset'} but devices={self.devices}")
            if self.accelerator == "gpu":
                visible = _visible_gpus(env)
                if visible is not None and visible < 1:
                    problems.append("no GPU is visible to this task (CUDA_VISIBLE_DEVICES is empty)")
            if problems:
                raise GeometryError(
                    f"Slurm granted {granted}; the run asked for {requested}: " + "; ".join(problems)
                    + ". Launch with `srun --nodes=N --ntasks-per-node=devices` (the workflow's launcher does)."
                )
            return {"launcher": "srun", "nodes": granted_nodes, "tasks": ntasks, "tasks_per_node": per_node}
        if "NODE_RANK" in env and "MASTER_ADDR" in env:
            granted_world = int(env.get("MNISTFLOW_WORLD_SIZE", self.world_size))
            if granted_world != self.world_size:
                raise GeometryError(f"the local launcher started {granted_world} process(es); the run asked for {requested}")
            return {"launcher": "local", "nodes": self.nodes, "node_rank": int(env["NODE_RANK"])}
        if self.nodes > 1:
            raise GeometryError(
                f"the run asked for {requested} but was started as a single process without a launcher; "
                "start it with `python -m mnistflow.launch` (locally) or srun (on Slurm)"
            )
        return {"launcher": "none", "nodes": 1}


def _first_count(tasks_per_node: str) -> int | None:
    """SLURM_NTASKS_PER_NODE is "2" or "2(x3)" or "2,1"; return the first count."""
    head = tasks_per_node.split(",")[0].split("(")[0]
    return int(head) if head.isdigit() else None


def _visible_gpus(env: Mapping[str, str]) -> int | None:
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return None
    return len([d for d in visible.split(",") if d.strip()])


@dataclass(frozen=True)
class PartitionNodes:
    """The GPUs of each node of one Slurm partition."""

    name: str
    gpus: tuple[int, ...]

    def describe(self) -> str:
        counts = sorted(set(self.gpus), reverse=True)
        per = ", ".join(f"{sum(g == c for g in self.gpus)} with {c} GPU(s)" for c in counts)
        return f"{len(self.gpus)} node(s): {per}" if self.gpus else "no nodes"

    @classmethod
    def from_sinfo(cls, text: str, partition: str | None = None) -> "PartitionNodes":
        """Parse `sinfo --noheader --Node --format=%N|%G|%P`; `partition` None: Slurm's default one."""
        rows = []
        for line in text.splitlines():
            if line.strip():
                node, gres, part = line.strip().split("|")
                rows.append((node, gres, part))
        if partition is None:
            defaults = {part.rstrip("*") for _, _, part in rows if part.endswith("*")}
            if len(defaults) != 1:
                raise GeometryError("Slurm has no default partition: set the slurm_partition resource")
            partition = defaults.pop()
        nodes = {node: _gpus_in_gres(gres) for node, gres, part in rows if part.rstrip("*") == partition}
        if not nodes:
            known = sorted({part.rstrip("*") for _, _, part in rows})
            raise GeometryError(f"Slurm has no partition '{partition}' (sinfo lists {known})")
        return cls(partition, tuple(nodes[n] for n in sorted(nodes)))

    @classmethod
    def query(cls, partition: str | None = None, timeout: float = 20) -> "PartitionNodes":
        out = subprocess.run(
            ["sinfo", "--noheader", "--Node", "--format=%N|%G|%P"],
            capture_output=True, text=True, timeout=timeout, check=True,
        ).stdout
        return cls.from_sinfo(out, partition)


def _gpus_in_gres(gres: str) -> int:
    """GPUs in a node's sinfo GRES: "gpu:2", "gpu:a100:4(S:0-1)", "gpu:2,mps:100", "(null)"."""
    total = 0
    for item in re.split(r",(?![^(]*\))", gres):  # commas inside "(S:0,1)" do not separate
        fields = item.split("(")[0].split(":")
        if fields[0] == "gpu" and len(fields) >= 2 and fields[-1].isdigit():
            total += int(fields[-1])
    return total
