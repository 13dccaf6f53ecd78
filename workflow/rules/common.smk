import json
import os
import re
import sys

from snakemake.exceptions import WorkflowError

# Rules run `python -m mnistflow.<step>`: make the package importable here and in every
# job's environment (the .venv, a conda env, a Slurm job) without installing it there.
# It replaces any PYTHONPATH of the caller, so a job never mixes in another environment's packages.
SRC = os.path.join(workflow.basedir, "src")
sys.path.insert(0, SRC)
os.environ.update(PYTHONPATH=SRC)

from mnistflow.config import ConfigError, resolve_runs
from mnistflow.data import FILES, MIRRORS_ENV
from mnistflow.geometry import Geometry

try:
    RUNS = resolve_runs(config)
except ConfigError as err:
    raise WorkflowError(f"config: {err}") from None

DATA = f"results/data/{config['dataset']['name']}"
# Not a param of the download rule: a changed mirror list with unchanged checksums must
# not make Snakemake redo the download and everything after it.
os.environ[MIRRORS_ENV] = json.dumps(config["dataset"]["mirrors"])


def geometry(wildcards):
    return Geometry.from_run(RUNS[wildcards.run])


def run_settings(wildcards):
    return json.dumps(RUNS[wildcards.run], sort_keys=True)


def runs_where(distributed):
    """A wildcard regex matching exactly the runs of one kind, so each run has one training rule."""
    names = [
        n for n, r in RUNS.items() if Geometry.from_run(r).distributed == distributed
    ]
    return "|".join(map(re.escape, names)) if names else "(?!)"


def slurm_resource(name, default=None):
    """A rule resource computed from the run's geometry (see mnistflow.geometry)."""
    return lambda wildcards: geometry(wildcards).slurm_resources().get(name, default)


def directory_of(path_or_list):
    """The folder of a rule's first input or output file, for entry points that take a folder."""
    first = path_or_list if isinstance(path_or_list, str) else path_or_list[0]
    return os.path.dirname(first)
