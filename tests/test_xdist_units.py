"""`make test`'s two workers: the Slurm modules' tests all on one worker, first, and each other
module's tests on one worker (tests/xdist_units.py), checked on a small tree of its own."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Each test notes its worker and, per worker, its place in that worker's order.
TEST = '''
import os
from pathlib import Path

def test_{name}():
    worker = os.environ["PYTEST_XDIST_WORKER"]
    log = Path(os.environ["UNITS_LOG"]) / worker
    with log.open("a") as f:
        f.write("{module}\\n")
'''


def test_slurm_modules_share_one_worker_and_come_first(tmp_path):
    tree, log = tmp_path / "tree", tmp_path / "log"
    tree.mkdir(), log.mkdir()
    modules = {"test_alpha": 3, "test_slurm_cluster": 2, "test_beta": 3, "test_slurm_workflow": 2, "test_gamma": 2}
    for module, count in modules.items():
        (tree / f"{module}.py").write_text("".join(TEST.format(name=f"{module}_{i}", module=module) for i in range(count)))
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-n", "2", "-p", "tests.xdist_units", "-p", "no:cacheprovider", "-q", str(tree)],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO), "UNITS_LOG": str(log)},
    )
    assert run.returncode == 0, run.stdout + run.stderr
    order = {worker.name: worker.read_text().split() for worker in log.iterdir()}
    assert sum(len(ran) for ran in order.values()) == sum(modules.values())
    for module, count in modules.items():
        on = [worker for worker, ran in order.items() if module in ran]
        assert len(on) == 1 and order[on[0]].count(module) == count, (module, order)
    [slurm_worker] = {w for w, ran in order.items() if "test_slurm_cluster" in ran}
    assert set(order[slurm_worker][:4]) == {"test_slurm_cluster", "test_slurm_workflow"}, order
