"""From the validated config to one resolved settings dict per run.

The JSON schema (workflow/schemas/config.schema.yaml) checks types, ranges and names;
this module adds what a schema cannot say (a global batch that divides across DDP
processes) and merges each run over the shared defaults. It imports nothing heavy:
the Snakefile calls it at parse time.
"""

from __future__ import annotations

import re
from typing import Mapping

from .geometry import Geometry

# The default recipe. Why these values: the PyTorch examples' recipe (Adadelta lr 1.0,
# StepLR x0.7, batch 64) needs 3-5 epochs to reach 99% on MNIST; a one-cycle schedule
# with AdamW at batch 128 gets there in one epoch (bench/results/time_to_accuracy.json),
# and a batch of 128 keeps the CPU's GEMMs efficient without starving the schedule of steps.
RECIPE = {
    "model": "cnn",
    "optimizer": "adamw",
    "lr": 0.003,
    "weight_decay": 0.0001,
    "schedule": "onecycle",
    "batch_size": 128,
    "epochs": 1,
    "seed": 42,
    "precision": "32-true",
    "accelerator": "auto",
    "nodes": 1,
    "devices": 1,
}

RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


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
    run = {**RECIPE, **(config.get("train") or {}), **(runs[name] or {})}
    unknown = sorted(set(run) - set(RECIPE))
    if unknown:
        raise ConfigError(f"runs.{name}: unknown key(s) {unknown}; allowed: {sorted(RECIPE)}")
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


def resolve_runs(config: Mapping) -> dict[str, dict]:
    return {name: resolve_run(config, name) for name in config.get("runs") or {}}
