"""Render bench/results/gpu_*.json (written by bench/gpu.py on a GPU machine) as gpu_*.md tables.

    python bench/gpu_report.py                    # every bench/results/gpu_*.json
    python bench/gpu_report.py OUT/gpu.json       # one device run's, written beside it as OUT/gpu.md
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def render(d: dict) -> str:
    md = [f"### GPU: {d['device']} ({d.get('nvidia_smi', '')}), torch {d['torch']}, CUDA {d.get('cuda')}, "
          f"Lightning {d.get('pytorch_lightning')}; {d['date']}\n"]
    data = d.get("data", "npm digits: 8,000 train / 2,000 test")
    if d.get("throughput"):
        md.append(f"Throughput of the examples CNN, the whole training split ({data}) on the GPU (samples/s):\n")
        md.append(common.table(["path", "batch", "precision", "samples/s", "/ plain loop (bf16, same batch)"],
                           [[r["path"] + (" (channels-last)" if r.get("channels_last") else ""), r["batch"], r.get("precision"),
                             r.get("samples_per_s", r.get("error")), r.get("over_plain")] for r in d["throughput"]]))
    syncs = d.get("syncs")
    if syncs and syncs.get("syncs_per_step") is not None:
        every = syncs.get("log_every_n_steps", 10)  # records before 2026-12-06 logged every 10 steps
        md.append(f"\n\nThe host waited for the GPU {syncs['syncs_per_step']} times a step in our training step "
                  f"(batch {syncs['batch']}, {syncs['steps']} steps, torch's sync debug mode; Lightning reads the logged "
                  f"loss back every {every} steps, {1 / every:g} a step). Where from:\n")
        md.append(common.table(["place", "syncs"], [[place, n] for place, n in syncs["places"].items()]))
    tta = d.get("time_to_accuracy")
    if tta:
        best99 = tta.get("fastest_to_99")
        if best99:
            verdict = (f"99% first reached after **{best99['s_to_99']} s** ({best99['optimizer']} lr {best99['lr']} "
                       f"{best99['schedule']}, batch {best99['batch']}, {best99['epochs']} epochs, {best99['precision']})")
            if tta.get("tta99_speedup_over_tutorial_recipe"):
                verdict += f", **{tta['tta99_speedup_over_tutorial_recipe']}x** faster than the tutorial's recipe"
        else:
            verdict = "99% was not reached on this training set"
        md.append(f"\n\nTime to accuracy, plain loop with the data on the GPU ({tta['data']}); best test accuracy of any run "
                  f"**{tta['best_acc']:.2%}**; {verdict}.\n")
        rows = []
        for r in tta["runs"]:
            if "best_acc" not in r:
                continue
            rows.append([f"{r['optimizer']} lr {r['lr']} {r['schedule']}" + (f" seed {r['seed']}" if 'seed' in r else ""), r["batch"],
                         r["epochs"], r["precision"], r["best_acc"], r["s_to_98"], r["s_to_99"], r["total_s"]])
        md.append(common.table(["recipe", "batch", "epochs", "precision", "best test acc", "s to 98%", "s to 99%", "total s"], rows))
    runs = d.get("train_entry_point")
    if runs:
        md.append(f"\n\n`python -m mnistflow.train` on the GPU ({data}; the default recipe unless a column says otherwise):\n")
        md.append(common.table(["run", "nodes x devices", "precision", "changed from the default recipe", "process group", "exit",
                                "accelerator", "world size", "process wall s", "fit s", "samples/s", "test acc"],
                               [[r["run"], f"{r['nodes']} x {r['devices']}", r.get("precision"),
                                 ", ".join(f"{k} {v}" for k, v in (r.get("overrides") or {}).items()),
                                 r.get("process_group_backend"), r.get("rc"),
                                 r.get("accelerator"), r.get("world_size"), r.get("wall_s"), r.get("fit_s"), r.get("samples_per_s"),
                                 r.get("test_acc")] for r in runs]))
        timed = [r for r in runs if r.get("process_s")]
        if timed:
            parts = ["start_to_train", "imports", "setup", "fit", "outputs"]
            md.append("\n\nWhere each training process's time went (train.json's `process_s`, seconds):\n")
            md.append(common.table(["run", "process wall s", *parts], [[r["run"], r.get("wall_s"), *(r["process_s"].get(k) for k in parts)]
                                                                     for r in timed]))
        for r in runs:
            if r.get("separate_call"):
                md.append(f"\n\n`{r['run']}`: {r['separate_call']}.")
        fails = [r for r in runs if r.get("rc") not in (0, None) and r.get("log_tail")]
        for r in fails:
            last = [line for line in r["log_tail"].splitlines() if "Duplicate GPU" in line or "Error" in line]
            md.append(f"\n\n`{r['run']}` failed: {last[-1].strip() if last else 'see gpu json'}")
    return "\n".join(md) + "\n"


def main(paths: list[str]):
    for path in [Path(p) for p in paths] or sorted(common.RESULTS.glob("gpu_*.json")):
        d = json.loads(path.read_text())
        if "torch" not in d:  # not bench/gpu.py's: gpu_entrypoint.json (2026-11-28, a script since folded into gpu.py) has its own .md
            continue
        text = render(d)
        path.with_suffix(".md").write_text(text)
        print(text)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="*", help="gpu.json files (default: every bench/results/gpu_*.json)")
    main(parser.parse_args().paths)
