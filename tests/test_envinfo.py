"""The environment record: package versions and host facts, without importing torch."""

import json
import os
import subprocess
import sys

from mnistflow import envinfo
from tests.conftest import REPO


def test_record_names_the_packages_training_imports_and_only_those():
    record = envinfo.record()
    assert set(record["packages"]) == {"numpy", "pytorch-lightning", "torch", "torchmetrics"}, record["packages"]
    assert all(record["packages"].values())
    assert record["python"].count(".") == 2 and record["cpu_count"] >= 1


def test_each_entry_point_names_the_packages_it_imports():
    assert set(envinfo.versions_imported_by("mnistflow.evaluate")) == {"matplotlib", "numpy", "torch"}
    assert set(envinfo.versions_imported_by("mnistflow.summarize")) == {"matplotlib"}
    assert set(envinfo.versions_imported_by("mnistflow.data")) == {"numpy", "torch"}


def test_missing_package_is_recorded_as_none():
    assert envinfo.package_versions(("no-such-package-mnistflow",)) == {"no-such-package-mnistflow": None}


def test_entry_point_writes_the_record_without_importing_torch(tmp_path):
    out = tmp_path / "env.json"
    code = ("import sys; from mnistflow.envinfo import main; "
            f"main(['--out', {str(out)!r}]); print('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            env={**os.environ, "PYTHONPATH": str(REPO / "src"), "LOADEDMODULES": "cuda/12:gcc/13"})
    assert result.stdout.strip() == "False"
    record = json.loads(out.read_text())
    assert record["modules"] == ["cuda/12", "gcc/13"] and record["executable"] == sys.executable
