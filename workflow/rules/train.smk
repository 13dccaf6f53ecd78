# Both training rules' outputs. Later rules name them through this dict, as plain patterns:
# `rules.train.output` would tie them to `train` alone, and a DDP run's files to two rules.
TRAIN_OUTPUT = dict(
    model="results/runs/{run}/model.ckpt",
    log_csv="results/runs/{run}/metrics.csv",
    record="results/runs/{run}/train.json",
)
# Runtime settings of both training rules, not params: they change when a run is saved or
# how Slurm warns it or what it logs, never what it computes, so changing them reruns nothing. Override
# them per cluster in the profile (set-resources).
TRAIN_RUNTIME = dict(
    runtime=60,
    # Also save last.ckpt mid-epoch this often, so a SIGKILL loses at most this much.
    checkpoint_every_s=600,
    # Rank 0 logs progress at each epoch's end and, in long epochs, this often.
    progress_every_s=60,
    loggers=lambda wildcards: ",".join(RUNS[wildcards.run]["loggers"]),
    log_every_n_steps=run_value("log_every_n_steps"),
    # Slurm sends USR1 90 s before the time limit: every rank saves and stops (README,
    # "Preemption"). Composed with the sbatch flags given every rule as
    # --default-resources slurm_extra=...
    slurm_extra=slurm_extra_with(PREEMPTION_SIGNAL),
)


# Every run can be trained by `train`; the distributed ones go to `train_ddp`, whose
# constraint lists only them. (A constraint listing every single-process run would be
# formatted into each of their paths: seconds of planning in a big sweep.) Two rules, not
# one, because the Slurm plugin submits a rule's ready jobs as one job array: a sweep's
# single-process runs make one array and its DDP runs, which ask Slurm for another shape,
# another.
ruleorder: train_ddp > train


onstart:
    refuse_runs_no_partition_holds(workflow.dag.needrun_jobs())
    refuse_arrays_of_mixed_requests(workflow.dag.needrun_jobs())


rule train:
    """One process on one device (a GPU when there is one)."""
    input:
        train=rules.prepare.output.train,
        environment=rules.environment.output,
    output:
        **TRAIN_OUTPUT,
    log:
        "results/logs/train/{run}.log",
    benchmark:
        "results/benchmarks/train/{run}.tsv"
    conda:
        software_env("torch")
    envmodules:
        *ENV_MODULES,
    threads: training_threads
    resources:
        **TRAIN_RUNTIME,
        nodes=1,
        cpus_per_task=run_value("cpus_per_process"),
        mem_mb=run_value("mem_mb_per_process"),
        gres=slurm_resource("gres", ""),
    params:
        settings=run_settings,
        code=code_digest("mnistflow.train"),
        # checkpoints/ and logs/: what a retry resumes from, kept beside the outputs
        state=lambda wildcards, output: directory_of(output.model),
        val_size=config["dataset"]["val_size"],
        train_limit=config["dataset"]["train_limit"],
    shell:
        "python -m mnistflow.train --run {wildcards.run} --params {params.settings:q}"
        " --train-data {input.train} --env-record {input.environment}"
        " --model {output.model} --metrics {output.log_csv} --record {output.record}"
        " --state {params.state} --val-size {params.val_size} --train-limit {params.train_limit}"
        " --threads {resources.cpus_per_task} --job-threads {threads}"
        " --checkpoint-every-s {resources.checkpoint_every_s} --progress-every-s {resources.progress_every_s}"
        " --loggers {resources.loggers} --log-every-n-steps {resources.log_every_n_steps} > {log} 2>&1"


# nodes x devices processes under DDP: srun on Slurm, real node processes locally.
use rule train as train_ddp with:
    wildcard_constraints:
        run=runs_where(distributed=True),
    resources:
        **TRAIN_RUNTIME,
        nodes=slurm_resource("nodes"),
        mpi=slurm_resource("mpi"),
        tasks=slurm_resource("tasks", 0),
        tasks_per_node=slurm_resource("tasks_per_node", 0),
        tasks_per_gpu=slurm_resource("tasks_per_gpu", 0),
        gres=slurm_resource("gres", ""),
        cpus_per_task=run_value("cpus_per_process"),
        mem_mb_per_cpu=ddp_mem_mb_per_cpu,
