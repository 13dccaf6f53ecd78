"""Lockstep: the training entry point and a hand-written loop, one step of each in turn, in one process.

Two whole runs one after the other on this shared 2-core machine differ by 10-25% for no
reason of theirs (the same script, minutes apart). In lockstep, a hand-written step runs
from a callback at the end of each of ours, so whatever slows the machine slows both alike,
and each of ours' steps is paired with the hand-written step next to it.

* `HandStep`: the loop a competent user writes (the split in memory, a fresh permutation
  each epoch, batches by indexing, zero_grad / forward / backward / step / scheduler step),
  one step per call, with its own network, optimiser and schedule.
* `Lockstep`: the callback. Ours' step is the time from the end of the callback's previous
  call to the start of this one: the rest of Lightning's batch end, the loop, the next
  batch, the training step and the optimizer step, i.e. everything the Trainer does for
  a step. The hand-written step is timed on its own.
* `run_entry_point(argv, callback)`: `mnistflow.train.main(argv)` as the rule calls it, with
  the callback appended to the Trainer's (the only change to the entry point).
* `run_trainer(module, loader, callback, **trainer_kwargs)`: a Trainer built here, for the
  ladder of step_overhead.py (Lightning alone, then with what the workflow adds).

Figures: per-step medians of each side, the median and the mean of the paired differences
(microseconds a step ours costs more: the median of a typical step, the mean with what ours
does every n-th step only, such as logging), and the ratio of the totals (hand-written /
ours, i.e. ours' samples/s over the hand-written loop's), after `warmup` steps.
"""

from __future__ import annotations

import statistics
import time
from unittest import mock

import pytorch_lightning as pl
import torch
from torch.nn import functional as F


class HandStep:
    def __init__(self, network: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int, lr: float,
                 weight_decay: float, total_steps: int, seed: int = 42):
        torch.manual_seed(seed)
        self.model = network.train()
        self.x, self.y, self.batch = x, y, batch_size
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=lr, weight_decay=weight_decay)
        self.schedule = torch.optim.lr_scheduler.OneCycleLR(self.opt, max_lr=lr, total_steps=total_steps)
        self.steps_per_epoch = -(-len(y) // batch_size)
        self.done = 0
        self.perm = torch.randperm(len(y))

    def __call__(self) -> None:
        i = self.done % self.steps_per_epoch
        if i == 0 and self.done:
            self.perm = torch.randperm(len(self.y))
        self.done += 1
        idx = self.perm[i * self.batch:(i + 1) * self.batch]
        self.opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(self.model(self.x[idx]), self.y[idx])
        loss.backward()
        self.opt.step()
        if self.schedule.last_epoch < self.schedule.total_steps - 1:
            self.schedule.step()


class Lockstep(pl.Callback):
    def __init__(self, hand: HandStep):
        self.hand = hand
        self.ours: list[float] = []
        self.by_hand: list[float] = []
        self._mark = None

    def on_train_epoch_start(self, trainer, pl_module):
        self._mark = None  # validation and the epoch's end are not a training step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        now = time.perf_counter()
        if self._mark is not None:
            self.ours.append(now - self._mark)
            start = time.perf_counter()
            self.hand()
            self.by_hand.append(time.perf_counter() - start)
        self._mark = time.perf_counter()

    def figures(self, warmup: int = 20) -> dict:
        ours, by_hand = self.ours[warmup:], self.by_hand[warmup:]
        if not ours:
            raise RuntimeError(f"no steps after {warmup} warm-up steps (of {len(self.ours)})")
        return {
            "steps": len(ours),
            "ours_us": round(statistics.median(ours) * 1e6, 1),
            "handwritten_us": round(statistics.median(by_hand) * 1e6, 1),
            "overhead_us": round(statistics.median(a - b for a, b in zip(ours, by_hand)) * 1e6, 1),
            # what a user pays a step: the median leaves out what ours does every n-th step only
            # (the loggers' step, a periodic save), the mean counts it
            "overhead_mean_us": round(statistics.fmean(a - b for a, b in zip(ours, by_hand)) * 1e6, 1),
            "ours_over_handwritten": round(sum(by_hand) / sum(ours), 4),
        }


def run_entry_point(argv: list[str], callback) -> int:
    """`mnistflow.train.main(argv)` in this process, its Trainer given `callback` as well."""
    from mnistflow.train import main

    class TrainerWithLockstep(pl.Trainer):
        def __init__(self, *args, callbacks=None, **kwargs):
            super().__init__(*args, callbacks=[*(callbacks or []), callback], **kwargs)

    with mock.patch.object(pl, "Trainer", TrainerWithLockstep):
        return main(argv)


def run_trainer(module, loader, callback, **trainer_kwargs) -> None:
    kwargs = dict(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    kwargs.update(trainer_kwargs)
    kwargs["callbacks"] = [*kwargs.get("callbacks", []), callback]
    pl.Trainer(**kwargs).fit(module, train_dataloaders=loader)
