"""Callbacks of the training run: stopping cleanly on the preemption signal, and throughput."""

from __future__ import annotations

import logging
import time

log = logging.getLogger("mnistflow.train")


class Preempted(Exception):
    pass


def make_preemption_callback(signal_name: str):
    """On the preemption signal, finish the epoch in progress, let ModelCheckpoint write its
    last.ckpt, then stop every rank before the next epoch.

    The handler only sets a flag. At the epoch's last batch the ranks agree on it (one
    all-reduce an epoch: one a step slowed a small network's DDP), so all of them stop at
    the same point and none is left waiting in a collective. Stopping at an epoch boundary
    keeps Lightning's resume exact (a mid-epoch checkpoint would replay or skip batches).
    Slurm's `--signal=USR1@90` leaves 90 s for that; if the epoch needs longer, the time
    limit ends the job and the previous last.ckpt, written atomically, is the resume point.
    """
    import signal

    import pytorch_lightning as pl
    import torch

    signum = getattr(signal, signal_name)

    class Preemption(pl.Callback):
        def __init__(self):
            self.received = False
            self.stop_reason = None

        def on_train_start(self, trainer, pl_module):
            signal.signal(signum, self._handle)

        def _handle(self, *_):
            self.received = True

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if self.stop_reason or not trainer.is_last_batch:
                return
            flag = self.received
            if trainer.world_size > 1:
                t = torch.tensor([int(flag)], device=pl_module.device)
                flag = bool(trainer.strategy.reduce(t, reduce_op="max").item())
            if flag:
                epoch = trainer.current_epoch
                self.stop_reason = f"{signal_name} received at epoch {epoch}, step {trainer.global_step}; stopped after saving epoch {epoch}"
                log.warning("%s received: saving epoch %d's checkpoint, then stopping", signal_name, epoch)

        def on_train_epoch_start(self, trainer, pl_module):
            if self.stop_reason:  # the previous epoch ended and its last.ckpt is written
                raise Preempted(self.stop_reason)

    return Preemption()


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

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            now = time.perf_counter()
            self.seconds += now - self._t
            self._t = now
            self.samples += len(batch[1])

    return Throughput()
