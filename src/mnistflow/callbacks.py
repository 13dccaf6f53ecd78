"""Callbacks of the training run: saving and stopping on Slurm's signals, throughput, progress."""

from __future__ import annotations

import datetime as dt
import logging
import time

from .resume import synced_running_metrics

log = logging.getLogger("mnistflow.train")


class Preempted(Exception):
    pass


# What Slurm sends: the --signal the training rule requests (USR1, 90 s before the time
# limit), and SIGTERM at the time limit, on preemption (PreemptMode=REQUEUE/CANCEL, after
# GraceTime), on `scancel` and `scontrol requeue`; SIGKILL follows SIGTERM after KillWait.
STOP_SIGNALS = ("SIGUSR1", "SIGTERM")


class StopSignals:
    """The signals that mean "save and stop", caught from the start of the process: one that
    arrives before training starts (during imports or data loading) is remembered, and the
    attempt then ends on record instead of dying without a trace."""

    def __init__(self, names=STOP_SIGNALS):
        self.names = tuple(names)
        self.received: str | None = None

    def install(self) -> None:
        import signal

        for name in self.names:
            signal.signal(getattr(signal, name), self._handle)

    @property
    def name(self) -> str:
        return self.received or "a stop signal"

    def _handle(self, signum, _frame) -> None:
        import signal

        self.received = self.received or signal.Signals(signum).name


def make_save_and_stop_callback(signals: StopSignals, last, every_s: float, agree_every: int):
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
    import pytorch_lightning as pl
    import torch

    class SaveAndStop(pl.Callback):
        def __init__(self):
            self._saved_at = time.monotonic()

        def on_train_start(self, trainer, pl_module):
            signals.install()  # over Lightning's SIGTERM handler, which would stop without saving
            if self._agree(trainer, signals.received is not None, False)[0]:
                raise Preempted(f"{signals.name} received before training started")
            self._saved_at = time.monotonic()

        def _agree(self, trainer, flag: bool, due: bool) -> tuple[bool, bool]:
            if trainer.world_size == 1:
                return flag, due
            t = torch.tensor([int(flag), int(due)], device=trainer.strategy.root_device)
            t = trainer.strategy.reduce(t, reduce_op="max")
            return bool(t[0].item()), bool(t[1].item())

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.is_last_batch or (trainer.world_size > 1 and (batch_idx + 1) % agree_every):
                return
            due = every_s > 0 and time.monotonic() - self._saved_at >= every_s
            stop, due = self._agree(trainer, signals.received is not None, due)
            if not (stop or due):
                return
            with synced_running_metrics(trainer, pl_module):
                trainer.save_checkpoint(last)
            self._saved_at = time.monotonic()
            if stop:
                where = f"epoch {trainer.current_epoch}, step {trainer.global_step}"
                log.warning("%s received: saved a mid-epoch checkpoint at %s, stopping", signals.name, where)
                raise Preempted(f"{signals.name} received; stopped after saving {where} (mid-epoch)")

        def on_train_epoch_end(self, trainer, pl_module):
            self._saved_at = time.monotonic()  # ModelCheckpoint saves last.ckpt now

        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == 0 or not self._agree(trainer, signals.received is not None, False)[0]:
                return
            epoch = trainer.current_epoch - 1
            log.warning("%s received: epoch %d's checkpoint is saved, stopping", signals.name, epoch)
            raise Preempted(f"{signals.name} received; stopped after saving epoch {epoch}")

    return SaveAndStop()


def make_throughput_callback():
    import pytorch_lightning as pl

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

    return Throughput()


def _clock(seconds: float) -> str:
    return str(dt.timedelta(seconds=round(seconds)))


def make_progress_callback(throughput, every_s: float):
    """Rank 0's progress in the job's log: a line at each epoch's end, and every `every_s`
    seconds within an epoch (0: epoch ends only), so `tail -f` of a job's log shows where a
    run is and how long it has left. The epoch lines' figures are those metrics.csv records,
    a line within an epoch has that step's loss (rank 0's); samples/s is over every process
    since the run's first epoch (the throughput callback's counts)."""
    import pytorch_lightning as pl

    class Progress(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            self._started = self._said = time.monotonic()
            self._first_step = trainer.global_step
            self._total_steps = trainer.max_epochs * trainer.num_training_batches

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if every_s <= 0 or not trainer.is_global_zero or time.monotonic() - self._said < every_s:
                return
            # this step's loss, as training_step returned it (the logged one is every 10 steps')
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
            rate = throughput.samples * trainer.world_size / throughput.seconds if throughput.seconds else 0.0
            log.info("epoch %d/%d %s (step %d): %s; %.0f samples/s; elapsed %s%s", trainer.current_epoch + 1,
                     trainer.max_epochs, where, trainer.global_step, scores, rate, _clock(elapsed), left)

    return Progress()
