"""`--sdm env-modules` with a real module system: Debian's Lmod, and a modulefile that provides
the Python packages the way EasyBuild's PyTorch module does (on PYTHONPATH).

The module puts a bare Python first on PATH (the interpreter the .venv was made from, which
has no torch) and the .venv's site-packages on PYTHONPATH. Every rule's shell prefix adds
the project to PYTHONPATH; it must prepend to what the module set, not replace it, or no
job can import torch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

pytestmark = pytest.mark.workflow

LMOD_INIT = Path("/usr/share/lmod/lmod/init/bash")
MODULE = "PyTorch/2.14.1-test"
MODULEFILE = """-- A site's PyTorch module, as EasyBuild writes them: software on PATH and PYTHONPATH.
whatis("PyTorch and Lightning for the mnistflow tests")
prepend_path("PATH", "{bin}")
prepend_path("PYTHONPATH", "{site}")
"""


@pytest.fixture
def lmod(tmp_path):
    if not LMOD_INIT.exists():
        pytest.skip("Lmod is not installed (tests/cluster/install-packages.sh installs Debian's lmod)")
    bare = Path(sys.base_prefix) / "bin" / f"python{sys.version_info.major}.{sys.version_info.minor}"
    probe = subprocess.run([str(bare), "-c", "import torch"], capture_output=True, env={"PATH": "/usr/bin:/bin"})
    assert probe.returncode != 0, f"{bare} imports torch by itself: the test would prove nothing"
    bin_dir = tmp_path / "module-bin"
    bin_dir.mkdir()
    (bin_dir / "python").symlink_to(bare)
    modulepath = tmp_path / "modulefiles"
    (modulepath / "PyTorch").mkdir(parents=True)
    (modulepath / f"{MODULE}.lua").write_text(MODULEFILE.format(bin=bin_dir, site=sysconfig.get_paths()["purelib"]))
    return modulepath, bare


def test_jobs_import_from_the_modules_pythonpath_and_the_project(make_workflow, lmod):
    modulepath, bare = lmod
    wf = make_workflow("lmod", {
        "software": {"modules": [MODULE]},
        "dataset": {"train_limit": 600, "val_size": 100},
        "runs": {"lm": {"model": "mlp", "epochs": 1}},
    })
    env = {k: v for k, v in wf.env().items() if not k.startswith(("BASH_FUNC_module", "BASH_FUNC_ml", "_LMOD", "LMOD_", "__LMOD"))}
    env.pop("LOADEDMODULES", None)
    env.update(MODULEPATH=str(modulepath), BASH_ENV=str(LMOD_INIT))  # what a login shell's profile does
    wf.env = lambda: env
    wf.snakemake("results/runs/lm/eval/metrics.json", "--cores", "2", "--sdm", "env-modules")

    record = json.loads(wf.path("results/env/train_env.json").read_text())
    assert record["modules"] == [MODULE]
    assert os.path.realpath(record["executable"]) == os.path.realpath(bare)  # the module's Python ran the jobs
    assert record["packages"]["torch"]  # ... and found torch on the module's PYTHONPATH
    train = json.loads(wf.path("results/runs/lm/train.json").read_text())
    assert train["provenance"]["environment"]["modules"] == [MODULE] and train["epochs"] == 1
    assert json.loads(wf.path("results/runs/lm/eval/metrics.json").read_text())["accuracy"] > 0.5
