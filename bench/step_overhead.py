"""Per-step overhead of the training entry point, against a hand-written loop (issue 16, item 2).

A tiny network (the MLP, 784-256-10) at a small batch (16), where a step's arithmetic is a
fraction of its time and what is left is overhead. Both sides train one epoch of the
default recipe's optimiser and schedule (AdamW + one-cycle) on Fashion-MNIST's 55,000
training images, in this process, interleaved `--repeats` times:

* hand-written: the split in memory, normalised once, a fresh permutation each epoch,
  batches by indexing, `zero_grad / forward / backward / step / scheduler step`;
* ours: `mnistflow.train.main` as the workflow's train rule calls it (CSV and TensorBoard
  loggers, last.ckpt at the epoch's end, progress, the stop-signal and resume callbacks),
  timed by its own throughput callback (each epoch from its start to its last batch's end,
  validation excluded), as the hand-written loop is timed.

Printed and recorded: microseconds per step of each (medians), ours minus hand-written, and
a cProfile of one more run of ours: where the per-step time goes, by the functions that
take it (cumulative per step).

    PYTHONPATH=src .venv/bin/python bench/step_overhead.py [--repeats 3] [--limit 0]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from mnistflow.config import RECIPE, RUNTIME  # noqa: E402
from mnistflow.data import MEAN, STD  # noqa: E402
from mnistflow.networks import MLP  # noqa: E402
from mnistflow.train import folder_args  # noqa: E402
from mnistflow.train import main as train_main  # noqa: E402

BATCH = 16
VAL_SIZE = 5000
SETTINGS = {**RECIPE, "model": "mlp", "batch_size": BATCH, "epochs": 1, "nodes": 1, "devices": 1,
            "accelerator": "cpu", "name": "overhead"}
# Where a step's time goes: each place is a function in the profile, by its file's name
# (cumulative seconds / steps).
PLACES = {
    "training_step (forward, loss, self.log)": ("model.py", "training_step"),
    "self.log": ("module.py", "log"),
    "backward": ("_tensor.py", "backward"),
    "optimizer step (with its closure)": ("optimizer.py", "step"),
    "the loader's next batch": ("fetch.py", "fetch"),
    "callback hooks (every hook, through Lightning's dispatch)": ("call.py", "_call_callback_hooks"),
    "loggers (log_metrics, save)": ("logger_connector.py", "update_train_step_metrics"),
    "the LR scheduler step": ("lr_scheduler.py", "step"),
}


def handwritten(train: Path, limit: int, threads: int) -> tuple[float, int]:
    """Seconds and steps of one epoch, timed like ours: from the epoch's start to its last batch's end."""
    torch.set_num_threads(threads)
    torch.manual_seed(SETTINGS["seed"])
    with np.load(train) as split:
        images, labels = torch.from_numpy(split["images"]), torch.from_numpy(split["labels"])
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(SETTINGS["seed"]))
    train_idx = order[VAL_SIZE:][:limit or None]
    x = ((images[train_idx].float() / 255.0 - MEAN) / STD).unsqueeze(1)
    y = labels[train_idx]
    model = MLP()
    steps = -(-len(y) // BATCH)
    opt = torch.optim.AdamW(model.parameters(), lr=SETTINGS["lr"], weight_decay=SETTINGS["weight_decay"])
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=SETTINGS["lr"], total_steps=steps)
    model.train()
    t0 = time.perf_counter()
    perm = torch.randperm(len(y))
    for i in range(steps):
        idx = perm[i * BATCH:(i + 1) * BATCH]
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        loss.backward()
        opt.step()
        sched.step()
    return time.perf_counter() - t0, steps


def ours(train: Path, limit: int, threads: int, tmp: Path, profile: cProfile.Profile | None = None) -> tuple[float, int]:
    out = Path(tempfile.mkdtemp(dir=tmp))
    argv = ["--run", "overhead", "--params", json.dumps(SETTINGS), "--train-data", str(train), *folder_args(out),
            "--val-size", str(VAL_SIZE), "--train-limit", str(limit), "--threads", str(threads),
            "--loggers", ",".join(RUNTIME["loggers"]), "--checkpoint-every-s", "600", "--progress-every-s", "60"]
    if profile:
        profile.enable()
    code = train_main(argv)
    if profile:
        profile.disable()
    assert code == 0, code
    record = json.loads((out / "train.json").read_text())
    # the throughput callback's seconds: each epoch from its start to its last batch's end
    return record["train_s"], record["global_step"]


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
    p.add_argument("--limit", type=int, default=0, help="training images (0: all 55,000)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    train = common.dataset("fashion") / "train.npz"
    mine, theirs = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            seconds, steps = handwritten(train, args.limit, args.threads)
            theirs.append(seconds / steps * 1e6)
            seconds, steps = ours(train, args.limit, args.threads, Path(tmp))
            mine.append(seconds / steps * 1e6)
        profile = cProfile.Profile()
        _, steps = ours(train, args.limit, args.threads, Path(tmp), profile)
    stats = pstats.Stats(profile)
    places = where_it_goes(stats, steps)
    text = io.StringIO()
    stats.stream = text
    stats.sort_stats("tottime").print_stats(25)
    record = {
        "machine": common.machine(),
        "when": common.now(),
        "batch_size": BATCH,
        "network": "mlp",
        "steps_per_run": steps,
        "repeats": args.repeats,
        "handwritten_us_per_step": [round(v, 1) for v in theirs],
        "ours_us_per_step": [round(v, 1) for v in mine],
        "handwritten_us_per_step_median": round(statistics.median(theirs), 1),
        "ours_us_per_step_median": round(statistics.median(mine), 1),
        "step_overhead_us": round(statistics.median(mine) - statistics.median(theirs), 1),
        "profiled_us_per_step_by_place": places,
    }
    rows = [[place, f"{us:.1f}"] for place, us in places.items()]
    markdown = "\n".join([
        f"Per-step overhead, MLP at batch {BATCH}, one epoch ({steps} steps), {args.repeats} interleaved runs each "
        f"(medians; each run: {record['handwritten_us_per_step']} vs {record['ours_us_per_step']} µs).",
        "",
        common.table(["", "µs / step"], [
            ["hand-written loop", record["handwritten_us_per_step_median"]],
            ["ours (mnistflow.train)", record["ours_us_per_step_median"]],
            ["**ours minus hand-written**", f"**{record['step_overhead_us']}**"],
        ]),
        "",
        "Where ours spends a step, under cProfile (which slows Python calls: compare the places, "
        "not these with the timings above). Cumulative over the whole fit, validation included, "
        "divided by the training steps; nested places overlap:",
        "",
        common.table(["place", "µs / step"], rows),
        "",
        "```",
        "\n".join(text.getvalue().splitlines()[:45]),
        "```",
    ])
    print(markdown)
    common.save("step_overhead", record, markdown)


if __name__ == "__main__":
    main()
