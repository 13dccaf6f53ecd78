"""What Lightning's per-batch machinery costs a step, and what k batches per training step would save.

A side measurement for issue 16, item 2 (bench/README.md, "Per-step overhead (2026-12-06,
08:00 UTC)"), not a workflow setting. The same setting as step_overhead.py's first rungs: the
MLP at batch 16 on 16,000 Fashion-MNIST training images, AdamW + one-cycle, manual
optimization, a Trainer with no logger, checkpoint or callback. Here the loader hands the
training step k batches at once (one batch of 16k), and the step runs the optimizer once per
batch of 16 in it: the same optimizer steps, with Lightning's loop, hooks and fetch run once
every k steps (Keras calls this steps_per_execution). k = 1 is Lightning as the workflow uses
it. Against it, the ladder's hand-written loop (lockstep.HandStep) over the same tensors.

Whole one-epoch fits, timed in turn (the hand-written loop, then each k) in each of
`--repeats` rounds; recorded: each side's microseconds per optimizer step, their medians over
the rounds, each k's median minus the hand-written loop's, and the median over the rounds of
each round's difference (the machine's speed drifts between rounds more than within one).

    PYTHONPATH=src .venv/bin/python bench/batches_per_training_step.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import lockstep  # noqa: E402

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from mnistflow.callbacks import NoProfiler  # noqa: E402
from mnistflow.config import RECIPE  # noqa: E402
from mnistflow.datamodule import MNISTDataModule  # noqa: E402
from mnistflow.networks import MLP  # noqa: E402
from mnistflow.train import keep_freed_memory, plain_cuda_check  # noqa: E402

BATCH, IMAGES, VAL_SIZE = 16, 16000, 5000
KS = (1, 2, 4, 8, 16)


class KBatches(pl.LightningModule):
    """Manual optimization over the k batches of 16 in each batch the loader hands it."""

    def __init__(self, steps: int):
        super().__init__()
        self.net, self.steps = MLP(), steps
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt, schedule = self.optimizers(), self.lr_schedulers()
        for x, y in zip(*(t.split(BATCH) for t in batch)):
            loss = F.cross_entropy(self.net(x), y)
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()
            schedule.step()
        return loss

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=RECIPE["lr"], weight_decay=RECIPE["weight_decay"])
        onecycle = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=RECIPE["lr"], total_steps=self.steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": onecycle, "interval": "step"}}


def lightning(data: MNISTDataModule, k: int, steps: int) -> float:
    """Microseconds per optimizer step of one epoch's fit, k batches per training step."""
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         limit_val_batches=0, profiler=NoProfiler())
    data.batch_size = BATCH * k
    torch.manual_seed(RECIPE["seed"])
    module = KBatches(steps)
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    return (time.perf_counter() - start) / steps * 1e6


def by_hand(x: torch.Tensor, y: torch.Tensor, steps: int) -> float:
    step = lockstep.HandStep(MLP(), x, y, BATCH, RECIPE["lr"], RECIPE["weight_decay"], steps, seed=RECIPE["seed"])
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps * 1e6


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    keep_freed_memory()
    plain_cuda_check()
    torch.set_num_threads(args.threads)
    load_start = common.load_time()
    data = MNISTDataModule(common.dataset("fashion") / "train.npz", val_size=VAL_SIZE,
                           train_limit=IMAGES + VAL_SIZE, seed=RECIPE["seed"])
    data.setup("fit")
    split = data.train_set
    steps = -(-len(split) // BATCH)
    sides = {"by hand": lambda: by_hand(split.x, split.y, steps)}
    sides.update({f"k={k}": (lambda k=k: lightning(data, k, steps)) for k in KS})
    for run in sides.values():  # warm-up
        run()
    us = {side: [] for side in sides}
    for r in range(args.repeats):
        for side, run in sides.items():
            us[side].append(round(run(), 1))
        print(f"round {r + 1}: " + ", ".join(f"{side} {v[-1]:.0f}" for side, v in us.items()), flush=True)
    median = {side: round(statistics.median(v), 1) for side, v in us.items()}
    over = {side: round(median[side] - median["by hand"], 1) for side in sides if side != "by hand"}
    paired = {side: round(statistics.median(k - h for k, h in zip(us[side], us["by hand"])), 1) for side in over}
    record = {"batch": BATCH, "images": len(split), "steps": steps, "threads": args.threads, "repeats": args.repeats,
              "us_per_step": us, "median_us_per_step": median, "over_by_hand_us": over, "over_by_hand_paired_us": paired,
              "loadavg_start": load_start, "loadavg_end": common.load_time()}
    md = (f"One epoch of the MLP at batch {BATCH} on {len(split):,} Fashion-MNIST images ({steps} optimizer steps), "
          f"Lightning with manual optimization and k batches of {BATCH} per training step, against a hand-written loop; "
          f"whole fits in turn, medians of {args.repeats} rounds.\n\n")
    md += common.table(["side", "µs a step (median)", "more than by hand", "more than by hand, paired by round"],
                       [[side, median[side], over.get(side, ""), paired.get(side, "")] for side in sides])
    common.save("batches_per_training_step", record, md)


if __name__ == "__main__":
    main()
