"""The summary's reading of sacct's figures (the figures themselves: tests/test_slurm_workflow.py)."""

import pytest

from mnistflow import summarize


@pytest.mark.parametrize("text, value", [
    ("00:00:09", 9), ("01:00:00", 3600), ("1-02:00:00", 93600), ("00:12.345", 12.345), ("02:03:04.5", 7384.5), ("", None), ("UNLIMITED", None),
])
def test_seconds(text, value):
    assert summarize.seconds(text) == value


@pytest.mark.parametrize("text, value", [("4000M", 4000), ("3.5G", 3584), ("2048K", 2), ("4000Mc", 4000), ("", None)])
def test_megabytes(text, value):
    assert summarize.megabytes(text) == value


def test_no_slurm_jobs_no_usage():
    assert summarize.slurm_usage([None, None]) == []


def test_sweep_values_name_the_runs_expand_sweeps_makes():
    from mnistflow.config import expand_sweeps, sweep_values

    config = {"sweeps": {"s": {"grid": {"lr": [0.001, 0.01], "model": ["cnn", "mlp"]}}}}
    values = sweep_values(config)["s"]
    assert values["keys"] == ["lr", "model"]
    assert set(values["values"]["lr"]) == set(values["values"]["model"]) == set(expand_sweeps(config))
    assert {run: expand_sweeps(config)[run]["lr"] for run in values["values"]["lr"]} == values["values"]["lr"]


def test_runs_page_escapes_and_names_every_attempt(tmp_path):
    train = {"run": "a<b", "device": "cpu", "attempts": [
        {"attempt": 1, "outcome": None, "slurm_job_id": "7", "slurm_array_task": "6_1"},
        {"attempt": 2, "outcome": "finished", "slurm_job_id": "8", "slurm_array_task": None}],
        "provenance": {"git_commit": "0123456789abcdef", "git_dirty": True, "code_digest": "f" * 64, "packages": {"torch": "2.14.1"}}}
    metrics = {"accuracy": 0.5, "per_class": [{"class": 0, "support": 3, "precision": 1.0, "recall": 0.5}]}
    page = summarize.to_html([{"run": "a<b", "test_accuracy": 0.5}], {"a<b": (train, metrics)})
    assert "a&lt;b" in page and "a<b" not in page
    assert "0123456789ab (dirty)" in page and "6_1, 8" in page
    assert "1: killed (never ended); 2: finished" in page and "torch 2.14.1" in page
    summarize.plot_sweeps([{"run": "a<b", "test_accuracy": 0.5}], {}, tmp_path / "sweeps.png")
    assert (tmp_path / "sweeps.png").read_bytes()[:4] == b"\x89PNG"
