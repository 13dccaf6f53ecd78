"""The code digest follows exactly the modules an entry point runs."""

import shutil

import pytest

from mnistflow import codedigest


def test_closures_follow_imports():
    train = codedigest.closure("mnistflow.train")
    assert {"mnistflow.train", "mnistflow.model", "mnistflow.datamodule", "mnistflow.data", "mnistflow.geometry", "mnistflow.launch"} <= set(train)
    assert "mnistflow.evaluate" not in train and "mnistflow.summarize" not in train and "mnistflow.offline" not in train
    evaluate = codedigest.closure("mnistflow.evaluate")
    assert "mnistflow.networks" in evaluate and "mnistflow.train" not in evaluate
    assert "mnistflow.model" not in evaluate and "mnistflow.datamodule" not in evaluate  # no Lightning import


@pytest.fixture
def package_copy(tmp_path, monkeypatch):
    copy = tmp_path / "mnistflow"
    shutil.copytree(codedigest.ROOT, copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(codedigest, "ROOT", copy)
    codedigest.code_digest.cache_clear()
    yield copy
    codedigest.code_digest.cache_clear()


def test_digest_changes_only_for_code_the_entry_runs(package_copy):
    before = {e: codedigest.code_digest(e) for e in ("mnistflow.train", "mnistflow.evaluate", "mnistflow.summarize")}
    with open(package_copy / "model.py", "a") as fh:
        fh.write("\n# a change to the training module\n")
    codedigest.code_digest.cache_clear()
    after = {e: codedigest.code_digest(e) for e in before}
    assert after["mnistflow.train"] != before["mnistflow.train"]
    assert after == {**before, "mnistflow.train": after["mnistflow.train"]}
    with open(package_copy / "networks.py", "a") as fh:
        fh.write("\n# a change to the network both training and evaluation build\n")
    codedigest.code_digest.cache_clear()
    again = {e: codedigest.code_digest(e) for e in before}
    assert again["mnistflow.train"] != after["mnistflow.train"] and again["mnistflow.evaluate"] != after["mnistflow.evaluate"]
    assert again["mnistflow.summarize"] == before["mnistflow.summarize"]
    after = again
    with open(package_copy / "offline.py", "a") as fh:
        fh.write("\n# used by no rule's entry point\n")
    codedigest.code_digest.cache_clear()
    assert {e: codedigest.code_digest(e) for e in before} == after
