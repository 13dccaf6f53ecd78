import ast
import json
import os
import re
import shlex
import subprocess
import sys

from snakemake.exceptions import WorkflowError
from snakemake.logging import logger

# The package, importable here at parse time; every job gets it on PYTHONPATH through the
# shell prefix at the end of this file (the .venv, a conda env, a Slurm job), without
# installing it there.
SRC = os.path.join(workflow.basedir, "src")
sys.path.insert(0, SRC)

from mnistflow.codedigest import code_digest
from mnistflow.config import RUNTIME, ConfigError, resolve_runs
from mnistflow.data import DOWNLOAD_ENV, FILES
from mnistflow.envinfo import versions_imported_by
from mnistflow.geometry import Geometry, GeometryError, PartitionNodes

try:
    RUNS = resolve_runs(config)
except ConfigError as err:
    raise WorkflowError(f"config: {err}") from None

DATA = f"results/data/{config['dataset']['name']}"
# How to fetch (mirrors, timeout, retries) is not a param of the download rule: the files
# are fixed by their MD5s, so a new mirror must not redo the download and all after it.
os.environ[DOWNLOAD_ENV] = json.dumps(
    {key: config["dataset"][key] for key in ("mirrors", "timeout_s", "retries")}
)


def geometry(wildcards):
    return Geometry.from_run(RUNS[wildcards.run])


def run_settings(wildcards):
    """The training param: what the run computes. Its grant (RUNTIME) is in its resources."""
    run = RUNS[wildcards.run]
    return json.dumps(
        {k: v for k, v in run.items() if k not in RUNTIME}, sort_keys=True
    )


def run_value(key):
    return lambda wildcards: RUNS[wildcards.run][key]


def training_threads(wildcards):
    """All the run's processes' CPUs: what a local run takes of --cores (Snakemake gives it
    at most that)."""
    return geometry(wildcards).world_size * RUNS[wildcards.run]["cpus_per_process"]


def ddp_mem_mb_per_cpu(wildcards):
    run = RUNS[wildcards.run]
    return -(-run["mem_mb_per_process"] // run["cpus_per_process"])


def runs_where(distributed):
    """A wildcard regex matching exactly the runs of one kind, so each run has one training rule."""
    names = [
        n for n, r in RUNS.items() if Geometry.from_run(r).distributed == distributed
    ]
    return "|".join(map(re.escape, names)) if names else "(?!)"


def slurm_resource(name, default=None):
    """A rule resource computed from the run's geometry (see mnistflow.geometry)."""
    return lambda wildcards: geometry(wildcards).slurm_resources().get(name, default)


def submits_to_slurm():
    """A real run with --executor slurm (a dry run has no executor plugin)."""
    return (
        workflow.executor_plugin is not None
        and workflow.executor_plugin.name == "slurm"
    )


def refuse_runs_no_partition_holds(jobs):
    """Before a Slurm run submits anything: every training job's geometry fits its partition.

    Slurm accepts a job no node can hold and leaves it pending (PartitionConfig) while
    Snakemake waits. A dry run does not ask Slurm, so this runs at the start of a real one.
    """
    if not submits_to_slurm():
        return
    partitions = {}
    for job in jobs:
        if job.rule.name not in ("train", "train_ddp"):
            continue
        partition = job.resources.get("slurm_partition") or None
        try:
            if partition not in partitions:
                partitions[partition] = PartitionNodes.query(partition)
        except (OSError, subprocess.SubprocessError) as err:
            logger.warning(
                f"mnistflow: could not ask sinfo what the partition holds: {err}"
            )
            return
        except GeometryError as err:
            raise WorkflowError(f"run '{job.wildcards.run}': {err}") from None
        problem = geometry(job.wildcards).partition_problem(partitions[partition])
        if problem:
            raise WorkflowError(
                f"config: run '{job.wildcards.run}': {problem}. Nothing was submitted."
            )


# Snakemake's other spellings of mem_mb and disk_mb, and the job's temporary folder.
SNAKEMAKE_DERIVED_RESOURCES = {"mem", "mem_mib", "disk", "disk_mib", "tmpdir"}


def refuse_arrays_of_mixed_requests(jobs):
    """Before a Slurm run submits anything: each rule sent as a job array (--slurm-array-jobs)
    has one request for all its jobs.

    The plugin (2.8.0) submits a rule's ready jobs as one array with the first job's
    request, so a 2-node run in an array led by a 1-node run would get one node. Runs of
    one geometry and grant (a sweep of hyperparameters) share a request; runs of different
    requests in one rule do not.
    """
    if not submits_to_slurm():
        return
    selected = getattr(workflow.executor_settings, "array_jobs", None) or ""
    selected = {name.strip() for name in selected.replace(";", ",").split(",")}
    requests = {}
    for job in jobs:
        if (
            job.is_local
            or job.group is not None
            or not ({"all", job.rule.name} & selected)
        ):
            continue
        request = tuple(
            sorted(
                (k, str(v))
                for k, v in job.resources.items()
                if k not in SNAKEMAKE_DERIVED_RESOURCES
            )
        )
        requests.setdefault(job.rule.name, {}).setdefault(request, []).append(
            job.wildcards.get("run", str(job))
        )
    for rule, by_request in requests.items():
        if len(by_request) > 1:
            asked = [dict(request) for request in by_request]
            keys = sorted(
                k for k in set().union(*asked) if len({a.get(k) for a in asked}) > 1
            )
            groups = "; ".join(
                sorted(", ".join(sorted(r)) for r in by_request.values())
            )
            raise WorkflowError(
                f"--slurm-array-jobs: the {rule} jobs to submit ask Slurm for different"
                f" {', '.join(keys)} ({groups}), and the plugin gives every job of an array the"
                " first job's request. Submit them separately (--slurm-array-jobs=none),"
                " or one request at a time (targets of one geometry). Nothing was submitted."
            )


PREEMPTION_SIGNAL = "--signal=USR1@90"


def slurm_extra_with(flags):
    """A rule's slurm_extra: its own flags, then those given every rule as
    `--default-resources slurm_extra=...` (a rule's own resource would replace them)."""
    defaults = workflow.resource_settings.default_resources
    given = defaults.get("slurm_extra") if defaults else None
    if given is None or given.raw is None:
        return flags
    try:  # the command line's value is a Python expression, usually a quoted string
        value = ast.literal_eval(given.raw)
    except (ValueError, SyntaxError):
        value = given.raw
    return f"{flags} {value or ''}".strip()


def directory_of(path_or_list):
    """The folder of a rule's first input or output file, for entry points that take a folder."""
    first = path_or_list if isinstance(path_or_list, str) else path_or_list[0]
    return os.path.dirname(first)


# Software (config `software`; README "Conda and modules"). Every rule declares both
# `conda: software_env(...)` and `envmodules: *ENV_MODULES`; --sdm picks which applies.
SOFTWARE = config["software"]
ENV_MODULES = SOFTWARE["modules"]
ENV_FILES = {
    "torch": "train-cuda" if SOFTWARE["variant"] == "cuda" else "train",
    "report": "report",
}


def software_env(role):
    """A rule's `conda:`: the existing environment named in config, else envs/<file>.yaml.

    role: "torch" (data, environment record, training, evaluation) or "report" (no torch).
    The path is relative to workflow/rules/, where every rule file lives.
    """
    return SOFTWARE["conda_env"] or f"../../envs/{ENV_FILES[role]}.yaml"


def shell_prefix(modules, src):
    """What runs before every rule's command: inside its conda environment, after its modules.

    * Each configured module must be loaded, or the job fails. Snakemake runs
      `module purge && module load M; <command>`: a failed load is printed and the command
      runs anyway, with whatever software is on PATH. The check also fails a job that
      ran without --sdm env-modules while modules are configured.
    * The package on PYTHONPATH, for every job, in front of what is there: an environment
      module (EasyBuild's PyTorch) puts its packages on PYTHONPATH, and they must stay
      importable. (Snakemake removes an inherited PYTHONPATH from jobs in a conda env.)
    """
    check = ""
    if modules:
        check = (
            f"for _m in {' '.join(map(shlex.quote, modules))}; do"
            ' module is-loaded "$_m" || { echo "mnistflow: environment module $_m is not'
            " loaded (its 'module load' failed, or the workflow runs without --sdm"
            ' env-modules)" >&2; exit 1; }; done; '
        )
    prefix = f'{check}set -euo pipefail; export PYTHONPATH={shlex.quote(src)}"${{PYTHONPATH:+:$PYTHONPATH}}"; '
    return prefix.replace("{", "{{").replace("}", "}}")  # shell.prefix() formats it


shell.prefix(shell_prefix(ENV_MODULES, SRC))
