"""Summary entry point: one table (CSV and Markdown) and one chart comparing every run.

    python -m mnistflow.summarize --runs NAME... --results results/runs --out DIR

Reads each run's train.json (geometry, time, throughput) and metrics.json (test scores).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
from pathlib import Path

from .atomic import atomic_path, write_text
from .cli import run_and_exit

COLUMNS = ("run", "model", "nodes", "devices", "world_size", "epochs", "batch_size", "lr",
           "test_accuracy", "test_loss", "train_s", "samples_per_s", "hosts")


def collect(runs, results_dir) -> list[dict]:
    rows = []
    for name in runs:
        train = json.loads((Path(results_dir) / name / "train.json").read_text())
        metrics = json.loads((Path(results_dir) / name / "eval" / "metrics.json").read_text())
        settings = train["settings"]
        rows.append({
            "run": name,
            "model": settings["model"],
            "nodes": train["num_nodes"],
            "devices": settings["devices"],
            "world_size": train["world_size"],
            "epochs": train["epochs"],
            "batch_size": settings["batch_size"],
            "lr": settings["lr"],
            "test_accuracy": round(metrics["accuracy"], 4),
            "test_loss": round(metrics["loss"], 4),
            "train_s": train["train_s"],
            "samples_per_s": train["samples_per_s"],
            "hosts": len({h.split("/")[0] + "/" + h.split("/")[1] for h in train["hosts"]}),
        })
    return rows


def to_csv(rows) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def to_markdown(rows) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(str(row[c]) for c in COLUMNS) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def plot(rows, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["run"] for r in rows]
    fig, (acc_ax, speed_ax) = plt.subplots(1, 2, figsize=(10, 0.6 * len(rows) + 2))
    acc_ax.barh(names, [r["test_accuracy"] for r in rows], color="tab:blue")
    acc_ax.set(xlabel="test accuracy", xlim=(min(r["test_accuracy"] for r in rows) * 0.98, 1.0), title="Accuracy")
    speed_ax.barh(names, [r["samples_per_s"] or 0 for r in rows], color="tab:orange")
    speed_ax.set(xlabel="training samples / s", title="Throughput")
    for ax in (acc_ax, speed_ax):
        ax.invert_yaxis()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m mnistflow.summarize", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", required=True)
    p.add_argument("--results", required=True, help="directory holding one folder per run")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    rows = collect(args.runs, args.results)
    out = Path(args.out)
    write_text(out / "runs.csv", to_csv(rows))
    write_text(out / "runs.md", to_markdown(rows))
    plot(rows, out / "runs.png")
    return 0


if __name__ == "__main__":
    run_and_exit(main)
