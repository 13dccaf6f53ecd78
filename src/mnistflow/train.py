"""Training entry point:

    python -m mnistflow.train --run NAME --params JSON --train-data train.npz --state DIR \
        --model model.ckpt --metrics metrics.csv --record train.json

The same command serves every geometry. A distributed run re-launches itself as its
processes (see launch.py); each process checks that what it was granted matches the
geometry, builds the Trainer from the run's settings, resumes from
`<state>/checkpoints/last.ckpt` when one of the same unfinished training exists (resume.py),
and trains. The outputs are written atomically at the end, by rank 0, each to the path given:

    --model     the final checkpoint (weights and hyperparameters)
    --metrics   the CSV logger's per-step and per-epoch log, over every attempt
    --record    settings, provenance, geometry, hosts, throughput, every attempt, final metrics

`<state>/checkpoints/` and `<state>/logs/` are not outputs (Snakemake's declared files), so
a failed or preempted job keeps them and its rerun resumes. Once the outputs are written, the resume
state is retired: a finished run never resumes.
"""

from __future__ import annotations

import argparse
import datetime as dt
import errno
import json
import logging
import os
import platform
import socket
import sys
import time
import warnings
from pathlib import Path
from typing import Sequence

from .cli import run_and_exit
from .config import RUNTIME
from .geometry import Geometry, GeometryError
from .launch import relaunch
from .resume import (
    Attempt,
    atomic_checkpoint_io,
    first_step_after,
    host_name,
    is_first_process,
    keep_earlier_log,
    log_order,
    merge_logs,
    retire_resume_state,
    run_identity,
    slurm_array_task,
    usable_checkpoint,
)
from .signals import Preempted, StopSignals

# Exit status of a run stopped by a stop signal: "try again later" (sysexits EX_TEMPFAIL).
# Snakemake's retry (or Slurm's requeue) then resumes from last.ckpt.
EXIT_PREEMPTED = 75
# Under DDP the ranks agree on a stop signal every this many batches (one all-reduce).
AGREE_EVERY = 10
# The default of --collective-timeout, from the environment (the rules do not pass the option).
COLLECTIVE_TIMEOUT_ENV = "MNISTFLOW_COLLECTIVE_TIMEOUT_S"
# Write errors reported as a full disk: no space, quota exceeded, file size limit (ulimit -f).
DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)

log = logging.getLogger("mnistflow.train")


def parse_args(argv: Sequence[str] | None):
    p = argparse.ArgumentParser(prog="python -m mnistflow.train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="run name (for records)")
    p.add_argument("--params", required=True, help="the run's resolved settings, as JSON")
    p.add_argument("--train-data", required=True, help="the prepared training split (train.npz)")
    p.add_argument("--state", required=True, type=Path, help="the run's folder for checkpoints/ and logs/, which a retry resumes from")
    p.add_argument("--model", required=True, type=Path, help="the final checkpoint to write")
    p.add_argument("--metrics", required=True, type=Path, help="the training log (CSV) to write")
    p.add_argument("--record", required=True, type=Path, help="the run's record (JSON) to write")
    p.add_argument("--val-size", type=int, required=True, help="training images held out for validation (config dataset.val_size)")
    p.add_argument("--train-limit", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="CPUs granted each process on Slurm (--cpus-per-task; 0: SLURM_CPUS_PER_TASK, else all)")
    p.add_argument("--job-threads", type=int, default=0,
                   help="outside Slurm, the threads Snakemake gave the whole job, shared between its processes (0: no limit)")
    p.add_argument("--collective-timeout", type=float, default=float(os.environ.get(COLLECTIVE_TIMEOUT_ENV) or 300.0),
                   help=f"seconds before a DDP collective gives up on a dead or hung rank (default: ${COLLECTIVE_TIMEOUT_ENV}, else 300)")
    p.add_argument("--env-record", help="the environment record (envinfo) to copy into train.json")
    p.add_argument("--preempt-signal", default="SIGUSR1", help="the signal Slurm sends before the time limit (sbatch --signal); SIGTERM is handled too")
    p.add_argument("--checkpoint-every-s", type=float, default=0.0,
                   help="also save last.ckpt mid-epoch every this many seconds (0: at epoch ends only)")
    p.add_argument("--progress-every-s", type=float, default=0.0,
                   help="also log progress mid-epoch every this many seconds (0: at epoch ends only)")
    p.add_argument("--loggers", default=",".join(RUNTIME["loggers"]),
                   help="comma-separated: csv (always), tensorboard (default: config's loggers default)")
    p.add_argument("--log-every-n-steps", type=int, default=RUNTIME["log_every_n_steps"],
                   help="the loggers take the step loss every this many steps (default: config's default)")
    return p.parse_args(argv)


def threads_per_process(requested: int, job_threads: int, world_size: int) -> int:
    """The training threads of each process: on Slurm what each task is granted; locally no
    more than its share of the threads Snakemake gave the job (at most --cores)."""
    if requested <= 0:
        requested = int(os.environ["SLURM_CPUS_PER_TASK"]) if os.environ.get("SLURM_CPUS_PER_TASK", "").isdigit() else (os.cpu_count() or 1)
    if job_threads > 0 and "SLURM_JOB_ID" not in os.environ:
        return max(1, min(requested, job_threads // world_size))
    return requested


# glibc's malloc settings (mallopt), kept unless the environment sets its own.
MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 32 * 2**20  # glibc's ceiling for it on 64-bit
TRIM_THRESHOLD = 2**31 - 1  # above any heap here: freed memory is never given back


def keep_freed_memory() -> bool:
    """Let glibc's malloc keep the memory a training step frees, for the next step.

    By default glibc serves large requests (a batch's activations and gradients, megabytes
    each) with fresh mmap()s and returns freed heap to the kernel, so each step faults its
    buffers back in, page by page, in system time that on a CPU outweighs Lightning's own
    per-step cost (bench/README.md, "Memory the steps free"). A fixed mmap threshold at
    glibc's ceiling and a trim threshold above any heap here keep them in the heap; the
    process holds its peak memory until it exits. Numbers are unchanged (a test). Where the
    environment sets malloc's tunables itself (GLIBC_TUNABLES, MALLOC_*_), or the C library
    is not glibc, nothing is changed. Returns whether it was.
    """
    import ctypes

    if any(os.environ.get(name) for name in MALLOC_ENV) or "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


# Set by lightning_fabric when it is imported (see plain_cuda_check).
NVML_CUDA_CHECK_ENV = "PYTORCH_NVML_BASED_CUDA_CHECK"


def plain_cuda_check() -> None:
    """Undo the NVML-based CUDA check that importing Lightning turns on, for this process.

    lightning_fabric sets PYTORCH_NVML_BASED_CUDA_CHECK=1 when it is imported, so that asking
    whether CUDA is available does not initialise CUDA in a process that later forks. With
    it, torch.cuda.is_available() loads NVML on every call until CUDA is initialised, and Adam
    and AdamW ask it in every step (their graph-capture check): on a machine with a CUDA build
    of torch and no NVIDIA driver, a cost each step that a hand-written script, which does not
    import Lightning, does not pay (bench/README.md, "Per-step overhead"). A training process
    here never forks: its loaders have no workers, and ranks start as new processes.
    """
    os.environ.pop(NVML_CUDA_CHECK_ENV, None)


def folder_args(folder) -> list[str]:
    """The output and state arguments for a run kept in one folder as the workflow keeps it
    (results/runs/<run>/): for benchmarks and tests that call this entry point directly."""
    folder = Path(folder)
    return ["--state", str(folder), "--model", str(folder / "model.ckpt"),
            "--metrics", str(folder / "metrics.csv"), "--record", str(folder / "train.json")]


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    run = json.loads(args.params)
    geometry = Geometry.from_run(run)
    threads = threads_per_process(args.threads, args.job_threads, geometry.world_size)
    code = relaunch(geometry, "mnistflow.train", argv, cpus_per_task=threads)
    if code is not None:
        return code
    try:
        granted = geometry.check_environment()
    except GeometryError as err:
        log.error("%s", err)
        return 2
    os.environ["OMP_NUM_THREADS"] = str(threads)
    if geometry.distributed:
        _choose_gloo_interface()
    signals = StopSignals((args.preempt_signal, "SIGTERM"))
    signals.install()  # from here on a stop signal is remembered, not fatal
    identity = run_identity(run, args.train_data, args.val_size, args.train_limit)
    # On record before torch is imported, so that an attempt killed at any point shows.
    attempt = Attempt(args.state / "logs", identity) if is_first_process() else None
    if attempt:
        attempt.begin()
    try:
        return train(args, run, geometry, granted, threads, identity, attempt, signals)
    except OSError as err:
        if err.errno not in DISK_FULL:
            _record_failure(attempt, err)
            raise
        last = args.state / "checkpoints" / "last.ckpt"
        log.error("disk full: %s (%s). Every write is atomic, so no output is half-written and %s; "
                  "free space and rerun to resume", err.strerror, " -> ".join(filter(None, (err.filename, err.filename2))),
                  f"{last} (the last finished epoch) is intact" if last.exists() else f"no checkpoint was written yet ({last})")
        _record_failure(attempt, err)
        return 1
    except BaseException as err:
        _record_failure(attempt, err)
        raise


def _record_failure(attempt: Attempt | None, err: BaseException) -> None:
    if attempt is None:
        return
    try:
        attempt.end(f"failed: {type(err).__name__}: {err}"[:300])
    except OSError:
        pass  # the disk is full: the line stays as started, never ended


class _NotAdvertisements(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("💡 Tip:")


def quiet_known_noise() -> None:
    """Lines in the job's log that are not the user's to act on, each silenced by its message."""
    # Lightning's advertisements for its cloud loggers and model registry.
    logging.getLogger("pytorch_lightning.utilities.rank_zero").addFilter(_NotAdvertisements())
    for message in (
        # The CSV logger warns that it will delete "previous log files" whenever logs/ holds
        # any file; it deletes only metrics.csv, which keep_earlier_log has kept.
        r"Experiment logs directory .* exists and is not empty",
        # ModelCheckpoint, when a resumed run's checkpoints/ holds the last.ckpt it resumes from.
        r"Checkpoint directory .* exists and is not empty",
        # Outside Slurm's srun (a local run on a host with Slurm's client tools); the
        # workflow's launcher starts srun itself where the geometry asks for it.
        r"The `srun` command is available on your system but is not used",
        # Lightning 2.6's own use of a torch 2.14 deprecation (lightning.pytorch.utilities._pytree).
        r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    ):
        warnings.filterwarnings("ignore", message=message)


def _choose_gloo_interface() -> None:
    """Gloo binds to the address its host name resolves to; when that is loopback (fake or
    badly configured nodes), say so and use `lo` rather than fail to connect."""
    if os.environ.get("GLOO_SOCKET_IFNAME"):
        return
    try:
        address = socket.gethostbyname(socket.gethostname())
    except OSError:
        return
    if address.startswith("127."):
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"
        log.warning("host name resolves to %s: gloo uses the loopback interface; on a real multi-host "
                    "cluster set GLOO_SOCKET_IFNAME to the interconnect's interface", address)


def seconds_since_process_start() -> float | None:
    """How long this process has run, Python's start included (Linux's /proc; else None)."""
    try:
        stat = Path("/proc/self/stat").read_text()
        started = int(stat.rsplit(")", 1)[1].split()[19]) / os.sysconf("SC_CLK_TCK")  # field 22, starttime
        return time.clock_gettime(time.CLOCK_BOOTTIME) - started
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def train(args, run: dict, geometry: Geometry, granted: dict, threads: int, identity: dict,
          attempt: Attempt | None, signals: StopSignals) -> int:
    # Where this process's time goes, in train.json: what surrounds the fit is most of a short run.
    clock = {"start_to_train": seconds_since_process_start(), "train": time.perf_counter()}
    kept_freed_memory = keep_freed_memory()
    import torch
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import ModelCheckpoint
    from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
    from pytorch_lightning.utilities.exceptions import SIGTERMException

    from .atomic import write_json, write_text
    from .callbacks import NoProfiler, Progress, ResumeState, SaveAndStop, Throughput
    from .datamodule import MNISTDataModule
    from .model import MNISTClassifier

    clock["imported"] = time.perf_counter()
    plain_cuda_check()
    torch.set_num_threads(threads)
    state = args.state
    ckpt_dir = state / "checkpoints"
    last = ckpt_dir / "last.ckpt"
    log_dir = state / "logs"
    resume = usable_checkpoint(last, identity, log_dir)
    if attempt:  # again: a set-aside takes the logs, with this attempt's line, along
        attempt.begin(resumed_from=str(resume) if resume else None)

    pl.seed_everything(run["seed"], workers=True, verbose=False)
    data = MNISTDataModule(
        args.train_data,
        batch_size=run["batch_size"] // geometry.world_size,
        val_size=args.val_size,
        train_limit=args.train_limit,
        seed=run["seed"],
    )
    model = MNISTClassifier(
        model=run["model"], optimizer=run["optimizer"], lr=run["lr"],
        weight_decay=run["weight_decay"], schedule=run["schedule"],
    )
    trainer_kwargs = geometry.trainer_kwargs()
    if geometry.distributed:
        from pytorch_lightning.strategies import DDPStrategy

        backend = None
        if granted["launcher"] == "local" and geometry.accelerator != "cpu" and torch.cuda.is_available():
            # Every local "node" sees all of this machine's GPUs: give each its own slice.
            trainer_kwargs["devices"], shared = geometry.local_gpus(granted["node_rank"], torch.cuda.device_count())
            if shared:
                backend = "gloo"  # NCCL refuses two processes on one GPU
                log.warning("%d processes share %d GPU(s): using gloo", geometry.world_size, torch.cuda.device_count())
        # A bounded collective timeout: if one rank dies the others fail instead of hanging forever.
        trainer_kwargs["strategy"] = DDPStrategy(
            timeout=dt.timedelta(seconds=args.collective_timeout), process_group_backend=backend
        )
    quiet_known_noise()
    throughput = Throughput()
    save_and_stop = SaveAndStop(signals, last, args.checkpoint_every_s, AGREE_EVERY)
    resume_state = ResumeState(identity, attempt.number if attempt else None)
    plugins = [atomic_checkpoint_io()]
    if "SLURM_NTASKS" in os.environ:
        from lightning_fabric.plugins.environments import SLURMEnvironment

        # The workflow owns the preemption signal (below); Lightning must not requeue by itself.
        plugins.append(SLURMEnvironment(auto_requeue=False))
    trainer = pl.Trainer(
        **trainer_kwargs,
        max_epochs=run["epochs"],
        precision=run["precision"],
        default_root_dir=state,
        # Both in logs/: a resumed attempt continues the same TensorBoard run, and a finished
        # run's logs move to logs.finished/ with its CSV log.
        logger=[CSVLogger(save_dir=state, name="logs", version="")]
        + ([TensorBoardLogger(save_dir=state, name="logs", version="", default_hp_metric=False,
                              purge_step=first_step_after(resume))]
           if "tensorboard" in args.loggers.split(",") else []),
        # `last.ckpt`, replaced at every epoch end (save_last alone would only write it when
        # a top-k checkpoint is saved too, i.e. at the end of fit).
        callbacks=[
            ModelCheckpoint(dirpath=ckpt_dir, filename="last", save_top_k=1, enable_version_counter=False),
            throughput,
            Progress(throughput, args.progress_every_s),
            save_and_stop,
            resume_state,
        ],
        plugins=plugins,
        profiler=NoProfiler(),
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=False,
        log_every_n_steps=args.log_every_n_steps,
    )
    if resume:
        log.info("resuming from %s", resume)
    if attempt:
        keep_earlier_log(log_dir)  # an earlier attempt's, which the CSV logger would delete

    def attempt_figures(fit_s: float) -> dict:
        first_step = resume_state.resumed_from["global_step"] if resume_state.resumed_from else 0
        return {"resumed_from": _resumed_from(resume, resume_state), "steps_trained": trainer.global_step - first_step,
                "fit_s": round(fit_s, 3), "train_s": round(throughput.seconds - throughput.restored["seconds"], 3),
                "train_samples": (throughput.samples - throughput.restored["samples"]) * trainer.world_size}

    t0 = time.perf_counter()
    try:
        trainer.fit(model, datamodule=data, ckpt_path=resume, weights_only=True)
    except (Preempted, SIGTERMException) as stop:
        # SIGTERMException: Lightning's own SIGTERM handler, in the moment before training
        # starts when it is in place; it stops without saving, at the last checkpoint.
        stop = stop if isinstance(stop, Preempted) else "SIGTERM received (Lightning stopped)"
        log.warning("%s (%s); exiting %d so a retry or requeue resumes", stop, last, EXIT_PREEMPTED)
        if attempt:
            attempt.end(f"preempted: {stop}", **attempt_figures(time.perf_counter() - t0))
        return EXIT_PREEMPTED
    fit_s = time.perf_counter() - t0

    ranks = _gather(trainer, (f"{host_name()}/node{trainer.node_rank}/rank{trainer.global_rank}", torch.get_num_threads()))
    hosts, threads_by_rank = [host for host, _ in ranks], [n for _, n in ranks]
    # save_checkpoint is collective: every rank calls it, rank 0 writes (atomically).
    trainer.save_checkpoint(args.model, weights_only=False)
    if attempt:
        attempt.end("finished", **attempt_figures(fit_s))
        write_text(args.metrics, merge_logs(sorted(log_dir.glob("metrics*.csv"), key=log_order)))
        attempts = attempt.all()
        record = {
            "run": args.run,
            "settings": run,
            "geometry": geometry.as_dict(),
            "granted": granted,
            "world_size": trainer.world_size,
            "num_nodes": trainer.num_nodes,
            "strategy": type(trainer.strategy).__name__,
            "accelerator": type(trainer.accelerator).__name__,
            "device": device_name(trainer.strategy.root_device),
            "hosts": hosts,
            "threads_per_process": threads,
            "threads_by_rank": threads_by_rank,
            "malloc_keeps_freed_memory": kept_freed_memory,
            "resumed_from": _resumed_from(resume, resume_state),
            "epochs": trainer.current_epoch,
            "global_step": trainer.global_step,
            # Over every epoch behind the final weights, whichever attempt trained it (the
            # counts travel in the checkpoint); each attempt's own figures are in `attempts`.
            "train_s": round(throughput.seconds, 3),
            "train_samples": throughput.samples * trainer.world_size,
            "samples_per_s": round(throughput.samples * trainer.world_size / throughput.seconds, 1) if throughput.seconds else None,
            "final": {k: float(v) for k, v in trainer.callback_metrics.items()},
            "started": attempts[0]["started"],
            "finished": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "slurm_array_task": slurm_array_task(),
            "provenance": provenance(args.env_record, identity),
            "attempts": attempts,
        }
        record["process_s"] = process_timings(clock, t0, fit_s)
        write_json(args.record, record)
        retire_resume_state(state)
        log.info("trained %s: %s samples/s over %d process(es)", args.run, record["samples_per_s"], trainer.world_size)
    return 0


def process_timings(clock: dict, fit_started: float, fit_s: float) -> dict:
    """Seconds of the finishing process: from its start to training (Python, the package, the
    run's identity), importing torch and Lightning, setting up the data, model and Trainer,
    the fit (validation and checkpoints included), and the outputs and this record."""
    now = time.perf_counter()
    parts = {
        "start_to_train": clock["start_to_train"],
        "imports": clock["imported"] - clock["train"],
        "setup": fit_started - clock["imported"],
        "fit": fit_s,
        "outputs": now - fit_started - fit_s,
    }
    return {name: None if value is None else round(value, 3) for name, value in parts.items()}


def _resumed_from(resume: Path | None, resume_state) -> dict | None:
    """The checkpoint a run resumed from, the attempt that wrote it, and its (matching) identity."""
    if not resume:
        return None
    return {"checkpoint": str(resume), **(resume_state.resumed_from or {})}


def provenance(env_record: str | None, identity: dict) -> dict:
    """What produced this run, beside its settings: code digest, git commit, environment."""
    from .codedigest import closure

    commit, dirty = git_state(Path(__file__).resolve().parents[2])
    return {
        "code_digest": identity["code_digest"],
        "code_modules": closure("mnistflow.train"),
        # the versions the training processes imported, part of the resume identity
        "packages": identity["packages"],
        "git_commit": commit,
        "git_dirty": dirty,
        "environment": json.loads(Path(env_record).read_text()) if env_record else None,
        "command": [sys.executable, "-m", "mnistflow.train", *sys.argv[1:]],
    }


def git_state(repo: Path) -> tuple[str | None, bool | None]:
    """The commit checked out at `repo` and whether tracked files differ from it; (None, None)
    where there is none (not a checkout, no commit yet, no git)."""
    import subprocess

    def git(*args):
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=10)

    try:
        head = git("rev-parse", "--verify", "--quiet", "HEAD^{commit}")
        if head.returncode != 0 or not head.stdout.strip():
            return None, None
        status = git("status", "--porcelain", "--untracked-files=no")
        return head.stdout.strip(), (bool(status.stdout.strip()) if status.returncode == 0 else None)
    except (OSError, subprocess.SubprocessError):
        return None, None


def device_name(device) -> str:
    """What rank 0 trained on: the GPU's name, else the CPU's model name."""
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model() or platform.processor() or platform.machine()


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo; empty where there is none."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def _gather(trainer, value) -> list:
    """`value` from every rank, in rank order."""
    if trainer.world_size == 1:
        return [value]
    import torch.distributed as dist

    values: list = [None] * trainer.world_size
    dist.all_gather_object(values, value)
    return values


if __name__ == "__main__":
    run_and_exit(main)
