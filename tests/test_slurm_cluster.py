"""The local Slurm test cluster (tests/cluster/slurm.py) works, and snakemake's slurm executor runs on it.

Run: ``.venv/bin/python -m pytest tests/test_slurm_cluster.py -x -q -rs``  (needs root; ~60 s).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.cluster.fixtures import slurm_cluster  # noqa: F401  (session fixture, shared with conftest)

pytestmark = pytest.mark.slurm

SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))


def _wait_for(predicate, timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def _sacct_when_complete(cluster, jobid, fields, n_rows):
    """sacct rows for a finished job once slurmdbd has them all (accounting is asynchronous)."""
    cluster.wait_accounted(jobid)

    def rows():
        r = cluster.sacct(jobid, fields)
        return r if len(r) >= n_rows and all(row["State"] == "COMPLETED" for row in r) else None

    return _wait_for(rows, 15, f"sacct to report job {jobid} COMPLETED with {n_rows} rows")


def test_cluster_has_idle_gpu_nodes(slurm_cluster):
    c = slurm_cluster
    print(f"bring-up timings: {c.timings}")
    everything = c.nodes_info()
    nodes = [n for n in everything if n["partition"] == "debug*"]
    assert [n["name"] for n in nodes] == ["n1", "n2"], c.describe()
    # and a CPU-only partition, as many clusters have
    assert [(n["name"], n["gres"], n["partition"]) for n in everything if n not in nodes] == [("c1", "(null)", "cpu")]
    for n in nodes:
        assert n["state"] == "idle", c.describe()
        assert n["gres"] == "gpu:2"
        assert n["cpus"] == "2"
        assert n["memory"] == "4000"
        assert n["partition"] == "debug*"
    node = c.scontrol_show_node("n2")
    assert node["Gres"] == "gpu:2"
    assert node["NodeAddr"] == "127.0.2.2"
    assert "gres/gpu=2" in node["CfgTRES"]
    # the account exists in slurmdbd with an association for root (snakemake's plugin checks this)
    assocs = c.run(["sacctmgr", "-n", "-P", "show", "assoc", "where", "user=root", "format=account"]).stdout.split()
    assert "lab" in assocs
    # MinJobAge keeps finished jobs visible to scontrol for minutes
    config = c.run(["scontrol", "show", "config"]).stdout
    assert "MinJobAge               = 600 sec" in config
    assert "JobRequeue              = 1" in config


def test_two_node_gpu_batch_job(slurm_cluster, tmp_path):
    c = slurm_cluster
    script = textwrap.dedent("""\
        #!/bin/bash
        echo "batch SLURM_STEP_ID=${SLURM_STEP_ID-unset} SLURM_JOB_ID=${SLURM_JOB_ID-unset} SLURM_NTASKS=${SLURM_NTASKS-unset}"
        srun bash -c 'echo "task $SLURM_PROCID/$SLURM_NTASKS on $SLURMD_NODENAME step=$SLURM_STEP_ID gpus=$CUDA_VISIBLE_DEVICES"'
        """)
    out = tmp_path / "job.out"
    jobid = c.sbatch(
        [
            "--wait",
            "--nodes=2",
            "--ntasks-per-node=1",
            "--gres=gpu:1",
            "--cpus-per-task=1",
            "--mem=500",
            "--time=2",
            "--job-name=twonode",
            f"--output={out}",
        ],
        script,
        cwd=tmp_path,
        timeout=120,
    )
    text = out.read_text()
    lines = text.splitlines()
    # the batch script is not a job step: no SLURM_STEP_ID, but the job's id and task count
    assert lines[0] == f"batch SLURM_STEP_ID=unset SLURM_JOB_ID={jobid} SLURM_NTASKS=2", text
    tasks = sorted(line for line in lines[1:] if line.startswith("task "))
    assert tasks == ["task 0/2 on n1 step=0 gpus=0", "task 1/2 on n2 step=0 gpus=0"], text

    job = c.scontrol_show_job(jobid)
    assert job["JobState"] == "COMPLETED"
    assert job["ExitCode"] == "0:0"
    assert job["NodeList"] == "n[1-2]"
    assert job["NumNodes"] == "2"
    assert job["NumTasks"] == "2"
    assert job["CPUs/Task"] == "1"
    assert job["MinMemoryNode"] == "500M"
    assert job["TimeLimit"] == "00:02:00"
    assert job["TresPerNode"] == "gres:gpu:1"
    assert job["Account"] == "lab" and job["Partition"] == "debug"
    assert set(job["TRES"].split(",")) >= {"cpu=2", "mem=1000M", "node=2", "gres/gpu=2"}

    fields = ["JobID", "JobName", "State", "NodeList", "NNodes", "NTasks", "NCPUS", "AllocTRES", "Timelimit"]
    rows = {r["JobID"]: r for r in _sacct_when_complete(c, jobid, fields, 3)}
    alloc, step = rows[str(jobid)], rows[f"{jobid}.0"]
    assert alloc["JobName"] == "twonode"
    assert alloc["NodeList"] == "n[1-2]" and alloc["NNodes"] == "2" and alloc["NCPUS"] == "2"
    assert alloc["Timelimit"] == "00:02:00"
    assert set(alloc["AllocTRES"].split(",")) >= {"cpu=2", "mem=1000M", "node=2", "gres/gpu=2"}
    assert step["NodeList"] == "n[1-2]" and step["NTasks"] == "2"
    assert f"{jobid}.batch" in rows
    assert c.sacct(jobid, ["JobID", "State"], allocations_only=True) == [{"JobID": str(jobid), "State": "COMPLETED"}]


def test_signal_reaches_step_and_requeue(slurm_cluster, tmp_path):
    c = slurm_cluster
    out = tmp_path / "rq.out"
    script = textwrap.dedent("""\
        #!/bin/bash
        echo "start restart=${SLURM_RESTART_COUNT:-0}"
        if [ "${SLURM_RESTART_COUNT:-0}" = 0 ]; then
          srun bash -c 'trap "echo step got USR1 on \\$SLURMD_NODENAME; exit 0" USR1; echo ready; while :; do sleep 0.1; done'
          sleep 300
        fi
        echo finished
        """)
    jobid = c.sbatch(["--time=3", "--open-mode=append", f"--output={out}"], script, cwd=tmp_path)
    _wait_for(lambda: out.exists() and "ready" in out.read_text(), 30, "the job step to start")
    c.run(["scancel", "--signal=USR1", str(jobid)])
    _wait_for(lambda: "step got USR1 on n1" in out.read_text(), 15, "USR1 in the job step")
    c.run(["scontrol", "requeue", str(jobid)])
    # requeued jobs wait cred_expire (10 s) + 1 s before they are eligible again
    job = _wait_for(
        lambda: (j := c.scontrol_show_job(jobid))["JobState"] == "COMPLETED" and j["Restarts"] == "1" and j,
        45,
        "the requeued job to finish",
    )
    assert job["ExitCode"] == "0:0"
    text = out.read_text()
    assert "start restart=0" in text and "start restart=1" in text and "finished" in text, text


def test_snakemake_slurm_executor(slurm_cluster, tmp_path):
    c = slurm_cluster
    (tmp_path / "Snakefile").write_text(textwrap.dedent("""\
            rule all:
                input: "hello.txt", "mpi_env.txt", "mpi_nodes.txt"

            rule hello:
                output: "hello.txt"
                resources: runtime=2, mem_mb=200
                shell: "(printenv SLURMD_NODENAME; env | grep ^SLURM_ | sort) > {output}"

            # a 2-node "mpi" rule: the jobstep plugin does not wrap it in srun and strips the
            # allocation's SLURM_* task variables, so the shell passes the task geometry itself
            rule mpi:
                input: "hello.txt"
                output: env="mpi_env.txt", nodes="mpi_nodes.txt"
                resources: nodes=2, tasks=2, mpi="srun", gres="gpu:1", runtime=2, mem_mb=500
                shell:
                    "env | grep ^SLURM | sort > {output.env}; "
                    "{resources.mpi} -n {resources.tasks} --ntasks-per-node=1 printenv SLURMD_NODENAME > {output.nodes}"
            """))
    cmd = [
        "timeout", "-k", "10", "300",
        SNAKEMAKE, "--executor", "slurm", "--jobs", "2",
        "--default-resources", "slurm_account=lab", "slurm_partition=debug",
        "--slurm-init-seconds-before-status-checks", "1",
        "--slurm-keep-successful-logs",
    ]  # fmt: skip
    t0 = time.monotonic()
    r = subprocess.run(cmd, cwd=tmp_path, env=c.env(), capture_output=True, text=True, timeout=330)
    elapsed = time.monotonic() - t0
    print(f"snakemake --executor slurm took {elapsed:.1f}s")
    log = r.stdout + r.stderr
    assert r.returncode == 0, f"snakemake failed (rc={r.returncode}):\n{log[-6000:]}\n{c.describe()}"

    hello = (tmp_path / "hello.txt").read_text().splitlines()
    assert hello[0] in ("n1", "n2")
    # normal rules run inside `srun -n1 ...` in the job: a job step with one task
    assert "SLURM_STEP_ID=0" in hello and "SLURM_NTASKS=1" in hello, hello

    env = dict(line.split("=", 1) for line in (tmp_path / "mpi_env.txt").read_text().splitlines())
    assert env.keys() >= {"SLURM_JOB_ID", "SLURM_JOBID", "SLURM_CLUSTER_NAME", "SLURM_SUBMIT_DIR"}
    assert not env.keys() & {"SLURM_NTASKS", "SLURM_STEP_ID", "SLURM_NNODES", "SLURM_NODELIST"}, env
    assert sorted((tmp_path / "mpi_nodes.txt").read_text().split()) == ["n1", "n2"]

    # both rules ran as Slurm jobs of this run; their logs are kept under .snakemake/slurm_logs
    logs = sorted(p.relative_to(tmp_path).parts[:3] for p in (tmp_path / ".snakemake/slurm_logs").rglob("*.log"))
    assert [p[2] for p in logs] == ["rule_hello", "rule_mpi"], logs
    mpi_jobid = next((tmp_path / ".snakemake/slurm_logs/rule_mpi").glob("*.log")).stem
    rows = _sacct_when_complete(c, mpi_jobid, ["JobID", "State", "NodeList", "AllocTRES"], 1)
    alloc = next(row for row in rows if row["JobID"] == mpi_jobid)
    assert alloc["NodeList"] == "n[1-2]"
    assert "gres/gpu=2" in alloc["AllocTRES"] and "node=2" in alloc["AllocTRES"]
    assert os.path.exists(tmp_path / "mpi_nodes.txt")
