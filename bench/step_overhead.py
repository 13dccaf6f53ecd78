"""Per-step overhead of the training entry point, against a hand-written loop (issue 16, item 2).

A tiny network (the MLP, 784-256-10) at a small batch (16), where a step's arithmetic is a
fraction of its time and what is left is overhead, on Fashion-MNIST's training images, the
default recipe's optimiser and schedule (AdamW + one-cycle), one epoch, in lockstep
(bench/lockstep.py): a hand-written step runs after each step of ours, in this process, and
each of ours' steps is paired with the hand-written one beside it.

Ours is measured as a ladder, each rung in lockstep with the hand-written loop, so that
each of the workflow's additions shows what it costs:

1. Lightning alone: a LightningModule with the network, its loss and the optimiser, a
   Trainer with no logger, checkpoint or callback, a DataLoader over the in-memory split;
2. the same with manual optimization (`automatic_optimization = False`, the
   LightningOptimizer and `manual_backward`), as the workflow's module trains since
   2026-12-06: what leaving the optimizer's closure gives;
3. the workflow's LightningModule (mnistflow.model: the epoch's mean loss, the step loss
   logged every log_every_n_steps steps, the run setting's default) in place of the bare one;
4. with the loggers (CSV and TensorBoard);
5. with the callbacks (last.ckpt, throughput, progress, save-and-stop, resume state);
6. `mnistflow.train.main` as the workflow's train rule calls it (the data module, records).

Three of the entry point's choices are measured on their own, in blocks of steps with and
without them in turn (alike for both, so a drift of the machine's speed falls on both):
Lightning's NVML-based CUDA check (plain_cuda_check), on the hand-written step; Lightning's
default profiler in place of callbacks.NoProfiler, within the entry point's fit; and the
step loss logged every 10 steps in place of the default log_every_n_steps, within the
entry point's fit. A fourth cannot change within a fit: the workflow's module under
Lightning's automatic optimization, as it trained until 2026-12-06, against the module as it
is, in pairs of whole runs of the entry point, each in lockstep, in alternating order.

Recorded: for each rung, the medians over `--repeats` runs of the per-step medians and of
the paired differences' medians and means; `step_overhead_us` is rung 6's mean, what a user
pays a step, the loggers' steps included (a median leaves out what is done every n-th step
only). Then a cProfile of one more run of the entry point: where the per-step time goes, by
the functions that take it.

    PYTHONPATH=src .venv/bin/python bench/step_overhead.py [--repeats 3] [--limit 16000]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import logging
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import lockstep  # noqa: E402

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
from torch.nn import functional as F  # noqa: E402
from pytorch_lightning.profilers import PassThroughProfiler  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from mnistflow.callbacks import NoProfiler, Progress, ResumeState, SaveAndStop, Throughput  # noqa: E402
from mnistflow.config import RECIPE, RUNTIME  # noqa: E402
from mnistflow.datamodule import MNISTDataModule, TensorSplit  # noqa: E402
from mnistflow.model import MNISTClassifier  # noqa: E402
from mnistflow.networks import MLP  # noqa: E402
from mnistflow.signals import StopSignals  # noqa: E402
from mnistflow.train import NVML_CUDA_CHECK_ENV, folder_args, keep_freed_memory, plain_cuda_check, quiet_known_noise  # noqa: E402
from mnistflow.train import main as train_main  # noqa: E402
import mnistflow.model  # noqa: E402
from tests.automatic_optimization import AutomaticOptimization  # noqa: E402

BATCH = 16
VAL_SIZE = 5000
SETTINGS = {**RECIPE, "model": "mlp", "batch_size": BATCH, "epochs": 1, "nodes": 1, "devices": 1,
            "accelerator": "cpu", "name": "overhead"}
# Where a step's time goes: each place is a function in the profile, by its file's name
# (cumulative seconds / steps).
PLACES = {
    "training_step (the batch's loss, backward, the optimizer and schedule)": ("model.py", "training_step"),
    "the batch's loss (forward, loss, self.log)": ("model.py", "batch_loss"),
    "self.log": ("module.py", "log"),
    "backward": ("_tensor.py", "backward"),
    "optimizer step": ("optimizer.py", "step"),
    "the loader's next batch": ("fetch.py", "fetch"),
    "callback hooks (every hook, through Lightning's dispatch)": ("call.py", "_call_callback_hooks"),
    "loggers (log_metrics, save)": ("logger_connector.py", "update_train_step_metrics"),
    "the LR scheduler step": ("lr_scheduler.py", "step"),
}


class BareModule(pl.LightningModule):
    """Lightning alone: the network, its loss, the recipe's optimiser and schedule."""

    def __init__(self):
        super().__init__()
        self.net = MLP()

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=SETTINGS["lr"], weight_decay=SETTINGS["weight_decay"])
        onecycle = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=SETTINGS["lr"], total_steps=int(self.trainer.estimated_stepping_batches))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": onecycle, "interval": "step"}}


class ManualModule(BareModule):
    """The same with manual optimization: no closure, the optimizer stepped in training_step."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        opt = self.optimizers()
        opt.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        opt.step()
        self.lr_schedulers().step()
        return loss


class Ladder:
    def __init__(self, train: Path, limit: int, threads: int, tmp: Path):
        # The entry point's process settings from the start: its first run would set them for
        # this whole process, and the rungs before it would run without.
        keep_freed_memory()
        plain_cuda_check()
        torch.set_num_threads(threads)
        self.train, self.limit, self.threads, self.tmp = train, limit, threads, tmp
        data = MNISTDataModule(train, batch_size=BATCH, val_size=VAL_SIZE, train_limit=limit and limit + VAL_SIZE,
                               seed=SETTINGS["seed"])
        data.setup("fit")
        self.split = data.train_set
        self.steps = -(-len(self.split) // BATCH)

    def hand(self):
        return lockstep.Lockstep(lockstep.HandStep(MLP(), self.split.x, self.split.y, BATCH, SETTINGS["lr"],
                                                        SETTINGS["weight_decay"], self.steps, seed=SETTINGS["seed"] + 1))

    def loader(self):
        return DataLoader(self.split, batch_size=BATCH, shuffle=True, collate_fn=lambda batch: batch)

    def trainer(self, module, loggers=False, callbacks=False):
        callback = self.hand()
        out = Path(tempfile.mkdtemp(dir=self.tmp))
        extra = {}
        if loggers:
            from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger

            extra["logger"] = [CSVLogger(save_dir=out, name="logs", version=""),
                               TensorBoardLogger(save_dir=out, name="logs", version="", default_hp_metric=False)]
        if callbacks:
            from pytorch_lightning.callbacks import ModelCheckpoint

            throughput = Throughput()
            extra["enable_checkpointing"] = True
            extra["callbacks"] = [
                ModelCheckpoint(dirpath=out / "checkpoints", filename="last", save_top_k=1, enable_version_counter=False),
                throughput, Progress(throughput, 60),
                SaveAndStop(StopSignals(()), out / "checkpoints" / "last.ckpt", 600, 10),
                ResumeState({}, 1),
            ]
        torch.manual_seed(SETTINGS["seed"])
        lockstep.run_trainer(module, self.loader(), callback, log_every_n_steps=RUNTIME["log_every_n_steps"], **extra)
        return callback.figures()

    def entry_point(self, profile: cProfile.Profile | None = None, callback=None):
        """In lockstep; or, with `profile`, alone (no hand-written steps in its profile); or with
        `callback` in place of the lockstep's."""
        out = Path(tempfile.mkdtemp(dir=self.tmp))
        argv = ["--run", "overhead", "--params", json.dumps(SETTINGS), "--train-data", str(self.train), *folder_args(out),
                "--val-size", str(VAL_SIZE), "--train-limit", str(self.limit and self.limit + VAL_SIZE),
                "--threads", str(self.threads), "--loggers", ",".join(RUNTIME["loggers"]),
                "--checkpoint-every-s", "600", "--progress-every-s", "60"]
        own = callback is not None
        callback = callback or (None if profile else self.hand())
        if profile:
            profile.enable()
            code = train_main(argv)
            profile.disable()
        else:
            code = lockstep.run_entry_point(argv, callback)
        assert code == 0, code
        figures = callback.figures() if callback and not own else None
        return figures, json.loads((out / "train.json").read_text())["global_step"]

    def rungs(self):
        model = lambda: MNISTClassifier(model="mlp", lr=SETTINGS["lr"])  # noqa: E731
        return {
            "Lightning alone": lambda: self.trainer(BareModule()),
            "Lightning alone, manual optimization (as the workflow's module)": lambda: self.trainer(ManualModule()),
            "+ the workflow's LightningModule (epoch mean, logging)": lambda: self.trainer(model()),
            "+ loggers (CSV, TensorBoard)": lambda: self.trainer(model(), loggers=True),
            "+ callbacks (last.ckpt, throughput, progress, save-and-stop, resume state)":
                lambda: self.trainer(model(), loggers=True, callbacks=True),
            "mnistflow.train.main (+ the data module, records)": lambda: self.entry_point()[0],
        }


def nvml_probe_cost(ladder: Ladder, rounds: int = 20, block: int = 50) -> dict:
    """What Lightning's NVML-based CUDA check (plain_cuda_check) costs a hand-written step, in
    this process: blocks of steps with it on and off in turn; medians of the step times.

    In lockstep both sides run in the same process, so the ladder cannot show it: this is
    what the entry point paid a step more than a hand-written script, which never imports
    Lightning, until it turned the check off.
    """
    import os

    step = ladder.hand().hand
    times = {"on": [], "off": []}
    for _ in range(rounds):
        for state in ("on", "off"):
            if state == "on":
                os.environ[NVML_CUDA_CHECK_ENV] = "1"
            else:
                os.environ.pop(NVML_CUDA_CHECK_ENV, None)
            for _ in range(block):
                start = time.perf_counter()
                step()
                times[state].append(time.perf_counter() - start)
    plain_cuda_check()
    on, off = (statistics.median(times[state]) * 1e6 for state in ("on", "off"))
    return {"with_check_us": round(on, 1), "without_us": round(off, 1), "probe_us": round(on - off, 1),
            "steps_each": rounds * block}


class SwapInBlocks(pl.Callback):
    """Two values of one of the Trainer's settings in turn, `block` training steps each, in
    one fit; each step's time (from one step's end to the next's) under the value it ran with."""

    def __init__(self, block: int, values: dict, apply):
        self.block, self.values, self.apply = block, values, apply
        self.times = {name: [] for name in values}
        self._mark = self._current = None

    def on_train_epoch_start(self, trainer, pl_module):
        self._mark = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        now = time.perf_counter()
        if self._mark is not None:
            self.times[self._current].append(now - self._mark)
        self._current = list(self.values)[(batch_idx + 1) // self.block % 2]
        self.apply(trainer, self.values[self._current])
        self._mark = time.perf_counter()


def swapped_fits(ladder: Ladder, runs: int, block: int, values: dict, apply) -> dict[str, list[float]]:
    """The step times under each value, over `runs` fits of the entry point (SwapInBlocks)."""
    times = {name: [] for name in values}
    for _ in range(runs):
        swap = SwapInBlocks(block, values, apply)
        ladder.entry_point(callback=swap)
        for name in values:
            times[name] += swap.times[name]
    return times


def profiler_cost(ladder: Ladder, runs: int = 3, block: int = 50) -> dict:
    """What Lightning's default profiler costs the entry point a step more than NoProfiler:
    medians of the step times under each, in blocks within each of `runs` fits (smaller
    blocks where a fit is short, as in the smoke run). Both profile nothing, so swapping them
    mid-fit changes nothing else."""
    block = max(1, min(block, ladder.steps // 4))
    times = swapped_fits(ladder, runs, block, {"default": PassThroughProfiler(), "NoProfiler": NoProfiler()},
                         lambda trainer, profiler: setattr(trainer, "profiler", profiler))
    default, own = (statistics.median(times[name]) * 1e6 for name in ("default", "NoProfiler"))
    return {"default_profiler_us": round(default, 1), "no_profiler_us": round(own, 1),
            "gain_us": round(default - own, 1), "runs": runs, "block": block, "steps_each": len(times["NoProfiler"])}


def log_interval_cost(ladder: Ladder, runs: int = 3, often: int = 10) -> dict:
    """What logging the step loss every `often` steps costs the entry point a step more than
    the default interval: the mean step time under each (the logged steps are the point, so
    not the median), in blocks of twice the default (a multiple of both, so that each block
    logs its share; smaller where a fit is short, as in the smoke run) within each of `runs`
    fits. What is logged changes nothing that is trained (tests/test_train.py)."""
    default = RUNTIME["log_every_n_steps"]
    block = min(2 * default, max(1, ladder.steps // 4))
    times = swapped_fits(ladder, runs, block, {"often": often, "default": default},
                         lambda trainer, interval: setattr(trainer, "log_every_n_steps", interval))
    mean = {name: statistics.fmean(times[name]) * 1e6 for name in ("often", "default")}
    return {"often": often, "default": default, "often_us": round(mean["often"], 1), "default_us": round(mean["default"], 1),
            "gain_us": round(mean["often"] - mean["default"], 1), "runs": runs, "block": block,
            "steps_each": len(times["default"])}


def automatic_optimization_cost(ladder: Ladder, pairs: int) -> dict:
    """What Lightning's automatic optimization costs the entry point a step more than the
    module's own optimizer step: pairs of whole runs, each in lockstep with the hand-written
    loop, in alternating order; the median of the pairs' differences of the mean overheads."""
    each = {"automatic": [], "manual": []}
    for i in range(pairs):
        for name in ("automatic", "manual") if i % 2 == 0 else ("manual", "automatic"):
            if name == "automatic":
                with mock.patch.object(mnistflow.model, "MNISTClassifier", AutomaticOptimization):
                    figures, _ = ladder.entry_point()
            else:
                figures, _ = ladder.entry_point()
            each[name].append(figures["overhead_mean_us"])
    gains = [a - m for a, m in zip(each["automatic"], each["manual"])]
    return {"automatic_us": each["automatic"], "manual_us": each["manual"], "pairs": pairs,
            "gain_us": round(statistics.median(gains), 1), "each_gain_us": [round(g, 1) for g in gains]}


def where_it_goes(stats: pstats.Stats, steps: int) -> dict:
    """Cumulative microseconds per step of each place, matched by file and function name."""
    found = {}
    for (filename, _, name), (_, _, _, cumulative, _) in stats.stats.items():
        for place, (file_suffix, function) in PLACES.items():
            if filename.endswith(file_suffix) and name == function:
                found[place] = max(found.get(place, 0.0), cumulative * 1e6 / steps)
    return {place: round(found.get(place, 0.0), 1) for place in PLACES}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--limit", type=int, default=16000, help="training images (0: all 55,000)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    train = common.dataset("fashion") / "train.npz"
    quiet_known_noise()
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        ladder = Ladder(train, args.limit, args.threads, Path(tmp))
        rungs = ladder.rungs()
        runs = {name: [] for name in rungs}
        next(iter(rungs.values()))()  # warm-up, not recorded: the first fit of a process pays one-off costs
        for _ in range(args.repeats):
            for name, run in rungs.items():
                runs[name].append(run())
        probe = nvml_probe_cost(ladder)
        profiler = profiler_cost(ladder, runs=min(args.repeats, 3))
        interval = log_interval_cost(ladder, runs=min(args.repeats, 3))
        automatic = automatic_optimization_cost(ladder, pairs=args.repeats)
        profile = cProfile.Profile()
        _, steps = ladder.entry_point(profile)
    ladder_figures = {
        name: {
            "ours_us": round(statistics.median(r["ours_us"] for r in each), 1),
            "handwritten_us": round(statistics.median(r["handwritten_us"] for r in each), 1),
            "overhead_us": round(statistics.median(r["overhead_us"] for r in each), 1),
            "overhead_mean_us": round(statistics.median(r["overhead_mean_us"] for r in each), 1),
            "each_overhead_us": [r["overhead_us"] for r in each],
            "each_overhead_mean_us": [r["overhead_mean_us"] for r in each],
            "steps": each[0]["steps"],
        }
        for name, each in runs.items()
    }
    entry = ladder_figures[list(rungs)[-1]]
    stats = pstats.Stats(profile)
    places = where_it_goes(stats, steps)
    text = io.StringIO()
    stats.stream = text
    stats.sort_stats("tottime").print_stats(25)
    record = {
        "batch_size": BATCH,
        "network": "mlp",
        "method": "lockstep (bench/lockstep.py): a hand-written step after each of ours, in one process; "
                  "medians over the repeats of each run's per-step medians and of the paired differences' "
                  "medians and means; step_overhead_us is the entry point's mean",
        "repeats": args.repeats,
        "ladder": ladder_figures,
        "handwritten_us_per_step_median": entry["handwritten_us"],
        "ours_us_per_step_median": entry["ours_us"],
        "step_overhead_us": entry["overhead_mean_us"],
        "step_overhead_median_us": entry["overhead_us"],
        "nvml_probe": probe,
        "default_profiler": profiler,
        "log_interval": interval,
        "automatic_optimization": automatic,
        "profiled_steps": steps,
        "profiled_us_per_step_by_place": places,
    }
    markdown = "\n".join([
        f"Per-step overhead, MLP at batch {BATCH}, one epoch ({entry['steps']} steps measured a run), in lockstep "
        f"with a hand-written loop, {args.repeats} runs of each rung (medians over the runs; the paired difference "
        "is each of ours' steps minus the hand-written step beside it: its median is a typical step's, its mean "
        "counts what is done every n-th step only, such as the loggers' step).",
        "",
        common.table(["rung", "ours µs / step", "by hand µs / step", "ours minus by hand: mean", "median", "each run's mean"],
                     [[name, f["ours_us"], f["handwritten_us"],
                       f"**{f['overhead_mean_us']}**" if name == list(rungs)[-1] else f["overhead_mean_us"], f["overhead_us"],
                       ", ".join(f"{v:,.0f}" for v in f["each_overhead_mean_us"])] for name, f in ladder_figures.items()]),
        "",
        f"**step_overhead_us = {record['step_overhead_us']}** (the entry point's mean; target <= 300); its median "
        f"{record['step_overhead_median_us']}.",
        "",
        f"Lightning's NVML-based CUDA check, which the entry point turns off (`plain_cuda_check`), measured on the "
        f"hand-written step in blocks with it on and off ({probe['steps_each']} steps each): {probe['with_check_us']} µs "
        f"a step with it, {probe['without_us']} without, **{probe['probe_us']} µs** a step that the entry point paid "
        "more than a hand-written script until it turned the check off (both sides of the lockstep run in one "
        "process, so the ladder does not show it).",
        "",
        f"Lightning's default profiler (PassThroughProfiler) in place of the entry point's NoProfiler, swapped in "
        f"blocks of {profiler['block']} steps within {profiler['runs']} fits of the entry point "
        f"({profiler['steps_each']} steps each): {profiler['default_profiler_us']} µs a step with the default, "
        f"{profiler['no_profiler_us']} with NoProfiler, **{profiler['gain_us']} µs** a step that NoProfiler saves.",
        "",
        f"The step loss logged every {interval['often']} steps (the entry point's interval until 2026-12-06) in place "
        f"of the default every {interval['default']}, swapped in blocks of {interval['block']} steps within "
        f"{interval['runs']} fits of the entry point ({interval['steps_each']} steps each; means, the logged steps "
        f"included): {interval['often_us']} µs a step against {interval['default_us']}, **{interval['gain_us']} µs** a "
        "step that the default interval saves.",
        "",
        f"Lightning's automatic optimization (the optimizer stepped in its closure, as the workflow's module "
        f"trained until 2026-12-06) in place of the module's own step, in {automatic['pairs']} pairs of whole runs "
        f"of the entry point, each in lockstep, in alternating order (the mean overheads): "
        f"{', '.join(f'{a:,.0f}' for a in automatic['automatic_us'])} µs a step against "
        f"{', '.join(f'{m:,.0f}' for m in automatic['manual_us'])}, **{automatic['gain_us']} µs** a step that the "
        "module's own step saves (the median of the pairs).",
        "",
        "Where the entry point spends a step, in one more run on its own (no lockstep), under cProfile (which "
        "slows Python calls: compare the places, not these with the timings above). Cumulative over the "
        "whole fit, validation included, divided by the training steps; nested places overlap:",
        "",
        common.table(["place", "µs / step"], [[place, f"{us:.1f}"] for place, us in places.items()]),
        "",
        "```",
        "\n".join(text.getvalue().splitlines()[:45]),
        "```",
    ])
    common.save("step_overhead", record, markdown)


if __name__ == "__main__":
    main()
