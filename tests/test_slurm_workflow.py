"""The whole chain under `snakemake --executor slurm` on the real local cluster (tests/cluster).

Asserts from scontrol/sacct that each rule's job got what config and profile asked for, that
the DDP run had one rank per task on two distinct nodes, and that a preempted training job
resumes from its checkpoint.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import TEST_CONFIG, Workflow, copy_workflow

pytestmark = pytest.mark.slurm

SLURM_ARGS = (
    "--workflow-profile", "profiles/slurm",
    "--default-resources", "slurm_account=lab", "slurm_partition=debug",
    "--slurm-init-seconds-before-status-checks", "1",
    "--slurm-keep-successful-logs",
    "--jobs", "4",
    # a 2-CPU test node: what a user of a small partition sets in their profile
    "--set-threads", "train=2",
)


def slurm_jobs(wf: Workflow) -> dict[str, list[int]]:
    """{"rule/wildcards": [job ids]} from the plugin's logs: .snakemake/slurm_logs/rule_<rule>/[<wildcards>/]<id>.log"""
    base = wf.root / ".snakemake" / "slurm_logs"
    jobs: dict[str, list[int]] = {}
    for log in sorted(base.rglob("*.log")):
        rule_dir, *wildcards, name = log.relative_to(base).parts
        jobs.setdefault("/".join([rule_dir.removeprefix("rule_"), *wildcards]), []).append(int(Path(name).stem))
    return jobs


@pytest.fixture(scope="module")
def slurm_chain(slurm_cluster, tmp_path_factory, mirror):
    wf = Workflow(copy_workflow(tmp_path_factory.mktemp("slurm-chain")), [TEST_CONFIG])
    wf.write_config("mirror.yaml", mirror.overlay())
    wf.plan = wf.snakemake("--dry-run", *SLURM_ARGS, timeout=120).stdout
    t0 = time.monotonic()
    wf.snakemake(*SLURM_ARGS, timeout=900)
    wf.wall_s = time.monotonic() - t0
    wf.jobs = slurm_jobs(wf)
    return wf


def test_chain_completes_on_slurm(slurm_chain):
    for run in ("single", "multinode"):
        metrics = json.loads(slurm_chain.path(f"results/runs/{run}/eval/metrics.json").read_text())
        assert metrics["accuracy"] > 0.93
    assert slurm_chain.path("results/summary/runs.md").exists()
    # Local rules (the download needs the internet; the others take under a second): no Slurm job for them.
    assert set(slurm_chain.jobs) == {"train/single", "train_ddp/multinode", "evaluate/single", "evaluate/multinode"}, slurm_chain.jobs
    for rule in ("environment", "download", "prepare", "summarize"):
        assert slurm_chain.path(f"results/logs/{rule}.log").exists(), rule


def _job(cluster, wf, key):
    (jobid,) = wf.jobs[key]
    return jobid, cluster.scontrol_show_job(jobid)


def test_each_rule_got_what_it_asked_for(slurm_cluster, slurm_chain):
    expected = {
        # key: (nodes, tasks, cpus per task, memory field, memory, time limit, gres per node)
        "train/single": (1, 1, 2, "MinMemoryNode", "4000M", "01:00:00", "gpu:1"),
        "train_ddp/multinode": (2, 2, 1, "MinMemoryCPU", "2000M", "01:00:00", "gpu:1"),
        "evaluate/single": (1, 1, 2, "MinMemoryNode", "3000M", "00:15:00", None),
    }
    for key, (nodes, tasks, cpus, mem_field, mem, limit, gres) in expected.items():
        jobid, job = _job(slurm_cluster, slurm_chain, key)
        where = f"{key} (job {jobid}): {job}"
        assert job["JobState"] == "COMPLETED", where
        assert int(job["NumNodes"]) == nodes, where
        assert int(job["NumTasks"]) == tasks, where
        assert int(job["CPUs/Task"]) == cpus, where
        assert job[mem_field] == mem, where
        assert job["TimeLimit"] == limit, where
        assert job["Partition"] == "debug" and job["Account"] == "lab", where
        if gres:
            assert gres in job.get("TresPerNode", ""), where
        else:
            assert "gpu" not in job.get("TresPerNode", ""), where
        row = slurm_cluster.sacct(jobid, ["JobID", "State", "NNodes", "AllocCPUS", "Timelimit"], allocations_only=True)[0]
        assert row["State"] == "COMPLETED" and int(row["NNodes"]) == nodes, row


def test_ddp_ran_one_rank_per_task_on_two_nodes(slurm_cluster, slurm_chain):
    record = json.loads(slurm_chain.path("results/runs/multinode/train.json").read_text())
    assert record["world_size"] == 2 and record["num_nodes"] == 2
    assert record["granted"] == {"launcher": "srun", "nodes": 2, "tasks": 2, "tasks_per_node": 1}
    hosts = sorted(h.split("/")[0] for h in record["hosts"])
    assert hosts == ["n1", "n2"], record["hosts"]
    jobid, job = _job(slurm_cluster, slurm_chain, "train_ddp/multinode")
    assert record["slurm_job_id"] == str(jobid)
    steps = slurm_cluster.sacct(jobid, ["JobID", "JobName", "NTasks", "NodeList", "State"])
    train_step = [s for s in steps if s["JobName"] == "mnistflow-train"]
    assert train_step and int(train_step[0]["NTasks"]) == 2 and train_step[0]["State"] == "COMPLETED", steps


def test_dry_run_shows_the_slurm_request(slurm_chain):
    # Snakemake prints each job's resources in the plan, so the cost is visible before submitting.
    block = slurm_chain.plan[slurm_chain.plan.index("rule train_ddp:"):]
    block = block[: block.index("\n\n")] if "\n\n" in block else block
    for needle in ("nodes=2", "mpi=srun", "tasks=2", "gres=gpu:1", "cpus_per_task=1", "mem_mb_per_cpu=2000", "runtime=60", "slurm_partition=debug"):
        assert needle in block, (needle, block)


def _wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.5)
    return value


def _running_train_job(cluster, wf):
    out = subprocess.run(["squeue", "-h", "-o", "%i %k %T"], capture_output=True, text=True, env=cluster.env()).stdout
    for line in out.splitlines():
        jobid, comment, state = line.split()
        if re.fullmatch(r"rule_train(_wildcards_.*)?", comment) and state == "RUNNING":
            return int(jobid)
    return None


@pytest.mark.parametrize("interruption", ["signal", "requeue"])
def test_preempted_training_resumes_from_its_checkpoint(slurm_cluster, tmp_path_factory, mirror, interruption):
    """USR1 (what --signal sends before the time limit) or a requeue mid-run: the run still ends with every epoch."""
    wf = Workflow(copy_workflow(tmp_path_factory.mktemp(f"preempt-{interruption}")), [TEST_CONFIG])
    wf.write_config("mirror.yaml", mirror.overlay())
    # 4 epochs: the signal comes in epoch 1 or 2, so the run must stop early and be resumed
    wf.write_config("extra.yaml", {"runs": {"long": {"epochs": 4, "model": "cnn"}}, "dataset": {"train_limit": 3000}})
    # data and environment first, so the timing below concerns training only
    wf.snakemake("results/data/mnist/train.npz", "results/env/train_env.json", *SLURM_ARGS, timeout=300)
    proc = subprocess.Popen(
        ["timeout", "-k", "10", "600", *wf.command("results/runs/long/train.json", *SLURM_ARGS)],
        cwd=wf.root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=wf.env(),
    )
    ckpt = wf.path("results/runs/long/checkpoints/last.ckpt")
    _wait_for(ckpt.exists, 300, "the first epoch's checkpoint")
    jobid = _wait_for(lambda: _running_train_job(slurm_cluster, wf), 30, "the running training job")
    if interruption == "signal":
        subprocess.run(["scancel", "--signal=USR1", str(jobid)], check=True, env=slurm_cluster.env())
    else:
        subprocess.run(["scontrol", "requeue", str(jobid)], check=True, env=slurm_cluster.env())
    out, _ = proc.communicate(timeout=620)
    assert proc.returncode == 0, out[-6000:] + wf.logs_tail()
    record = json.loads(wf.path("results/runs/long/train.json").read_text())
    assert record["epochs"] == 4
    assert record["resumed_from"] and record["resumed_from"]["checkpoint"].endswith("last.ckpt")
    attempts = record["attempts"]
    assert attempts[-1]["outcome"] == "finished" and attempts[-1]["resumed_from"] == record["resumed_from"], attempts
    if interruption == "signal":
        assert attempts[0]["outcome"].startswith("preempted: SIGUSR1 received at epoch"), attempts
        assert "stopped after saving epoch" in attempts[0]["outcome"], attempts
        assert attempts[0]["slurm_job_id"] == str(jobid)
        assert len(slurm_jobs(wf)["train/long"]) == 2, slurm_jobs(wf)  # the preempted job and its retry
    else:
        # requeue kills the job's processes without warning and starts the same job again:
        # the attempt it ended is on record too, not finished
        assert int(slurm_cluster.scontrol_show_job(jobid)["Restarts"]) == 1
        assert attempts[-1]["slurm_job_id"] == str(jobid)
        assert len(attempts) == 2 and attempts[0]["outcome"] != "finished" and attempts[0]["slurm_job_id"] == str(jobid), attempts


def test_geometry_no_node_of_the_partition_holds_is_refused_before_submission(slurm_cluster, tmp_path_factory, mirror):
    """3 devices per node on nodes with 2 GPUs. Slurm would accept the job and leave it pending
    (PartitionConfig) while Snakemake waits; the workflow asks sinfo first and submits nothing."""
    wf = Workflow(copy_workflow(tmp_path_factory.mktemp("too-wide")), [TEST_CONFIG])
    wf.write_config("mirror.yaml", mirror.overlay())
    wf.write_config("extra.yaml", {"runs": {"wide": {"nodes": 2, "devices": 3, "batch_size": 96}}})
    jobs_before = slurm_cluster.run(["sacct", "-X", "-n", "-a", "-o", "JobID"], timeout=10).stdout.split()
    result = wf.snakemake("results/runs/wide/train.json", *SLURM_ARGS, check=False, timeout=120)
    out = result.stdout + result.stderr
    assert result.returncode != 0
    assert ("run 'wide': it asks for 2 node(s) with 3 GPU(s) each (`nodes`, `devices`), but Slurm partition "
            "'debug' has 0 such node(s) (2 node(s): 2 with 2 GPU(s))") in out, out[-3000:]
    assert "Nothing was submitted" in out
    assert slurm_cluster.run(["sacct", "-X", "-n", "-a", "-o", "JobID"], timeout=10).stdout.split() == jobs_before
    assert not wf.path(".snakemake/slurm_logs").exists()
    assert not wf.path("results").exists()

    # (a geometry that fits is not refused: the chain above runs 2 x 1 under the same check)
