"""Item 3: DDP scaling on this machine: 1 process against 2 processes, samples/s and efficiency.

Each run is `python -m mnistflow.train` as the workflow runs it, with the geometry in the
run's settings; threads per process as the rules give them on this machine (train: all
cores; train_ddp: cores / world size). The figure is train.json's `samples_per_s`
(all processes' training samples over the training loop's seconds, validation excluded).

On one machine the processes share its cores, so efficiency here is
samples/s(2 processes) / samples/s(1 process) on the same cores (1.0: DDP costs nothing);
`per_core_efficiency` divides by the ideal with twice the cores and is only meaningful
across machines. For GPUs see bench/gpu.py.

    PYTHONPATH=src .venv/bin/python bench/ddp_scaling.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

GEOMETRIES = [
    ("1 process (nodes=1, devices=1)", 1, 1),
    ("2 processes, 1 node (nodes=1, devices=2)", 1, 2),
    ("2 node processes (nodes=2, devices=1)", 2, 1),
]


def one(root, nodes, devices, threads, limit, tmp, tag):
    from mnistflow.config import RECIPE
    from mnistflow.train import folder_args

    # One epoch of the default recipe: samples/s, not accuracy, is measured.
    run = {**RECIPE, "epochs": 1, "nodes": nodes, "devices": devices, "accelerator": "cpu", "name": "ddp"}
    out = Path(tmp) / f"{tag}_{nodes}x{devices}"
    cmd = [common.PYTHON, "-m", "mnistflow.train", "--run", "ddp", "--params", json.dumps(run), "--train-data",
           str(root / "train.npz"), *folder_args(out), "--val-size", "5000", "--train-limit", str(limit), "--threads", str(threads)]
    wall, _ = common.run(cmd, env=common.env_with_src())
    rec = json.loads((out / "train.json").read_text())
    return {"wall_s": round(wall, 2), "fit_s": rec["attempts"][-1]["fit_s"], "train_s": rec["train_s"], "samples_per_s": rec["samples_per_s"],
            "world_size": rec["world_size"], "strategy": rec["strategy"], "hosts": rec["hosts"],
            "val_acc": rec["final"].get("val_acc")}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train-limit", type=int, default=60000, help="Fashion-MNIST images used (5,000 of them for validation)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.train_limit, args.repeats = 6000, 1
    root = common.dataset("fashion")
    cores = os.cpu_count() or 1
    results = {g[0]: [] for g in GEOMETRIES}
    load_start = common.load_time()
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for label, nodes, devices in GEOMETRIES:
                world = nodes * devices
                rec = one(root, nodes, devices, max(1, cores // world), args.train_limit, tmp, f"r{r}")
                results[label].append(rec)
                print(f"repeat {r + 1} {label}: {rec['samples_per_s']:,.0f} samples/s, wall {rec['wall_s']:.1f} s", flush=True)
    best = {k: max(v, key=lambda x: x["samples_per_s"]) for k, v in results.items()}
    base = best[GEOMETRIES[0][0]]["samples_per_s"]
    rows, summary = [], []
    for label, nodes, devices in GEOMETRIES:
        b = best[label]
        world = nodes * devices
        eff = b["samples_per_s"] / base
        summary.append({"geometry": label, "nodes": nodes, "devices": devices, "world_size": world,
                        "threads_per_process": max(1, cores // world), "samples_per_s": b["samples_per_s"],
                        "efficiency_same_cores": round(eff, 3), "per_core_efficiency": round(eff / world, 3),
                        "wall_s": b["wall_s"], "fit_s": b["fit_s"], "each_repeat": [x["samples_per_s"] for x in results[label]]})
        rows.append([label, max(1, cores // world), b["samples_per_s"], round(eff, 3), b["wall_s"], b["fit_s"]])
    from mnistflow.config import RECIPE

    record = {"train_images": args.train_limit - 5000, "model": RECIPE["model"], "batch_size_global": RECIPE["batch_size"], "repeats": args.repeats,
              "cores": cores, "loadavg_start": load_start, "results": summary, "raw": results}
    md = common.table(["geometry", "threads/process", "samples/s (best)", "efficiency vs 1 process, same cores", "process wall s", "fit s"], rows)
    md += (f"\n\n{args.train_limit - 5000:,} Fashion-MNIST training images, the default recipe ({RECIPE['model']}, "
           f"global batch {RECIPE['batch_size']}), 1 epoch, best of {args.repeats}. "
           "A GPU machine's 1/2/4/8-device figures come from bench/gpu.py.")
    common.save("ddp_scaling", record, md)


if __name__ == "__main__":
    main()
