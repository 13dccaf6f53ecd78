"""How `make test`'s two pytest-xdist workers share the tests (hooks that tests/conftest.py takes in).

A work unit is a module, so that each module fixture runs once, and all the Slurm tests
(tests/test_slurm_*.py) are one unit, sent first: they share the test cluster's nodes, and they
wait on Slurm's and the plugin's polling more than they compute, while the other worker runs
the rest. (xdist's own `--dist loadgroup` would take `xdist_group` marks, but xdist 3.8.0
renames the tests through an attribute pytest 9.2 no longer reads, and ignores them.)
"""

from __future__ import annotations

from pathlib import Path

import pytest


def on_slurm(nodeid: str) -> bool:
    """A test of the Slurm modules, the only ones that submit to the test cluster."""
    return Path(nodeid.split("::")[0]).name.startswith("test_slurm_")


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: not on_slurm(item.nodeid))


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling

    class ModulesAndSlurm(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return "slurm" if on_slurm(nodeid) else nodeid.split("::")[0]

    config.option.loadscopereorder = False  # keep collection order: the Slurm unit first
    return ModulesAndSlurm(config, log)
