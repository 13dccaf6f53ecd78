"""The training entry point itself: reproducible, records its provenance, fails fast on a wrong launch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from mnistflow.config import RECIPE
from mnistflow.data import prepare
from mnistflow.train import folder_args
from tests.conftest import REPO


@pytest.fixture(scope="module")
def train_npz(mirror, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared")
    prepare(mirror.directory, out / "train.npz", out / "test.npz")
    return out / "train.npz"


def train(train_npz, out, env_extra=None, args=(), **settings):
    run = {**RECIPE, "name": "t", **settings}
    cmd = [sys.executable, "-m", "mnistflow.train", "--run", "t", "--params", json.dumps(run),
           "--train-data", str(train_npz), *folder_args(out), "--val-size", "200", "--train-limit", "1200", "--threads", "2", *args]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), **(env_extra or {})}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def test_same_inputs_and_seed_give_the_same_weights_and_metrics(train_npz, tmp_path):
    """Also whatever malloc does: the second run is under the environment's own malloc setting,
    which the entry point leaves alone, where the first has its own (keep_freed_memory, for
    speed only)."""
    import torch

    records = []
    for attempt, env in (("a", None), ("b", {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=131072"})):
        result = train(train_npz, tmp_path / attempt, env_extra=env, seed=3)
        assert result.returncode == 0, result.stderr[-3000:]
        records.append(json.loads((tmp_path / attempt / "train.json").read_text()))
    assert [r["malloc_keeps_freed_memory"] for r in records] == [True, False]
    assert records[0]["final"] == records[1]["final"]
    assert (tmp_path / "a" / "metrics.csv").read_text() == (tmp_path / "b" / "metrics.csv").read_text()
    weights = [torch.load(tmp_path / attempt / "model.ckpt", weights_only=False)["state_dict"] for attempt in ("a", "b")]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    other = train(train_npz, tmp_path / "c", seed=4)
    assert other.returncode == 0
    assert json.loads((tmp_path / "c" / "train.json").read_text())["final"] != records[0]["final"]


def test_train_json_records_provenance(train_npz, tmp_path):
    env_record = tmp_path / "env.json"
    env_record.write_text(json.dumps({"python": "3.x", "packages": {"torch": "x"}}))
    run = {**RECIPE, "name": "t", "model": "mlp"}
    cmd = [sys.executable, "-m", "mnistflow.train", "--run", "t", "--params", json.dumps(run), "--train-data", str(train_npz),
           *folder_args(tmp_path / "p"), "--val-size", "200", "--train-limit", "600", "--threads", "1", "--env-record", str(env_record)]
    started = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO / "src")}, timeout=300)
    wall_s = time.perf_counter() - started
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((tmp_path / "p" / "train.json").read_text())
    prov = record["provenance"]
    from mnistflow.codedigest import code_digest

    assert prov["code_digest"] == code_digest("mnistflow.train")
    assert prov["environment"] == {"python": "3.x", "packages": {"torch": "x"}}
    assert prov["git_commit"] is None or len(prov["git_commit"]) == 40
    assert record["settings"]["seed"] == RECIPE["seed"] and record["started"] <= record["finished"]
    assert record["attempts"][-1]["outcome"] == "finished"
    assert record["accelerator"] == "CPUAccelerator" and record["device"]  # the CPU's model name here
    # where the process's time went, its parts within the whole
    timings = record["process_s"]
    assert set(timings) == {"start_to_train", "imports", "setup", "fit", "outputs"}
    assert all(v >= 0 for v in timings.values()) and timings["imports"] > 0.2 and timings["fit"] > 0
    assert timings["fit"] == record["attempts"][-1]["fit_s"]
    assert sum(timings.values()) < wall_s


def test_multinode_run_started_as_one_process_in_a_wrong_allocation_fails_fast(train_npz, tmp_path):
    # Inside an allocation of 1 node x 1 task, a 2-node run must not wait for ranks that never come.
    env = {"SLURM_JOB_ID": "1", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "1", "SLURM_NNODES": "1", "MNISTFLOW_LAUNCHED": "1"}
    result = train(train_npz, tmp_path / "w", env_extra=env, nodes=2)
    assert result.returncode == 2
    assert "SLURM_NNODES=1 but nodes=2" in result.stderr and "the run asked for 2 node(s)" in result.stderr


def test_progress_within_long_epochs_every_interval(train_npz, tmp_path):
    """--progress-every-s (the progress_every_s resource): lines within an epoch too, with the
    batch, the step's loss and the time left; only the CSV logger when TensorBoard is not asked for."""
    import re

    result = train(train_npz, tmp_path, args=("--progress-every-s", "0.05", "--loggers", "csv", "--log-every-n-steps", "3"),
                   epochs=2, model="cnn")
    assert result.returncode == 0, result.stderr[-3000:]
    within = re.findall(r"epoch ([12])/2 batch (\d+)/8 \(step (\d+)\): train_loss ([\d.]+); \d+ samples/s; "
                        r"elapsed \d+:\d\d:\d\d, about \d+:\d\d:\d\d left", result.stderr)
    assert within and {epoch for epoch, _, _, _ in within} == {"1", "2"}, result.stderr[-3000:]
    assert all(int(step) == (int(epoch) - 1) * 8 + int(batch) for epoch, batch, step, _ in within)
    # each line's loss is its own step's: where metrics.csv logged the step (every 3), they agree
    import csv

    with open(tmp_path / "metrics.csv") as fh:
        logged = {int(r["step"]) + 1: float(r["train_loss_step"]) for r in csv.DictReader(fh) if r["train_loss_step"]}
    shown = {int(step): float(loss) for _, _, step, loss in within}
    assert set(logged) & set(shown), (logged, shown)
    assert all(abs(shown[step] - logged[step]) < 1e-4 for step in set(logged) & set(shown)), (logged, shown)
    assert len(set(shown.values())) > len(shown) // 2, shown  # not one stale value repeated
    assert len(re.findall(r"epoch [12]/2 done", result.stderr)) == 2
    assert not list(tmp_path.rglob("events.out.tfevents.*"))


def test_how_often_the_step_loss_is_logged_changes_what_is_logged_not_what_is_trained(train_npz, tmp_path):
    """--log-every-n-steps (the run setting log_every_n_steps, 50 by default, for speed): the
    loggers take the step loss at every n-th step and at no other; the weights and the
    validation figures are the same whatever n is."""
    import csv

    import torch

    logged = {}
    for every in (3, None):
        result = train(train_npz, tmp_path / str(every), args=("--log-every-n-steps", str(every)) if every else (),
                       model="mlp", epochs=2)
        assert result.returncode == 0, result.stderr[-3000:]
        with open(tmp_path / str(every) / "metrics.csv") as fh:
            logged[every] = [int(r["step"]) + 1 for r in csv.DictReader(fh) if r.get("train_loss_step")]
    assert logged == {3: [3, 6, 9, 12, 15], None: []}  # 16 steps: under the default's 50, none
    records = [json.loads((tmp_path / str(every) / "train.json").read_text()) for every in (3, None)]
    assert [r["global_step"] for r in records] == [16, 16]
    validation = [{k: v for k, v in r["final"].items() if k.startswith("val_")} for r in records]
    assert validation[0] == validation[1] and validation[0]
    weights = [torch.load(tmp_path / str(every) / "model.ckpt", weights_only=False)["state_dict"] for every in (3, None)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def train_with_site_hook(train_npz, tmp_path, sitecustomize: str) -> int:
    """A 64-step run with `sitecustomize` run first in the training process; its step count."""
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(sitecustomize)
    env = {"PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{hooks}"}
    result = train(train_npz, tmp_path / "run", env_extra=env, args=("--loggers", "csv"), model="mlp", batch_size=32, epochs=2)
    assert result.returncode == 0, result.stderr[-3000:]
    steps = json.loads((tmp_path / "run" / "train.json").read_text())["global_step"]
    assert steps == 2 * -(-1000 // 32)
    return steps


def test_optimizer_steps_do_not_probe_nvml(train_npz, tmp_path):
    """Lightning's import turns on torch's NVML-based CUDA check, which AdamW's every step then
    pays by loading NVML (plain_cuda_check); the entry point turns it off, so the number of
    loads does not grow with the steps. Counted by an audit hook on ctypes' dlopen."""
    loads = tmp_path / "nvml-loads"
    steps = train_with_site_hook(train_npz, tmp_path, (
        "import sys\n"
        "def count(event, args):\n"
        "    if event == 'ctypes.dlopen' and 'nvidia-ml' in str(args[0]):\n"
        f"        with open({str(loads)!r}, 'a') as f: f.write('load\\n')\n"
        "sys.addaudithook(count)\n"
    ))
    counted = len(loads.read_text().splitlines()) if loads.exists() else 0
    assert counted < 10, f"NVML loaded {counted} times in {steps} steps"


def test_hook_calls_make_no_context_manager_each(train_npz, tmp_path):
    """Lightning wraps every hook call in `trainer.profiler.profile(name)`, about fifty a step.
    The entry point's profiler (callbacks.NoProfiler) hands back one shared context, not the
    generator-based one Lightning's default makes at every call: counted over a run by
    wrapping that default, which a default Trainer calls some 3,300 times in these steps."""
    calls = tmp_path / "profile-calls"
    train_with_site_hook(train_npz, tmp_path, (
        "from pytorch_lightning.profilers.profiler import Profiler\n"
        "made = Profiler.profile\n"
        "count = [0]\n"
        "def counted(self, name):\n"
        "    count[0] += 1\n"
        f"    if count[0] % 100 == 0: open({str(calls)!r}, 'w').write(str(count[0]))\n"
        "    return made(self, name)\n"
        "Profiler.profile = counted\n"
    ))
    made = int(calls.read_text()) if calls.exists() else 0
    assert made < 100, f"{made} profiling contexts made"


def test_git_state_is_none_without_a_commit(tmp_path):
    """A checkout with no commit yet (a copied working tree under `git init`) records no commit,
    not git's "HEAD"; a commit is recorded with whether tracked files differ from it."""
    from mnistflow.train import git_state

    def git(*args):
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)

    assert git_state(tmp_path) == (None, None)  # not a checkout
    git("init", "-q")
    (tmp_path / "f.txt").write_text("a\n")
    assert git_state(tmp_path) == (None, None)
    git("add", "f.txt")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "c")
    commit, dirty = git_state(tmp_path)
    assert len(commit) == 40 and int(commit, 16) >= 0 and dirty is False
    (tmp_path / "f.txt").write_text("b\n")
    assert git_state(tmp_path) == (commit, True)
