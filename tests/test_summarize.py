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
