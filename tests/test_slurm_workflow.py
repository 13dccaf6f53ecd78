"""The whole chain under `snakemake --executor slurm` on the real local cluster (tests/cluster).

Asserts from scontrol/sacct that each rule's job got what config and profile asked for, that
the DDP run had one rank per task on two distinct nodes, and that a preempted training job
resumes from its checkpoint.
"""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import TEST_CONFIG, Workflow, copy_workflow
from tests.processes import one_process, wait_for

pytestmark = pytest.mark.slurm

SLURM_ARGS = (
    "--workflow-profile", "profiles/slurm",
    "--default-resources", "slurm_account=lab", "slurm_partition=debug",
    "--slurm-init-seconds-before-status-checks", "1",
    "--slurm-keep-successful-logs",
    "--jobs", "4",
    # The profile runs four evaluations in one job, asking the sum of their requests; two at
    # 1 CPU and 1500 MB fit a 2-CPU, 4000 MB test node.
    "--set-threads", "evaluate=1", "--set-resources", "evaluate:mem_mb=1500",
)


EVALUATIONS = "group_evaluate_evaluate"  # the plugin's log folder of the evaluate group's jobs


def slurm_jobs(wf: Workflow) -> dict[str, list[int]]:
    """{"rule/wildcards": [job ids]} from the plugin's logs: .snakemake/slurm_logs/rule_<rule>/[<wildcards>/]<id>.log,
    group_<group>/<id>.log and, for an array's tasks, rule_<rule>/<array id>_<task>.log (the array id)."""
    base = wf.root / ".snakemake" / "slurm_logs"
    jobs: dict[str, list[int]] = {}
    for log in sorted(base.rglob("*.log")):
        rule_dir, *wildcards, name = log.relative_to(base).parts
        jobs.setdefault("/".join([rule_dir.removeprefix("rule_"), *wildcards]), []).append(int(Path(name).stem.split("_")[0]))
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
    # Both evaluations in one job (the profile's group-components).
    assert set(slurm_chain.jobs) == {"train/single", "train_ddp/multinode", EVALUATIONS}, slurm_chain.jobs
    assert len(slurm_chain.jobs[EVALUATIONS]) == 1
    for rule in ("environment", "download", "prepare", "summarize"):
        assert slurm_chain.path(f"results/logs/{rule}.log").exists(), rule


def test_summary_has_each_training_jobs_grant_and_use_from_sacct(slurm_cluster, slurm_chain):
    from mnistflow.summarize import seconds

    with open(slurm_chain.path("results/summary/slurm_usage.csv")) as fh:
        usage = {row["run"]: row for row in csv.DictReader(fh)}
    assert set(usage) == {"single", "multinode"}, usage
    # run, job, CPUs (2 a process, .test/config), memory (4000 MB a process)
    for run, key, cpus, mem in (("single", "train/single", 2, 4000), ("multinode", "train_ddp/multinode", 4, 8000)):
        (jobid,) = slurm_chain.jobs[key]
        row, job = usage[run], slurm_cluster.scontrol_show_job(jobid)
        assert row["job"] == str(jobid) and row["state"] == "COMPLETED", row
        assert int(row["cpus"]) == cpus == int(job["NumCPUs"]) and float(row["mem_requested_mb"]) == mem, (row, job["TRES"])
        assert float(row["time_limit_s"]) == seconds(job["TimeLimit"]) == 3600
        assert float(row["wall_s"]) == seconds(job["RunTime"]) and float(row["cpu_s_allocated"]) == cpus * float(row["wall_s"])
        assert 0 < float(row["cpu_s_used"]) <= float(row["cpu_s_allocated"]) + 1, row
        assert float(row["max_rss_mb"]) > 100, row  # a process that imported torch
    with open(slurm_chain.path("results/summary/runs.csv")) as fh:
        runs = {row["run"]: row for row in csv.DictReader(fh)}
    assert all(0 < float(runs[r]["slurm_cpu_efficiency"]) <= 1.05 and float(runs[r]["slurm_max_rss_mb"]) > 100 for r in usage), runs
    # and the plugin's own efficiency report, which the profile turns on
    assert list(slurm_chain.path("results/logs/slurm").glob("efficiency_report_*.csv"))


def _job(cluster, wf, key):
    (jobid,) = wf.jobs[key]
    return jobid, cluster.scontrol_show_job(jobid)


def test_each_rule_got_what_it_asked_for(slurm_cluster, slurm_chain):
    expected = {
        # key: (nodes, tasks, cpus per task, memory field, memory, time limit, gres per node)
        "train/single": (1, 1, 2, "MinMemoryNode", "4000M", "01:00:00", "gpu:1"),
        # .test/config: cpus_per_process 2 (the 2-CPU test nodes); mem_mb_per_process 4000 over them
        "train_ddp/multinode": (2, 2, 2, "MinMemoryCPU", "2000M", "01:00:00", "gpu:1"),
        # two evaluations of 1 CPU and 1500 MB (SLURM_ARGS), side by side in one job
        EVALUATIONS: (1, 1, 2, "MinMemoryNode", "3000M", "00:15:00", None),
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
    for needle in ("nodes=2", "mpi=srun", "tasks=2", "gres=gpu:1", "cpus_per_task=2", "mem_mb_per_cpu=2000", "runtime=60", "slurm_partition=debug",
                   "checkpoint_every_s=600", "slurm_extra=--signal=USR1@90"):
        assert needle in block, (needle, block)


def _running_train_job(cluster):
    out = cluster.run(["squeue", "-h", "-o", "%i %k %T"], timeout=10, check=False).stdout
    for line in out.splitlines():
        jobid, comment, state = line.split()
        if re.fullmatch(r"rule_train(_ddp)?(_wildcards_.*)?", comment) and state == "RUNNING":
            return int(jobid)
    return None


INTERRUPTIONS = {
    "usr1": ["scancel", "--signal=USR1"],  # what the rule's --signal=USR1@90 sends before the time limit
    "requeue": ["scontrol", "requeue"],  # the job's processes are ended and the same job starts again
}
SINGLE, DDP = {"nodes": 1, "devices": 1}, {"nodes": 2, "devices": 1}


# SIGTERM on Slurm: at a real time limit, in the test after this one (and under DDP locally,
# tests/test_rerun.py, bit for bit). `scancel --signal=TERM` would reach the ranks as
# --signal=USR1 does here, into the same handler. USR1 in one process: tests/test_faults.py.
@pytest.mark.parametrize("interruption, geometry", [
    ("usr1", DDP), ("requeue", SINGLE),
], ids=["usr1-ddp", "requeue-single"])
def test_interrupted_training_resumes_to_the_uninterrupted_weights(slurm_cluster, tmp_path_factory, mirror, interruption, geometry):
    """A signal or a requeue mid-run: every rank saves a mid-epoch checkpoint and stops, the
    retry (or the requeued job) resumes at the next batch, and the run ends with the weights of
    the same run uninterrupted, having trained every batch of every epoch once."""
    import torch

    wf = Workflow(copy_workflow(tmp_path_factory.mktemp(f"preempt-{interruption}")), [TEST_CONFIG])
    wf.write_config("mirror.yaml", mirror.overlay())
    settings = {"epochs": 3, "model": "cnn", **geometry}
    wf.write_config("extra.yaml", {"runs": {"long": settings, "straight": settings}, "dataset": {"train_limit": 2000}})
    # data, environment and the uninterrupted run first, so the timing below concerns one job
    wf.snakemake("results/runs/straight/model.ckpt", *SLURM_ARGS, timeout=300)
    proc = subprocess.Popen(
        ["timeout", "-k", "10", "600", *wf.command("results/runs/long/train.json", *SLURM_ARGS)],
        cwd=wf.root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=wf.env(),
    )
    ckpt = wf.path("results/runs/long/checkpoints/last.ckpt")
    wait_for(ckpt.exists, 300, "the first epoch's checkpoint")
    jobid = wait_for(lambda: _running_train_job(slurm_cluster), 30, "the running training job", interval=0.5)
    # The second epoch started with the checkpoint: a few of its batches, and well before its
    # last two epochs (about 2 s here) are done.
    time.sleep(0.3)
    slurm_cluster.run([*INTERRUPTIONS[interruption], str(jobid)], timeout=10)
    out, _ = proc.communicate(timeout=620)
    assert proc.returncode == 0, out[-6000:] + wf.logs_tail()

    record = json.loads(wf.path("results/runs/long/train.json").read_text())
    straight = json.loads(wf.path("results/runs/straight/train.json").read_text())
    assert record["world_size"] == straight["world_size"] == geometry["nodes"] * geometry["devices"]
    # every batch of every epoch once: the step counters and the CSV log of all attempts
    assert record["epochs"] == 3 and record["global_step"] == straight["global_step"]
    assert record["train_samples"] == straight["train_samples"]
    with open(wf.path("results/runs/long/metrics.csv")) as fh:
        rows = list(csv.DictReader(fh))
    assert [int(float(r["epoch"])) for r in rows if r.get("val_acc")] == [0, 1, 2]
    logged = [int(r["step"]) for r in rows if r.get("train_loss_step")]
    assert logged == sorted(set(logged)), "a step was logged twice"
    weights = [torch.load(wf.path(f"results/runs/{run}/model.ckpt"), weights_only=True)["state_dict"] for run in ("long", "straight")]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[1]), "the resumed run ended elsewhere"

    attempts = record["attempts"]
    assert record["resumed_from"] and record["resumed_from"]["checkpoint"].endswith("last.ckpt")
    assert attempts[-1]["outcome"] == "finished" and attempts[-1]["resumed_from"] == record["resumed_from"], attempts
    assert len(attempts) == 2 and attempts[0]["slurm_job_id"] == str(jobid), attempts
    if interruption == "requeue":
        assert int(slurm_cluster.scontrol_show_job(jobid)["Restarts"]) == 1
        assert attempts[-1]["slurm_job_id"] == str(jobid) and attempts[0]["outcome"] != "finished", attempts
    else:
        assert attempts[0]["outcome"].startswith("preempted: SIGUSR1 received; stopped after saving epoch"), attempts
        assert len(slurm_jobs(wf)["train/long" if geometry == SINGLE else "train_ddp/long"]) == 2, slurm_jobs(wf)


def test_training_past_its_time_limit_saves_at_slurms_sigterm_and_resumes(slurm_cluster, tmp_path_factory, mirror):
    """A real time limit, without the USR1 warning (slurm_extra ''). Once the job has saved its
    first epoch, its training process is stopped (SIGSTOP) and the job's limit lowered to 1
    minute (`scontrol update`, as an admin can). Slurm ends it at its next check, 60 to 90 s
    into the job, with SIGTERM, then SIGKILL after KillWait (30 s, Slurm's default). The test
    continues the process (SIGCONT) as soon as scontrol shows the job ending, so that it is
    mid-run at its limit on a machine of any speed, with no more training than that needs: the
    rank saves at the SIGTERM, the job ends TIMEOUT, and Snakemake's retry, under the rule's
    own limit, resumes and trains every step once. (Submitted with a 1-minute limit, the retry
    would race the same limit.)"""
    epochs = 3
    wf = Workflow(copy_workflow(tmp_path_factory.mktemp("time-limit")), [TEST_CONFIG])
    wf.write_config("mirror.yaml", mirror.overlay())
    wf.write_config("extra.yaml", {"runs": {"long": {"model": "cnn", "epochs": epochs, **SINGLE}}})
    proc = subprocess.Popen(
        ["timeout", "-k", "10", "600", *wf.command("results/runs/long/train.json", *SLURM_ARGS,
                                                    "--set-resources", "train:slurm_extra=''")],
        cwd=wf.root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=wf.env(),
    )
    jobid = wait_for(lambda: _running_train_job(slurm_cluster), 300, "the running training job", interval=0.5)
    wait_for(wf.path("results/runs/long/checkpoints/last.ckpt").exists, 180, "the first epoch's checkpoint")
    pid = one_process(wf, "train", "long")
    os.kill(pid, signal.SIGSTOP)
    slurm_cluster.run(["scontrol", "update", f"JobId={jobid}", "TimeLimit=1"], timeout=10)
    wait_for(lambda: slurm_cluster.job_state(jobid) != "RUNNING", 150, "Slurm to end the job at its time limit", interval=0.5)
    os.kill(pid, signal.SIGCONT)
    out, _ = proc.communicate(timeout=620)
    assert proc.returncode == 0, out[-6000:] + wf.logs_tail()
    record = json.loads(wf.path("results/runs/long/train.json").read_text())
    attempts = record["attempts"]
    # When the save does not finish within KillWait, the first attempt is SIGKILLed, on record
    # as never ended: the logs and slurmd's say when the job ended and what the process did.
    assert (attempts[0]["outcome"] or "").startswith("preempted: SIGTERM received"), (
        f"{attempts}\n{wf.logs_tail()}\n--- slurmd-n1\n{slurm_cluster.log_tail('slurmd-n1')}")
    assert attempts[-1]["outcome"] == "finished" and len(attempts) == 2, attempts
    first, retry = (slurm_cluster.sacct(a["slurm_job_id"], ["JobID", "State", "Timelimit"], allocations_only=True)[0]
                    for a in attempts)
    assert first["JobID"] == str(jobid) and first["State"] == "TIMEOUT" and first["Timelimit"] == "00:01:00", first
    assert retry["State"] == "COMPLETED" and retry["Timelimit"] == "01:00:00", retry
    # every batch of every epoch once, over the attempts
    steps_per_epoch = -(-(8000 - 500) // 128)  # .test data: 8,000 training images, 500 held out; batch 128
    assert record["epochs"] == epochs and record["global_step"] == epochs * steps_per_epoch, record
    assert sum(a["steps_trained"] for a in attempts) == record["global_step"], attempts
    # the first attempt stopped mid-run: it trained its first epoch, and the retry the rest
    assert steps_per_epoch <= attempts[0]["steps_trained"] < record["global_step"], attempts
    with open(wf.path("results/runs/long/metrics.csv")) as fh:
        rows = list(csv.DictReader(fh))
    assert [int(float(r["epoch"])) for r in rows if r.get("val_acc")] == list(range(epochs))
    logged = [int(r["step"]) for r in rows if r.get("train_loss_step")]
    assert logged == sorted(set(logged)), "a step was logged twice"


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


def test_gpu_run_on_a_cpu_only_partition_is_refused_naming_the_fix(slurm_cluster, tmp_path_factory, mirror):
    """`accelerator: auto` (the default) asks Slurm for GPUs; the cluster's `cpu` partition has
    none. The refusal says so and names the fix; with `accelerator: cpu` the same run trains there."""
    wf = Workflow(copy_workflow(tmp_path_factory.mktemp("cpu-partition")), [TEST_CONFIG])
    wf.write_config("mirror.yaml", mirror.overlay())
    wf.write_config("extra.yaml", {"runs": {"plain": {"model": "mlp"}}, "dataset": {"train_limit": 600, "val_size": 100}})
    cpu_args = [a.replace("slurm_partition=debug", "slurm_partition=cpu") for a in SLURM_ARGS]
    result = wf.snakemake("results/runs/plain/train.json", *cpu_args, check=False, timeout=120)
    out = result.stdout + result.stderr
    assert result.returncode != 0
    assert ("run 'plain': it asks for GPUs (`accelerator: auto` asks Slurm for 1 GPU(s) a node), but Slurm partition "
            "'cpu' has no GPUs (1 node(s): 1 with 0 GPU(s)); set the run's `accelerator: cpu`") in out, out[-3000:]
    assert "Nothing was submitted" in out and not wf.path(".snakemake/slurm_logs").exists()

    wf.write_config("extra.yaml", {"runs": {"plain": {"model": "mlp", "accelerator": "cpu"}}, "dataset": {"train_limit": 600, "val_size": 100}})
    wf.snakemake("results/runs/plain/train.json", *cpu_args, timeout=300)
    record = json.loads(wf.path("results/runs/plain/train.json").read_text())
    assert record["accelerator"] == "CPUAccelerator" and record["hosts"][0].startswith("c1/"), record["hosts"]


def test_cpus_and_memory_per_process_reach_slurm_and_the_ranks(slurm_cluster, tmp_path_factory, mirror):
    """A 2-node DDP run with cpus_per_process 2 and mem_mb_per_process 2000: each task is granted
    2 CPUs and 1000 MB per CPU, and each rank trains with 2 threads."""
    wf = Workflow(copy_workflow(tmp_path_factory.mktemp("cpus-per-process")), [TEST_CONFIG])
    wf.write_config("mirror.yaml", mirror.overlay())
    wf.write_config("extra.yaml", {
        "runs": {"wide": {"model": "mlp", "nodes": 2, "devices": 1, "cpus_per_process": 2, "mem_mb_per_process": 2000}},
        "dataset": {"train_limit": 1000, "val_size": 100},
    })
    wf.snakemake("results/runs/wide/train.json", *SLURM_ARGS, timeout=300)
    [jobid] = slurm_jobs(wf)["train_ddp/wide"]
    job = slurm_cluster.scontrol_show_job(jobid)
    assert job["NumNodes"] == "2" and job["CPUs/Task"] == "2" and job["MinMemoryCPU"] == "1000M", job
    record = json.loads(wf.path("results/runs/wide/train.json").read_text())
    assert record["threads_per_process"] == 2 and record["threads_by_rank"] == [2, 2], record
    assert "cpus_per_process" not in record["settings"]  # a grant, not a setting: changing it retrains nothing


def test_sweep_trains_as_one_job_array_and_evaluates_in_shared_jobs(slurm_cluster, tmp_path_factory, mirror):
    """The whole workflow with a 6-point sweep, under the profile's --slurm-array-jobs: the
    runs of rule train (the sweep and `single`, one request) are one array, every run is
    evaluated in jobs shared two at a time (two 1-CPU evaluations fill a test node), and the
    summary finds each array task in sacct."""
    from mnistflow.config import resolve_runs

    wf = Workflow(copy_workflow(tmp_path_factory.mktemp("sweep-array")), [TEST_CONFIG])
    wf.write_config("mirror.yaml", mirror.overlay())
    sweep = {
        # 1 CPU and 1500 MB a process for every run: two trainings side by side on a test node
        "train": {"cpus_per_process": 1, "mem_mb_per_process": 1500},
        "sweeps": {"lr": {"settings": {"model": "mlp"}, "grid": {"lr": [0.002, 0.005, 0.01], "seed": [1, 2]}}},
        "dataset": {"train_limit": 1000, "val_size": 100},
    }
    wf.write_config("extra.yaml", sweep)
    swept = sorted(resolve_runs({"train": {}, **sweep}))
    runs = swept + ["single", "multinode"]
    assert len(swept) == 6
    # --jobs high enough for all at once: Snakemake hands the plugin at most --jobs jobs
    wf.snakemake(*SLURM_ARGS, "--jobs", "12", "--group-components", "evaluate=2", timeout=600)
    for run in runs:
        assert json.loads(wf.path(f"results/runs/{run}/eval/metrics.json").read_text())["accuracy"] > 0.3, run  # chance: 0.1
    records = {run: json.loads(wf.path(f"results/runs/{run}/train.json").read_text()) for run in runs}
    train_jobs = {run: r["slurm_job_id"] for run, r in records.items() if run != "multinode"}
    rows = slurm_cluster.sacct(list(train_jobs.values()), ["JobID", "JobIDRaw", "State"], allocations_only=True)
    # an array's tasks show in sacct as <array job>_<task>, all of one array job
    assert len(rows) == 7 and all(row["State"] == "COMPLETED" for row in rows), rows
    arrays = {row["JobID"].split("_")[0] for row in rows}
    assert len(arrays) == 1 and all(re.fullmatch(r"\d+_[1-7]", row["JobID"]) for row in rows), rows
    tasks = {row["JobIDRaw"]: row["JobID"] for row in rows}
    assert {run: records[run]["slurm_array_task"] for run in train_jobs} == {run: tasks[j] for run, j in train_jobs.items()}
    assert records["multinode"]["slurm_array_task"] is None  # the only train_ddp job: not an array
    with open(wf.path("results/summary/slurm_usage.csv")) as fh:
        usage = {row["run"]: row for row in csv.DictReader(fh)}
    assert {run: (u["job"], u["array_task"], u["state"]) for run, u in usage.items() if run in train_jobs} == {
        run: (job, tasks[job], "COMPLETED") for run, job in train_jobs.items()}, usage
    # evaluations: fewer Slurm jobs than runs, every one of them completed
    eval_jobs = slurm_jobs(wf)[EVALUATIONS]
    assert len(eval_jobs) == 4 < len(runs), eval_jobs
    states = slurm_cluster.sacct(eval_jobs, ["JobID", "State", "AllocCPUS"], allocations_only=True)
    assert [row["State"] for row in states] == ["COMPLETED"] * 4, states


def test_array_of_runs_that_ask_for_different_resources_is_refused_before_submission(slurm_cluster, tmp_path_factory, mirror):
    """The plugin gives every task of an array the first job's request; of two runs that ask for
    different memory, one would run with the other's grant. Refused, naming the runs."""
    wf = Workflow(copy_workflow(tmp_path_factory.mktemp("mixed-array")), [TEST_CONFIG])
    wf.write_config("mirror.yaml", mirror.overlay())
    run = {"model": "mlp", "nodes": 1, "devices": 1}
    wf.write_config("extra.yaml", {"runs": {"small": {**run, "mem_mb_per_process": 1000}, "large": {**run, "mem_mb_per_process": 2000}}})
    jobs_before = slurm_cluster.run(["sacct", "-X", "-n", "-a", "-o", "JobID"], timeout=10).stdout.split()
    targets = ["results/runs/small/train.json", "results/runs/large/train.json"]
    result = wf.snakemake(*targets, *SLURM_ARGS, check=False, timeout=120)
    out = result.stdout + result.stderr
    assert result.returncode != 0
    assert ("--slurm-array-jobs: the train jobs to submit ask Slurm for different mem_mb "
            "(large; small)") in out, out[-3000:]
    assert "--slurm-array-jobs=none" in out and "Nothing was submitted" in out
    assert slurm_cluster.run(["sacct", "-X", "-n", "-a", "-o", "JobID"], timeout=10).stdout.split() == jobs_before
    # and the fix the message names submits them one by one
    wf.snakemake(*targets, *SLURM_ARGS, "--slurm-array-jobs=none", "--dry-run", timeout=120)
