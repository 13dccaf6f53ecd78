"""Config validation: the schema's messages name the key; the resolver adds what a schema cannot say."""

import copy
from pathlib import Path

import pytest
import yaml
from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from mnistflow.config import RECIPE, ConfigError, resolve_run, resolve_runs

REPO = Path(__file__).resolve().parents[1]
SCHEMA = str(REPO / "workflow/schemas/config.schema.yaml")


def load(path="config/config.yaml"):
    return yaml.safe_load((REPO / path).read_text())


def test_shipped_configs_are_valid():
    for path in ("config/config.yaml", ".test/config/config.yaml"):
        config = load(path)
        validate(config, SCHEMA)
        assert set(resolve_runs(config)) == {"single", "multinode"}


def test_defaults_are_filled():
    config = {"runs": {"a": {}}}
    validate(config, SCHEMA)
    assert config["dataset"]["name"] == "mnist" and config["dataset"]["mirrors"] == []
    assert config["evaluate"]["batch_size"] == 100


def test_cpus_and_memory_per_process_default_and_override():
    from mnistflow.config import RUNTIME

    run = resolve_run({"train": {"mem_mb_per_process": 8000}, "runs": {"a": {"cpus_per_process": 8}}}, "a")
    assert run["cpus_per_process"] == 8 and run["mem_mb_per_process"] == 8000
    assert {k: resolve_run({"runs": {"a": {}}}, "a")[k] for k in RUNTIME} == RUNTIME


def test_each_default_has_one_source():
    """Run settings: mnistflow.config.RECIPE, which the model's and the DataModule's signatures
    take theirs from. Dataset and evaluation settings: the schema (validate() fills them in),
    which the shipped config, the DataModule and evaluation's entry point agree with."""
    import inspect

    from mnistflow.datamodule import MNISTDataModule
    from mnistflow.evaluate import EVAL_BATCH
    from mnistflow.model import MNISTClassifier

    model = inspect.signature(MNISTClassifier).parameters
    assert {k: model[k].default for k in ("model", "optimizer", "lr", "weight_decay", "schedule")} == {
        k: RECIPE[k] for k in ("model", "optimizer", "lr", "weight_decay", "schedule")}
    data = inspect.signature(MNISTDataModule).parameters
    schema = yaml.safe_load(Path(SCHEMA).read_text())["properties"]
    filled = {}
    validate(filled, SCHEMA)
    assert data["batch_size"].default == RECIPE["batch_size"] and data["seed"].default == RECIPE["seed"]
    assert data["val_size"].default == schema["dataset"]["properties"]["val_size"]["default"] == filled["dataset"]["val_size"]
    assert data["eval_batch_size"].default == EVAL_BATCH == filled["evaluate"]["batch_size"]
    shipped = load()
    assert shipped["dataset"]["val_size"] == filled["dataset"]["val_size"]
    assert shipped["evaluate"]["batch_size"] == filled["evaluate"]["batch_size"]


def test_recipe_defaults_match_the_shipped_config():
    shipped = load()["train"]
    assert {k: RECIPE[k] for k in shipped} == shipped


@pytest.mark.parametrize("patch, needle", [
    ({"train": {"batch_size": "64"}}, "'64' is not of type 'integer'"),
    ({"train": {"batch_size": 0}}, "0 is less than the minimum of 1"),
    ({"train": {"epochs": -1}}, "-1 is less than the minimum of 1"),
    ({"train": {"model": "resnet"}}, "'resnet' is not one of ['fast_cnn', 'cnn', 'mlp']"),
    ({"dataset": {"name": "mnsit"}}, "'mnsit' is not one of ['mnist', 'fashion_mnist']"),
    ({"dataset": {"bogus": 1}}, "Additional properties are not allowed ('bogus' was unexpected)"),
    ({"runs": {"single": {"nodes": 0}}}, "0 is less than the minimum of 1"),
    ({"runs": {"x; rm -rf ~": {}}}, "does not match"),
    ({"runs": {"../escape": {}}}, "does not match"),
    ({"dataset": {"mirrors": ["http://x/$(reboot)"]}}, "does not match"),
    ({"dataset": {"md5": {"train-images-idx3-ubyte.gz": "xyz"}}}, "does not match"),
])
def test_schema_errors_name_the_problem(patch, needle):
    config = copy.deepcopy(load())
    for section, values in patch.items():
        config.setdefault(section, {}).update(values)
    with pytest.raises(WorkflowError) as err:
        validate(config, SCHEMA)
    assert needle in str(err.value)


def test_run_overrides_train_overrides_recipe():
    config = {"train": {"lr": 0.01, "epochs": 2}, "runs": {"a": {"lr": 0.5}, "b": {}}}
    assert resolve_run(config, "a")["lr"] == 0.5 and resolve_run(config, "a")["epochs"] == 2
    assert resolve_run(config, "b")["lr"] == 0.01 and resolve_run(config, "b")["model"] == RECIPE["model"]


def test_batch_must_divide_across_ddp_processes():
    config = {"runs": {"wide": {"nodes": 3, "devices": 1, "batch_size": 128}}}
    with pytest.raises(ConfigError, match=r"runs.wide.batch_size: 128 does not divide across nodes x devices = 3"):
        resolve_run(config, "wide")


def test_unsafe_run_name_rejected_by_resolver_too():
    with pytest.raises(ConfigError, match="runs.a b: a run name must match"):
        resolve_run({"runs": {"a b": {}}}, "a b")


def test_impossible_geometry_names_the_run():
    with pytest.raises(ConfigError, match=r"runs.x.nodes: 0 is not an integer >= 1"):
        resolve_run({"runs": {"x": {"nodes": 0}}}, "x")


def test_sweep_expands_into_readable_stable_names():
    config = {"sweeps": {"lrs": {"settings": {"epochs": 2}, "grid": {"lr": [0.001, 0.003], "batch_size": [64, 128]}}}}
    runs = resolve_runs(config)
    assert list(runs) == [
        "lrs_lr-0.001_batch_size-64", "lrs_lr-0.001_batch_size-128",
        "lrs_lr-0.003_batch_size-64", "lrs_lr-0.003_batch_size-128",
    ]
    assert runs["lrs_lr-0.003_batch_size-64"]["lr"] == 0.003 and runs["lrs_lr-0.003_batch_size-64"]["epochs"] == 2
    # adding a grid point keeps every existing name
    config["sweeps"]["lrs"]["grid"]["lr"].append(0.01)
    assert set(runs) < set(resolve_runs(config))


def test_sweep_name_clash_and_geometry_checked():
    with pytest.raises(ConfigError, match="also appear under runs"):
        resolve_runs({"runs": {"s_seed-1": {}}, "sweeps": {"s": {"grid": {"seed": [1]}}}})
    with pytest.raises(ConfigError, match=r"runs.g_nodes-3.batch_size: 64 does not divide"):
        resolve_runs({"sweeps": {"g": {"settings": {"batch_size": 64}, "grid": {"nodes": [1, 3]}}}})


def test_no_runs_at_all():
    with pytest.raises(ConfigError, match="no runs configured"):
        resolve_runs({})
