"""Training entry point: `python -m mnistflow.train --run NAME --params JSON --train-data train.pt --out DIR`.

The same command serves every geometry. A distributed run re-launches itself as its
processes (see launch.py); each process checks that what it was granted matches the
geometry, builds the Trainer from the run's settings, resumes from
`<out>/checkpoints/last.ckpt` when one exists, and trains. Declared outputs are written
atomically at the end, by rank 0:

    model.ckpt    the final checkpoint (weights and hyperparameters)
    metrics.csv   the CSV logger's per-step and per-epoch log
    train.json    geometry, granted processes, hosts, times, throughput, final metrics

`<out>/checkpoints/` and `<out>/logs/` are not declared outputs, so a failed or
preempted job keeps them and its rerun resumes.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Sequence

from .geometry import Geometry
from .launch import relaunch

log = logging.getLogger("mnistflow.train")


def parse_args(argv: Sequence[str] | None):
    p = argparse.ArgumentParser(prog="python -m mnistflow.train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="run name (for records)")
    p.add_argument("--params", required=True, help="the run's resolved settings, as JSON")
    p.add_argument("--train-data", required=True, help="the prepared training split (train.pt)")
    p.add_argument("--out", required=True, help="the run's output directory")
    p.add_argument("--val-size", type=int, default=5000)
    p.add_argument("--train-limit", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="CPU threads per process (0: SLURM_CPUS_PER_TASK, else all)")
    p.add_argument("--collective-timeout", type=float, default=300.0, help="seconds before a DDP collective gives up on a dead rank")
    return p.parse_args(argv)


def threads_per_process(requested: int) -> int:
    if requested > 0:
        return requested
    if os.environ.get("SLURM_CPUS_PER_TASK", "").isdigit():
        return int(os.environ["SLURM_CPUS_PER_TASK"])
    return os.cpu_count() or 1


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    run = json.loads(args.params)
    geometry = Geometry.from_run(run)
    threads = threads_per_process(args.threads)
    code = relaunch(geometry, "mnistflow.train", argv, cpus_per_task=threads)
    if code is not None:
        return code
    granted = geometry.check_environment()
    os.environ["OMP_NUM_THREADS"] = str(threads)
    return train(args, run, geometry, granted, threads)


def train(args, run: dict, geometry: Geometry, granted: dict, threads: int) -> int:
    import torch
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import ModelCheckpoint
    from pytorch_lightning.loggers import CSVLogger

    from .atomic import atomic_path, write_json
    from .datamodule import MNISTDataModule
    from .model import MNISTClassifier

    torch.set_num_threads(threads)
    out = Path(args.out)
    ckpt_dir = out / "checkpoints"
    last = ckpt_dir / "last.ckpt"
    started = dt.datetime.now(dt.timezone.utc)

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

        # A bounded collective timeout: if one rank dies the others fail instead of hanging forever.
        trainer_kwargs["strategy"] = DDPStrategy(timeout=dt.timedelta(seconds=args.collective_timeout))
    throughput = make_throughput_callback()
    trainer = pl.Trainer(
        **trainer_kwargs,
        max_epochs=run["epochs"],
        precision=run["precision"],
        default_root_dir=out,
        logger=CSVLogger(save_dir=out, name="logs", version=""),
        callbacks=[ModelCheckpoint(dirpath=ckpt_dir, save_top_k=0, save_last=True), throughput],
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=False,
        log_every_n_steps=10,
    )
    resume = last if last.exists() else None
    if resume:
        log.info("resuming from %s", resume)
    t0 = time.perf_counter()
    trainer.fit(model, datamodule=data, ckpt_path=resume, weights_only=True)
    fit_s = time.perf_counter() - t0

    hosts = _gather_hosts(trainer)
    # save_checkpoint is collective: every rank calls it, rank 0 writes.
    final_tmp = out / ".model.ckpt.part"
    trainer.save_checkpoint(final_tmp, weights_only=False)
    trainer.strategy.barrier("model-saved")
    if trainer.global_rank == 0:
        os.replace(final_tmp, out / "model.ckpt")
        with atomic_path(out / "metrics.csv") as tmp:
            shutil.copyfile(Path(trainer.logger.log_dir) / "metrics.csv", tmp)
        record = {
            "run": args.run,
            "settings": run,
            "geometry": geometry.as_dict(),
            "granted": granted,
            "world_size": trainer.world_size,
            "num_nodes": trainer.num_nodes,
            "strategy": type(trainer.strategy).__name__,
            "accelerator": type(trainer.accelerator).__name__,
            "hosts": hosts,
            "threads_per_process": threads,
            "resumed_from": str(resume) if resume else None,
            "epochs": trainer.current_epoch,
            "global_step": trainer.global_step,
            "fit_s": round(fit_s, 3),
            "train_s": round(throughput.seconds, 3),
            "train_samples": throughput.samples * trainer.world_size,
            "samples_per_s": round(throughput.samples * trainer.world_size / throughput.seconds, 1) if throughput.seconds else None,
            "final": {k: float(v) for k, v in trainer.callback_metrics.items()},
            "started": started.isoformat(timespec="seconds"),
            "finished": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        }
        write_json(out / "train.json", record)
        log.info("trained %s: %s samples/s over %d process(es)", args.run, record["samples_per_s"], trainer.world_size)
    return 0


def _gather_hosts(trainer) -> list[str]:
    """Each rank's host (SLURMD_NODENAME where set: fake Slurm nodes share one hostname)."""
    me = f"{os.environ.get('SLURMD_NODENAME') or socket.gethostname()}/node{trainer.node_rank}/rank{trainer.global_rank}"
    if trainer.world_size == 1:
        return [me]
    import torch.distributed as dist

    hosts: list = [None] * trainer.world_size
    dist.all_gather_object(hosts, me)
    return hosts


def make_throughput_callback():
    import pytorch_lightning as pl

    class Throughput(pl.Callback):
        """Samples this process trained, and the seconds from each epoch's start to its last batch
        (data fetching included, validation excluded)."""

        def __init__(self):
            self.samples = 0
            self.seconds = 0.0
            self._t = None

        def on_train_epoch_start(self, trainer, pl_module):
            self._t = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            now = time.perf_counter()
            self.seconds += now - self._t
            self._t = now
            self.samples += len(batch[1])

    return Throughput()


if __name__ == "__main__":
    raise SystemExit(main())
