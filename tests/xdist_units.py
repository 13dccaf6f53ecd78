"""How `make test`'s two pytest-xdist workers share the tests (hooks that tests/conftest.py takes in).

A work unit is a module, so that each module fixture runs once, and all the Slurm tests
(tests/test_slurm_*.py) are one unit, sent first: they share the test cluster's nodes, and they
wait on Slurm's and the plugin's polling more than they compute, while the other worker runs
the rest. The other modules follow, those with the most end-to-end tests first (they run
Snakemake or the benchmarks, and take most of the time), so that both workers end together on
the modules of unit tests rather than one idling while the other runs a long module sent last.
(xdist's own `--dist loadgroup` would take `xdist_group` marks, but xdist 3.8.0 renames the
tests through an attribute pytest 9.2 no longer reads, and ignores them.)
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

# The marks (pyproject.toml) of tests that run Snakemake or the benchmarks: slow ones.
END_TO_END = {"workflow", "rerun", "faults", "conda", "bench"}


def module_of(nodeid: str) -> str:
    return nodeid.split("::")[0]


def on_slurm(nodeid: str) -> bool:
    """A test of the Slurm modules, the only ones that submit to the test cluster."""
    return Path(module_of(nodeid)).name.startswith("test_slurm_")


def pytest_collection_modifyitems(items):
    end_to_end = Counter(
        module_of(item.nodeid) for item in items if END_TO_END & {mark.name for mark in item.iter_markers()}
    )
    # The key is the same for all of a module's tests, and the sort is stable: each module's
    # tests stay together, in their order.
    items.sort(key=lambda item: (not on_slurm(item.nodeid), -end_to_end[module_of(item.nodeid)]))


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling

    class ModulesAndSlurm(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return "slurm" if on_slurm(nodeid) else module_of(nodeid)

    config.option.loadscopereorder = False  # keep the order above: the Slurm unit, then the longest
    return ModulesAndSlurm(config, log)
