"""Callbacks of the training run: saving and stopping on Slurm's signals, throughput, progress,
and the state that makes a resume exact; and the Trainer's profiler when none is asked for."""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import time

import pytorch_lightning as pl
import torch
from pytorch_lightning.profilers import PassThroughProfiler

from .resume import (
    ATTEMPT_KEY,
    CHECKPOINT_KEY,
    POSITION_KEY,
    RNG_KEY,
    identity_digest,
    running_metrics,
    synced_running_metrics,
)
from .signals import Preempted, StopSignals

log = logging.getLogger("mnistflow.train")


class SaveAndStop(pl.Callback):
    """Save `last` and stop when a stop signal comes, and save it every `every_s` seconds.

    The handlers only set a flag. At the end of a batch the ranks agree on it (and on
    whether the interval is up, by any rank's clock) with one all-reduce: every batch in one
    process, every `agree_every` batches under DDP, where a collective a step slows a small
    network. Then every rank saves (a collective: rank 0 writes, atomically) at the same
    step, and on a signal they stop there: a mid-epoch checkpoint that resumes at the next
    batch (datamodule.ResumableLoader), so a preemption loses at most `agree_every` batches,
    and the interval bounds what a SIGKILL loses. A signal in an epoch's last batches lets
    the epoch end (ModelCheckpoint writes its last.ckpt) and stops before the next one.

    Stopping raises Preempted rather than setting trainer.should_stop: Lightning answers
    should_stop mid-epoch by validating the partial epoch and saving it as finished, and the
    resume would skip the rest of the epoch.
    """

    def __init__(self, signals: StopSignals, last, every_s: float, agree_every: int):
        self.signals, self.last, self.every_s, self.agree_every = signals, last, every_s, agree_every
        self._saved_at = time.monotonic()

    def on_train_start(self, trainer, pl_module):
        self.signals.install()  # over Lightning's SIGTERM handler, which would stop without saving
        if self._agree(trainer, self.signals.received is not None, False)[0]:
            raise Preempted(f"{self.signals.name} received before training started")
        self._saved_at = time.monotonic()

    def _agree(self, trainer, flag: bool, due: bool) -> tuple[bool, bool]:
        if trainer.world_size == 1:
            return flag, due
        t = torch.tensor([int(flag), int(due)], device=trainer.strategy.root_device)
        t = trainer.strategy.reduce(t, reduce_op="max")
        return bool(t[0].item()), bool(t[1].item())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.is_last_batch or (trainer.world_size > 1 and (batch_idx + 1) % self.agree_every):
            return
        due = self.every_s > 0 and time.monotonic() - self._saved_at >= self.every_s
        stop, due = self._agree(trainer, self.signals.received is not None, due)
        if not (stop or due):
            return
        with synced_running_metrics(trainer, pl_module):
            trainer.save_checkpoint(self.last)
        self._saved_at = time.monotonic()
        if stop:
            where = f"epoch {trainer.current_epoch}, step {trainer.global_step}"
            log.warning("%s received: saved a mid-epoch checkpoint at %s, stopping", self.signals.name, where)
            raise Preempted(f"{self.signals.name} received; stopped after saving {where} (mid-epoch)")

    def on_train_epoch_end(self, trainer, pl_module):
        self._saved_at = time.monotonic()  # ModelCheckpoint saves last.ckpt now

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == 0 or not self._agree(trainer, self.signals.received is not None, False)[0]:
            return
        epoch = trainer.current_epoch - 1
        log.warning("%s received: epoch %d's checkpoint is saved, stopping", self.signals.name, epoch)
        raise Preempted(f"{self.signals.name} received; stopped after saving epoch {epoch}")


class Throughput(pl.Callback):
    """Samples this process trained, and the seconds from each epoch's start to its last batch
    (data fetching included, validation excluded). The counts travel in the checkpoint, so
    after a resume they cover every epoch behind the weights, whichever attempt trained it;
    `restored` is what the checkpoint brought."""

    def __init__(self):
        self.samples = 0
        self.seconds = 0.0
        self.restored = {"samples": 0, "seconds": 0.0}
        self._t = None

    def state_dict(self):
        return {"samples": self.samples, "seconds": self.seconds}

    def load_state_dict(self, state_dict):
        self.samples, self.seconds = int(state_dict["samples"]), float(state_dict["seconds"])
        self.restored = {"samples": self.samples, "seconds": self.seconds}

    def on_train_epoch_start(self, trainer, pl_module):
        self._t = time.perf_counter()

    def on_train_start(self, trainer, pl_module):
        self._t = time.perf_counter()  # a mid-epoch resume starts no epoch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        now = time.perf_counter()
        self.seconds += now - self._t
        self._t = now
        self.samples += len(batch[1])


def _clock(seconds: float) -> str:
    return str(dt.timedelta(seconds=round(seconds)))


class Progress(pl.Callback):
    """Rank 0's progress in the job's log: a line at each epoch's end, and every `every_s`
    seconds within an epoch (0: epoch ends only), so `tail -f` of a job's log shows where a
    run is and how long it has left. The epoch lines' figures are those metrics.csv records,
    a line within an epoch has that step's loss (rank 0's); samples/s is over every process
    since the run's first epoch (the throughput callback's counts)."""

    def __init__(self, throughput: Throughput, every_s: float):
        self.throughput, self.every_s = throughput, every_s

    def on_train_start(self, trainer, pl_module):
        self._started = self._said = time.monotonic()
        self._first_step = trainer.global_step
        self._total_steps = trainer.max_epochs * trainer.num_training_batches

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.every_s <= 0 or not trainer.is_global_zero or time.monotonic() - self._said < self.every_s:
            return
        # this step's loss, as training_step returned it (the loggers take one every log_every_n_steps)
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        where = f"batch {batch_idx + 1}/{trainer.num_training_batches}"
        self._say(trainer, where, f"train_loss {float(loss):.4f}" if loss is not None else "")

    def on_train_epoch_end(self, trainer, pl_module):
        if not trainer.is_global_zero:
            return
        metrics = trainer.callback_metrics
        scores = ", ".join(f"{name.removesuffix('_epoch')} {float(metrics[name]):.4f}"
                           for name in ("train_loss_epoch", "val_loss", "val_acc") if name in metrics)
        self._say(trainer, "done", scores)

    def _say(self, trainer, where: str, scores: str) -> None:
        now = time.monotonic()
        self._said = now
        elapsed, done = now - self._started, trainer.global_step - self._first_step
        left = f", about {_clock(elapsed / done * (self._total_steps - trainer.global_step))} left" if done else ""
        seconds = self.throughput.seconds
        rate = self.throughput.samples * trainer.world_size / seconds if seconds else 0.0
        log.info("epoch %d/%d %s (step %d): %s; %.0f samples/s; elapsed %s%s", trainer.current_epoch + 1,
                 trainer.max_epochs, where, trainer.global_step, scores, rate, _clock(elapsed), left)


class ResumeState(pl.Callback):
    """What makes a resume exact and traceable.

    Saving, it stamps every checkpoint with the run's identity and the attempt, and keeps
    torch's random state (dropout draws from it; Lightning does not save it). Loading, it
    notes what it resumed from, and it puts that random state back before the first resumed
    batch, where the uninterrupted run has it (the checkpoint is written at a batch's or an
    epoch's end; the data loaders draw from generators of their own, so nothing between the
    save and that point takes from torch's). Under DDP every process starts from the same
    seed and draws alike, so rank 0's state serves all.
    """

    def __init__(self, identity: dict, attempt: int | None):
        self.identity, self.attempt = identity, attempt
        self.resumed_from: dict | None = None
        self._rng = None
        self._loader_state = None

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        checkpoint[CHECKPOINT_KEY] = self.identity
        checkpoint[ATTEMPT_KEY] = self.attempt
        # ModelCheckpoint saves at an epoch's end; SaveAndStop also in the middle of one
        checkpoint[POSITION_KEY] = {"epochs_done": trainer.current_epoch + int(trainer.is_last_batch),
                                    "mid_epoch": not trainer.is_last_batch}
        checkpoint[RNG_KEY] = {"torch": torch.get_rng_state(),
                               "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else []}

    def on_load_checkpoint(self, trainer, pl_module, checkpoint):
        self._rng = checkpoint.get(RNG_KEY)
        self._loader_state = checkpoint.get("loops", {}).get("fit_loop", {}).get("state_dict", {}).get("combined_loader")
        position = checkpoint.get(POSITION_KEY) or {"epochs_done": checkpoint["epoch"] + 1, "mid_epoch": False}
        self.resumed_from = {**position, "global_step": checkpoint["global_step"],
                             "written_by_attempt": checkpoint.get(ATTEMPT_KEY),
                             "identity": identity_digest(checkpoint[CHECKPOINT_KEY])}

    def on_train_start(self, trainer, pl_module):
        # Lightning hands a stateful loader its state only if the loader is made after the
        # loops are restored; estimated_stepping_batches (the one-cycle schedule's length)
        # makes it before. Its iterator has not started yet: hand the state over here.
        loader = trainer.train_dataloader
        if self._loader_state and hasattr(loader, "load_state_dict"):
            loader.load_state_dict(self._loader_state[0])
        self._loader_state = None
        # The epoch's running metrics (the mean training loss) in the checkpoint: at an
        # epoch's end, those of the finished epoch (ModelCheckpoint saves before Lightning
        # resets them); mid-epoch, the sums over every rank (synced_running_metrics), which
        # rank 0 carries on from.
        if self.resumed_from and (not self.resumed_from["mid_epoch"] or trainer.global_rank != 0):
            for metric in running_metrics(pl_module):
                metric.reset()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self._rng is not None:
            torch.set_rng_state(self._rng["torch"])
            if self._rng["cuda"]:
                torch.cuda.set_rng_state_all(self._rng["cuda"])
            self._rng = None


class NoProfiler(PassThroughProfiler):
    """Profiles nothing, as Lightning's default PassThroughProfiler does, at less cost a call.

    Lightning wraps each hook call (about fifty a step, each callback's included) in
    `profiler.profile(name)`. The default's `profile` makes a generator-based context manager
    each time; this one hands back one shared null context (bench/README.md, "Per-step
    overhead").
    """

    _nothing = contextlib.nullcontext()

    def profile(self, action_name: str) -> contextlib.AbstractContextManager:
        return self._nothing
