"""`make test`'s two workers: the Slurm modules' tests all on one worker, first, then the modules
with the most end-to-end tests, each module's tests on one worker (tests/xdist_units.py), checked
on a small tree of its own; and a test cluster that fails to start in the controlling process
(tests/cluster/fixtures.py) errors the Slurm tests alone."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.cluster.fixtures import WORKERS_ENV

REPO = Path(__file__).resolve().parents[1]

# Each test appends its module's name to its worker's log.
TEST = '''
@pytest.mark.{mark}
def test_{name}():
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    with (Path(os.environ["UNITS_LOG"]) / worker).open("a") as f:
        f.write("{module}\\n")
'''
# module: (tests, their mark); in collection (alphabetical) order
MODULES = {
    "test_alpha": (3, "unit"),
    "test_beta": (2, "workflow"),
    "test_gamma": (3, "rerun"),
    "test_slurm_cluster": (2, "slurm"),
    "test_slurm_workflow": (2, "slurm"),
}


def run_pytest(tmp_path, *args):
    tree, log = tmp_path / "tree", tmp_path / "log"
    tree.mkdir(exist_ok=True), log.mkdir(exist_ok=True)
    marks = sorted({mark for _, mark in MODULES.values()})
    (tree / "pytest.ini").write_text("[pytest]\nmarkers =\n" + "".join(f"    {mark}: -\n" for mark in marks))
    for module, (count, mark) in MODULES.items():
        body = "".join(TEST.format(mark=mark, name=f"{module}_{i}", module=module) for i in range(count))
        (tree / f"{module}.py").write_text(f"import os\nfrom pathlib import Path\nimport pytest\n{body}")
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "tests.xdist_units", "-p", "no:cacheprovider", "-q", *args, str(tree)],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO), "UNITS_LOG": str(log)},
    )
    assert run.returncode == 0, run.stdout + run.stderr
    return {worker.name: worker.read_text().split() for worker in log.iterdir()}


def test_slurm_first_then_the_modules_with_the_most_end_to_end_tests(tmp_path):
    [ran] = run_pytest(tmp_path).values()  # one process: the order the workers are sent units in
    modules = list(dict.fromkeys(ran))
    assert modules == ["test_slurm_cluster", "test_slurm_workflow", "test_gamma", "test_beta", "test_alpha"], ran


def test_slurm_modules_share_one_worker_and_each_module_runs_on_one(tmp_path):
    order = run_pytest(tmp_path, "-n", "2")
    assert sum(len(ran) for ran in order.values()) == sum(count for count, _ in MODULES.values())
    for module, (count, _) in MODULES.items():
        on = [worker for worker, ran in order.items() if module in ran]
        assert len(on) == 1 and order[on[0]].count(module) == count, (module, order)
    [slurm_worker] = {w for w, ran in order.items() if "test_slurm_cluster" in ran}
    assert set(order[slurm_worker][:4]) == {"test_slurm_cluster", "test_slurm_workflow"}, order


# A cluster whose start fails in the controlling process: SlurmCluster's start raises, and its
# stop touches nothing (this session's own cluster may be running).
FAILING_START = '''
from tests.cluster import fixtures

def start_or_reason(self):
    raise fixtures.SlurmStartError("slurmctld exited; its log ends: fatal: no partition")

fixtures.SlurmCluster.start_or_reason = start_or_reason
fixtures.SlurmCluster.stop = lambda self, stop_services=True: []
'''
ON_THE_CLUSTER = '''
def test_on_the_cluster(slurm_cluster):
    pass
'''


def test_a_cluster_that_fails_to_start_errors_the_slurm_tests_and_the_others_run(tmp_path):
    (tmp_path / "conftest.py").write_text(FAILING_START)
    (tmp_path / "test_slurm_one.py").write_text(ON_THE_CLUSTER)
    (tmp_path / "test_alpha.py").write_text("def test_alpha():\n    pass\n")
    env = {key: value for key, value in os.environ.items() if key != WORKERS_ENV}  # not this session's cluster
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "tests.cluster.fixtures", "-p", "tests.xdist_units",
         "-p", "no:cacheprovider", "-q", "-n", "2", str(tmp_path)],
        cwd=tmp_path, capture_output=True, text=True, timeout=120, env={**env, "PYTHONPATH": str(REPO)},
    )
    out = run.stdout + run.stderr
    assert run.returncode == 1 and "1 passed, 1 error" in out, out
    assert "ERROR" in out and "test_on_the_cluster" in out and "fatal: no partition" in out, out
