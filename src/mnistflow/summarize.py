"""Summary entry point: one table (CSV and Markdown) and one chart comparing every run.

    python -m mnistflow.summarize --records train.json... --metrics metrics.json... \
        --csv runs.csv --slurm-usage slurm_usage.csv --markdown runs.md --chart runs.png \
        --page runs.html --sweeps-chart sweeps.png [--sweeps JSON]

Reads each run's train.json (geometry, time, throughput) and its metrics.json (test scores),
given in the same order.
For runs trained on Slurm it asks sacct what each training job was granted and used (a job
cannot know that of itself while it runs): slurm_usage.csv, one row per job, and the
totals per run in the table, so that requests can be sized by what runs used.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import re
import shutil
import subprocess
from html import escape
from pathlib import Path

from .atomic import write_text
from .cli import run_and_exit
from .config import sweep_values
from .plots import pyplot, save_png

COLUMNS = ("run", "model", "nodes", "devices", "world_size", "epochs", "batch_size", "lr",
           "test_accuracy", "test_loss", "train_s", "samples_per_s", "hosts",
           "slurm_cpu_efficiency", "slurm_max_rss_mb")
USAGE_COLUMNS = ("run", "job", "array_task", "state", "nodes", "cpus", "wall_s", "time_limit_s", "cpu_s_allocated",
                 "cpu_s_used", "cpu_efficiency", "mem_requested_mb", "max_rss_mb")
SACCT_FIELDS = ("JobIDRaw", "JobID", "State", "NNodes", "NCPUS", "Elapsed", "Timelimit", "TotalCPU", "ReqMem", "MaxRSS")


def seconds(text: str) -> float | None:
    """sacct's [D-][HH:]MM:SS[.fff] (Elapsed, Timelimit, TotalCPU) in seconds."""
    m = re.fullmatch(r"(?:(\d+)-)?(?:(\d+):)?(\d+):(\d+(?:\.\d+)?)", text.strip())
    if not m:
        return None
    days, hours, minutes, secs = m.groups()
    return ((int(days or 0) * 24 + int(hours or 0)) * 60 + int(minutes)) * 60 + float(secs)


def megabytes(text: str) -> float | None:
    """sacct's 4000M, 3.5G, 812K (ReqMem, MaxRSS) in MB."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([KMGT]?)[cn]?", text.strip())
    if not m:
        return None
    return float(m.group(1)) * {"K": 1 / 1024, "": 1 / 1024 ** 2, "M": 1, "G": 1024, "T": 1024 ** 2}[m.group(2)]


def slurm_usage(job_ids) -> list[dict]:
    """Per job (allocation): what it was granted and what it used, from sacct; [] off Slurm."""
    ids = sorted({str(j) for j in job_ids if j}, key=int)
    if not ids or shutil.which("sacct") is None:
        return []
    try:
        out = subprocess.run(["sacct", "-j", ",".join(ids), "--parsable2", "--noheader", f"--format={','.join(SACCT_FIELDS)}"],
                             capture_output=True, text=True, timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    jobs: dict[str, dict] = {}
    for line in out.splitlines():
        row = dict(zip(SACCT_FIELDS, line.split("|")))
        # JobIDRaw: the job's own id, which the records hold (an array task's JobID is 1234_7)
        job, _, step = row["JobIDRaw"].partition(".")
        if not step:  # the allocation: its grant, wall time and (all steps') CPU time
            wall = seconds(row["Elapsed"]) or 0.0
            cpus = int(row["NCPUS"] or 0)
            used = seconds(row["TotalCPU"])
            mem = megabytes(row["ReqMem"])
            per = {"c": cpus, "n": int(row["NNodes"] or 1)}.get(row["ReqMem"].strip()[-1:], 1)  # 4000Mc: per CPU
            array_task = row["JobID"] if "_" in row["JobID"] else ""
            jobs[job] = {"job": job, "array_task": array_task, "state": row["State"].split()[0], "nodes": int(row["NNodes"] or 0), "cpus": cpus,
                         "wall_s": wall, "time_limit_s": seconds(row["Timelimit"]), "cpu_s_allocated": cpus * wall,
                         "cpu_s_used": used, "mem_requested_mb": mem * per if mem is not None else None, "max_rss_mb": None}
        elif job in jobs:  # a step (batch, 0, 1, ...): the most memory one of its tasks held
            rss = megabytes(row["MaxRSS"]) if row["MaxRSS"] else None
            if rss is not None:
                jobs[job]["max_rss_mb"] = max(jobs[job]["max_rss_mb"] or 0.0, rss)
    for usage in jobs.values():
        usage["cpu_efficiency"] = (round(usage["cpu_s_used"] / usage["cpu_s_allocated"], 3)
                                   if usage["cpu_s_used"] is not None and usage["cpu_s_allocated"] else None)
    return [jobs[j] for j in ids if j in jobs]


def collect(record_paths, metrics_paths) -> tuple[list[dict], list[dict], dict]:
    """The run table's rows, each Slurm job's usage, and each run's (train.json, metrics.json)."""
    if len(record_paths) != len(metrics_paths):
        raise ValueError(f"{len(record_paths)} training records but {len(metrics_paths)} evaluations")
    rows, jobs_of, records = [], {}, {}
    for record_path, metrics_path in zip(record_paths, metrics_paths):
        train = json.loads(Path(record_path).read_text())
        metrics = json.loads(Path(metrics_path).read_text())
        name = train["run"]
        records[name] = (train, metrics)
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
        jobs_of[name] = {str(a["slurm_job_id"]) for a in train["attempts"] if a.get("slurm_job_id")}
    # one sacct call for every run's jobs: a sweep's summary asks Slurm once
    by_job = {job["job"]: job for job in slurm_usage(set().union(*jobs_of.values()))}
    usage = []
    for row in rows:
        jobs = [{"run": row["run"], **by_job[j]} for j in sorted(jobs_of[row["run"]], key=int) if j in by_job]
        usage += jobs
        used = [j["cpu_s_used"] for j in jobs if j["cpu_s_used"] is not None]
        allocated = sum(j["cpu_s_allocated"] for j in jobs)
        rss = [j["max_rss_mb"] for j in jobs if j["max_rss_mb"] is not None]
        row["slurm_cpu_efficiency"] = round(sum(used) / allocated, 3) if used and allocated else ""
        row["slurm_max_rss_mb"] = round(max(rss)) if rss else ""
    return rows, usage, records


def to_csv(rows, columns=COLUMNS) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def to_markdown(rows) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(str(row[c]) for c in COLUMNS) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def provenance(train: dict) -> dict:
    """What produced a run, as the report's provenance table shows it."""
    prov = train.get("provenance") or {}
    commit = prov.get("git_commit")
    attempts = train.get("attempts") or []
    jobs = [a.get("slurm_array_task") or a.get("slurm_job_id") for a in attempts]
    return {
        "run": train["run"],
        "git commit": (commit[:12] + (" (dirty)" if prov.get("git_dirty") else "")) if commit else "not a git checkout",
        "code digest": (prov.get("code_digest") or "")[:12],
        "packages": ", ".join(f"{k} {v}" for k, v in sorted((prov.get("packages") or {}).items())),
        "Slurm jobs": ", ".join(str(j) for j in jobs if j) or "none (local)",
        "attempts": "; ".join(f"{a.get('attempt')}: {a.get('outcome') or 'killed (never ended)'}" for a in attempts),
        "device": train.get("device", ""),
    }


def _table(rows: list[dict], table_id: str) -> str:
    if not rows:
        return f'<p id="{table_id}">none</p>'
    head = "".join(f"<th>{escape(str(k))}</th>" for k in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{escape(str(v))}</td>" for v in row.values()) + "</tr>" for row in rows)
    return f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def to_html(rows, records: dict) -> str:
    """One page for the report: the run table, each run's provenance and per-class scores."""
    per_class = "".join(
        f'<details><summary>{escape(name)}: test accuracy {metrics["accuracy"]:.4f}</summary>'
        + _table([{"class": c["class"], "support": c["support"], "precision": f'{c["precision"]:.4f}',
                   "recall": f'{c["recall"]:.4f}'} for c in metrics["per_class"]], f"per-class-{escape(name)}")
        + "</details>"
        for name, (_, metrics) in records.items()
    )
    style = ("body{font-family:sans-serif;font-size:13px;margin:1em}table{border-collapse:collapse;margin:.5em 0 1.5em}"
             "td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}th{background:#eee}")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>mnistflow runs</title><style>{style}</style></head><body>"
            f"<h2>Runs</h2>{_table(rows, 'runs')}"
            f"<h2>Provenance</h2>{_table([provenance(train) for train, _ in records.values()], 'provenance')}"
            f"<h2>Per-class precision and recall (test split)</h2>{per_class}</body></html>\n")


def plot_sweeps(rows, sweeps: dict, path) -> None:
    """Test accuracy against each swept setting: one panel per sweep and key, a point per run
    (the other keys' values vary within a column: every point of the grid is shown)."""
    plt = pyplot()
    by_run = {r["run"]: r for r in rows}
    panels = [(sweep, key) for sweep, spec in sweeps.items() for key in spec["keys"]]
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(4 * max(len(panels), 1), 3.2), squeeze=False)
    if not panels:
        axes[0][0].text(0.5, 0.5, "no sweeps configured", ha="center", va="center")
        axes[0][0].set_axis_off()
    for ax, (sweep, key) in zip(axes[0], panels):
        points = [(spec_value, by_run[run]["test_accuracy"]) for run, spec_value in sweeps[sweep]["values"][key].items()
                  if run in by_run]
        values = sorted({v for v, _ in points}, key=lambda v: (isinstance(v, str), v))
        positions = {v: i for i, v in enumerate(values)}
        numeric = all(isinstance(v, (int, float)) for v in values)
        xs = [v if numeric else positions[v] for v, _ in points]
        ax.scatter(xs, [acc for _, acc in points], alpha=0.7)
        if numeric and len(values) > 2 and min(values) > 0 and max(values) / min(values) >= 10:
            ax.set_xscale("log")
        if not numeric:
            ax.set_xticks(range(len(values)), [str(v) for v in values])
        ax.set(xlabel=key, ylabel="test accuracy", title=f"sweep {sweep}")
    save_png(fig, path)


def plot(rows, path) -> None:
    plt = pyplot()
    names = [r["run"] for r in rows]
    fig, (acc_ax, speed_ax) = plt.subplots(1, 2, figsize=(10, 0.6 * len(rows) + 2))
    acc_ax.barh(names, [r["test_accuracy"] for r in rows], color="tab:blue")
    acc_ax.set(xlabel="test accuracy", xlim=(min(r["test_accuracy"] for r in rows) * 0.98, 1.0), title="Accuracy")
    speed_ax.barh(names, [r["samples_per_s"] or 0 for r in rows], color="tab:orange")
    speed_ax.set(xlabel="training samples / s", title="Throughput")
    for ax in (acc_ax, speed_ax):
        ax.invert_yaxis()
    save_png(fig, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m mnistflow.summarize", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--records", nargs="+", required=True, help="each run's train.json")
    p.add_argument("--metrics", nargs="+", required=True, help="each run's evaluation (metrics.json), in the same order")
    for name in ("csv", "slurm-usage", "markdown", "chart", "page", "sweeps-chart"):
        p.add_argument(f"--{name}", required=True, type=Path)
    p.add_argument("--sweeps", default="{}", help="JSON: config's sweeps, {sweep: {grid: {key: [values]}}}")
    args = p.parse_args(argv)
    rows, usage, records = collect(args.records, args.metrics)
    write_text(args.csv, to_csv(rows))
    write_text(args.slurm_usage, to_csv(usage, USAGE_COLUMNS))
    write_text(args.markdown, to_markdown(rows))
    plot(rows, args.chart)
    write_text(args.page, to_html(rows, records))
    plot_sweeps(rows, sweep_values({"sweeps": json.loads(args.sweeps)}), args.sweeps_chart)
    return 0


if __name__ == "__main__":
    run_and_exit(main)
