"""Faults and bad input: every case tried for real, a clear error each time, no output lost.

Each test runs the workflow as a user would (Snakemake, local executor, real processes,
real signals, a real full file system) and injects one fault or one bad input.
docs/FAULTS.md lists every case, what the workflow does, and the test here that proves it.

Processes are only ever signalled by id: the Snakemake this test started (its process
group) or a job process found in /proc by its command line and its working directory,
which is this test's private copy of the workflow.
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import hashlib
import http.server
import json
import math
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from mnistflow import data, offline
from mnistflow.data import FILES
from tests.conftest import TEST_CONFIG, Workflow, copy_workflow
from tests.processes import background, job_processes, one_process, wait_for  # noqa: F401

pytestmark = pytest.mark.faults

PREPARED = ("results/data/mnist/train.npz", "results/data/mnist/test.npz", "results/env/train_env.json")
# A CNN on 1,300 training images: 11 steps an epoch, a few seconds each epoch on two cores,
# long enough to be interrupted mid-epoch, short enough to run three epochs twice.
SHORT = {"train_limit": 1500, "val_size": 200}
THREE_EPOCHS = {"model": "cnn", "epochs": 3, "batch_size": 128}
STEPS_PER_EPOCH = math.ceil((SHORT["train_limit"] - SHORT["val_size"]) / THREE_EPOCHS["batch_size"])
TINY = {"train_limit": 500, "val_size": 100}


# ---- fixtures -------------------------------------------------------------------------------


def fresh(root: Path, mirror_config: dict) -> Workflow:
    """A copy of the workflow with the test config and the given mirror settings; no results."""
    wf = Workflow(copy_workflow(root), [TEST_CONFIG])
    wf.write_config("mirror.yaml", mirror_config)
    return wf


@pytest.fixture(scope="module")
def base(tmp_path_factory, mirror, slurm_controller):
    """Data downloaded and prepared, environment recorded; each test trains in a copy.

    config/config.yaml holds the test config with one placeholder run (the workflow needs
    one); tests add theirs with a further --configfile.
    """
    wf = Workflow(copy_workflow(tmp_path_factory.mktemp("faults-base")), [])
    config = yaml.safe_load(wf.path(TEST_CONFIG).read_text())
    config["runs"] = {"placeholder": {"model": "mlp"}}
    wf.path("config/config.yaml").write_text(yaml.safe_dump(config))
    wf.write_config("mirror.yaml", mirror.overlay())
    wf.snakemake("--cores", "2", *PREPARED)
    return wf


@pytest.fixture
def prepared(base, tmp_path):
    """A byte- and mtime-identical copy of `base`, Snakemake's metadata included."""
    root = tmp_path / "wf"
    shutil.copytree(base.root, root, symlinks=True, copy_function=shutil.copy2)
    return Workflow(root, list(base.configfiles))


# ---- helpers --------------------------------------------------------------------------------


def fingerprint(wf: Workflow, paths) -> dict[str, tuple[str, int]]:
    return {p: (hashlib.sha256(wf.path(p).read_bytes()).hexdigest(), wf.path(p).stat().st_mtime_ns) for p in paths}


def epochs_logged(metrics_csv: Path) -> list[int]:
    """The epochs with a validation row in the CSV log, in order."""
    with open(metrics_csv, newline="") as fh:
        return [int(float(r["epoch"])) for r in csv.DictReader(fh) if r.get("val_acc")]


def load_checkpoint(path: Path) -> dict:
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


def planned_jobs(stdout: str) -> set[str]:
    """{"rule" or "rule/run"} for every job of a dry run's plan."""
    jobs = set()
    for block in re.split(r"\n(?=\[|(?:local)?rule \w+:)", stdout):
        m = re.search(r"^(?:local)?rule (\w+):", block, re.M)
        if m and m.group(1) != "all":
            w = re.search(r"^\s+wildcards: run=(\S+)", block, re.M)
            jobs.add(f"{m.group(1)}/{w.group(1)}" if w else m.group(1))
    return jobs


@contextlib.contextmanager
def tmpfs(path: Path, size: str):
    """A small tmpfs mounted on `path` (a full disk on demand); unmounted afterwards."""
    path.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True)
    if result.returncode:
        pytest.skip(f"cannot mount a tmpfs to fill (needs root with CAP_SYS_ADMIN): {result.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@contextlib.contextmanager
def broken_mirror(directory: Path, mode: str):
    """A loopback HTTP mirror that misbehaves on every file:

    stall   announces the whole file, sends half of it, then sends nothing more
    cut     announces the whole file, sends half, closes the connection; a second request
            for the same file gets all of it (a transfer that broke off once)
    silent  accepts the connection and never answers (an unreachable or overloaded host)
    """
    release = threading.Event()
    half_sent = threading.Event()
    requests: dict[str, int] = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            name = self.path.lstrip("/")
            requests[name] = requests.get(name, 0) + 1
            if mode == "silent":
                release.wait(120)
                return
            body = (directory / name).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if mode == "cut" and requests[name] > 1:
                self.wfile.write(body)
                return
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            half_sent.set()
            if mode == "stall":
                release.wait(120)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield SimpleNamespace(url=f"http://127.0.0.1:{server.server_address[1]}/", requests=requests, half_sent=half_sent)
    finally:
        release.set()
        server.shutdown()
        server.server_close()


# ---- bad input: config ----------------------------------------------------------------------

BAD_CONFIG = {
    "wrong-type": ({"train": {"batch_size": "64"}}, ["'64' is not of type 'integer'", "instance['train']['batch_size']"]),
    "zero-size": ({"train": {"epochs": 0}}, ["0 is less than the minimum of 1", "instance['train']['epochs']"]),
    "negative-size": ({"dataset": {"val_size": -5}}, ["-5 is less than the minimum of 0", "instance['dataset']['val_size']"]),
    "negative-lr": ({"runs": {"x": {"lr": -0.1}}}, ["-0.1 is less than or equal to the minimum of 0", "instance['runs']['x']['lr']"]),
    "unknown-key": ({"runs": {"x": {"epoch": 2}}}, ["Additional properties are not allowed ('epoch' was unexpected)", "instance['runs']['x']"]),
    "misspelt-dataset": ({"dataset": {"name": "mnsit"}}, ["'mnsit' is not one of ['mnist', 'fashion_mnist']", "instance['dataset']['name']"]),
    "misspelt-model": ({"runs": {"x": {"model": "resnet"}}}, ["'resnet' is not one of ['fast_cnn', 'cnn', 'mlp']", "instance['runs']['x']['model']"]),
    "nodes-below-1": ({"runs": {"x": {"nodes": 0}}}, ["0 is less than the minimum of 1", "instance['runs']['x']['nodes']"]),
    "devices-above-max": ({"runs": {"x": {"devices": 65}}}, ["65 is greater than the maximum of 64", "instance['runs']['x']['devices']"]),
    "batch-not-divisible": ({"runs": {"x": {"nodes": 2, "devices": 2, "batch_size": 6}}},
                            ["runs.x.batch_size: 6 does not divide across nodes x devices = 4 DDP processes; use a multiple of 4"]),
    "run-name-shell": ({"runs": {"x; rm -rf ~": {}}}, ["'x; rm -rf ~' does not match", "instance['runs']"]),
    "run-name-escapes": ({"runs": {"../../etc": {}}}, ["'../../etc' does not match", "instance['runs']"]),
    "mirror-shell": ({"dataset": {"mirrors": ["http://x/$(reboot)"]}}, ["does not match", "instance['dataset']['mirrors'][0]"]),
}


@pytest.mark.parametrize("case", list(BAD_CONFIG))
def test_bad_config_fails_before_any_job_naming_the_key(case, tmp_path, mirror, slurm_controller):
    patch, needles = BAD_CONFIG[case]
    wf = fresh(tmp_path / "wf", mirror.overlay())
    wf.write_config("bad.yaml", patch)
    result = wf.snakemake("--cores", "2", check=False, timeout=120)
    out = result.stdout + result.stderr
    assert result.returncode != 0, out[-3000:]
    for needle in needles:
        assert needle in out, (needle, out[-3000:])
    assert not wf.path("results").exists(), "a job ran despite the bad config"


# ---- bad input: data ------------------------------------------------------------------------


def _rewrite_idx(source: Path, dest: Path, change) -> None:
    raw = bytearray(gzip.decompress(source.read_bytes()))
    dest.write_bytes(gzip.compress(bytes(change(raw)), mtime=0))


def _bad_mirror_files(kind: str, good: Path, dest: Path) -> dict:
    """Copy the good files into `dest` with one of them broken; return the md5 config that
    makes the broken file pass the download's checksum (so prepare meets it)."""
    dest.mkdir()
    for name in FILES:
        shutil.copy(good / name, dest / name)
    images, labels = dest / FILES[0], dest / FILES[1]
    if kind == "wrong-checksum":
        return {}  # served bytes below differ from the configured (true) MD5s
    if kind == "truncated-gzip":
        images.write_bytes(images.read_bytes()[: images.stat().st_size // 2])
    elif kind == "wrong-magic":
        _rewrite_idx(good / FILES[0], images, lambda raw: b"\x12\x34" + raw[2:])
    elif kind == "wrong-dimensions":
        n = int.from_bytes(gzip.decompress((good / FILES[0]).read_bytes())[4:8], "big")
        data.write_idx(images, (n, 27, 27), bytes(n * 27 * 27))
    elif kind == "label-count":
        _rewrite_idx(good / FILES[1], labels, lambda raw: raw[:4] + (int.from_bytes(raw[4:8], "big") - 1).to_bytes(4, "big") + raw[8:-1])
    return {name: data.md5sum(dest / name) for name in FILES}


BAD_DATA = {
    # kind: (the rule that fails, what its error must say)
    "wrong-checksum": ("download", [f"could not download {FILES[0]} from any mirror", "does not match the expected"]),
    "truncated-gzip": ("prepare", [f"{FILES[0]}: cannot decompress", "truncated or not gzip"]),
    "wrong-magic": ("prepare", [f"{FILES[0]}: not an IDX file (magic number 12340803"]),
    "wrong-dimensions": ("prepare", [f"{FILES[0]}: image shape (8000, 27, 27), expected (N, 28, 28)"]),
    "label-count": ("prepare", [f"{FILES[1]} has 7999 labels but", f"{FILES[0]} has 8000 images"]),
}


@pytest.mark.parametrize("kind", list(BAD_DATA))
def test_bad_data_fails_naming_the_file(kind, tmp_path, mirror, slurm_controller):
    rule, needles = BAD_DATA[kind]
    if kind == "wrong-checksum":
        bad = tmp_path / "bad"
        bad.mkdir()
        for name in FILES:
            (bad / name).write_bytes(b"not the real file " + name.encode())
        md5 = mirror.md5
    else:
        bad = tmp_path / "bad"
        md5 = _bad_mirror_files(kind, mirror.directory, bad)
    with offline.serve(bad) as url:
        wf = fresh(tmp_path / "wf", {"dataset": {"mirrors": [url], "md5": md5, "timeout_s": 5, "retries": 0}})
        result = wf.snakemake("--cores", "2", "--show-failed-logs", "results/data/mnist/train.npz", check=False, timeout=180)
    out = result.stdout + result.stderr
    assert result.returncode != 0
    assert f"Error in rule {rule}" in out, out[-3000:]
    for needle in needles:
        assert needle in out, (needle, out[-4000:])
    assert not wf.path("results/data/mnist/train.npz").exists()
    if rule == "download":
        assert not any(wf.path(f"results/data/mnist/raw/{name}").exists() for name in FILES)


@pytest.mark.parametrize("kind", ["timeout", "missing-file-url"])
def test_unreachable_mirror_fails_within_its_timeout_naming_it(kind, tmp_path, slurm_controller):
    with broken_mirror(tmp_path, "silent") as server:
        url = server.url
        if kind == "missing-file-url":
            url = (tmp_path / "no" / "such" / "folder").as_uri() + "/"
        wf = fresh(tmp_path / "wf", {"dataset": {"mirrors": [url], "timeout_s": 1, "retries": 1}})
        t0 = time.monotonic()
        result = wf.snakemake("--cores", "2", "--show-failed-logs", "results/data/mnist/raw/" + FILES[0], check=False, timeout=120)
        elapsed = time.monotonic() - t0
    out = result.stdout + result.stderr
    assert result.returncode != 0
    assert f"could not download {FILES[0]} from any mirror" in out and url in out, out[-3000:]
    assert ("timed out (attempt 2/2)" if kind == "timeout" else "No such file or directory") in out, out[-3000:]
    assert "file:///path/to/mnist/" in out  # the hint: how to point the workflow at a local copy
    assert elapsed < 60, elapsed
    assert not list(wf.path("results/data/mnist/raw").glob("*.gz"))


# ---- bad input: checkpoints -----------------------------------------------------------------


class _RunsCode:
    """Unpickling this runs code: a checkpoint that holds it must never be loaded."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _write_bad_checkpoint(kind: str, path: Path, identity: dict, marker: Path) -> None:
    import torch

    good = {"state_dict": {"w": torch.zeros(2)}, "epoch": 0, "global_step": 4, "mnistflow_run": identity}
    if kind == "valid":
        torch.save(good, path)
    elif kind == "truncated":
        torch.save(good, path)
        path.write_bytes(path.read_bytes()[:-200])
    elif kind == "garbage":
        path.write_bytes(bytes(range(256)) * 16)
    elif kind == "runs-code":
        torch.save({**good, "extra": _RunsCode(marker)}, path)
    elif kind == "not-a-checkpoint":
        torch.save({"weights": torch.zeros(3)}, path)
    elif kind == "other-settings":
        torch.save({**good, "mnistflow_run": {**identity, "settings": {**identity["settings"], "lr": 0.1}}}, path)
    elif kind == "other-data":
        torch.save({**good, "mnistflow_run": {**identity, "train_data_md5": "0" * 32}}, path)
    elif kind == "other-code":
        torch.save({**good, "mnistflow_run": {**identity, "code_digest": "0" * 16}}, path)
    elif kind == "other-packages":
        torch.save({**good, "mnistflow_run": {**identity, "packages": {**identity["packages"], "torch": "2.0.0"}}}, path)
    elif kind == "unstamped":
        torch.save({k: v for k, v in good.items() if k != "mnistflow_run"}, path)


CHECKPOINTS = {
    # kind: (set aside as, what the warning says)
    "truncated": ("corrupt", "cannot be loaded with weights_only=True (RuntimeError: PytorchStreamReader failed"),
    "garbage": ("corrupt", "cannot be loaded with weights_only=True (UnpicklingError: Unsupported operand 0)"),
    "runs-code": ("corrupt", "cannot be loaded with weights_only=True (UnpicklingError: Trying to load unsupported GLOBAL posix.system"),
    "not-a-checkpoint": ("corrupt", "is not a Lightning checkpoint"),
    "other-settings": ("foreign", "was written for other settings, data, code or packages (settings.lr: 0.1 -> 0.003)"),
    "other-data": ("foreign", "train_data_md5: '00000000000000000000000000000000' -> "),
    "other-code": ("foreign", "(code_digest: '0000000000000000' -> 'c0de'"),
    "other-packages": ("foreign", "(packages.torch: '2.0.0' -> '2.14.1')"),
    "unstamped": ("foreign", "(it records no run settings)"),
}


@pytest.mark.parametrize("kind", list(CHECKPOINTS))
def test_unusable_checkpoint_is_set_aside_with_a_warning(kind, tmp_path, caplog):
    from mnistflow.resume import usable_checkpoint

    train_npz = tmp_path / "train.npz"
    train_npz.write_bytes(b"training data")
    identity = {"settings": {"lr": 0.003, "model": "mlp"}, "val_size": 100, "train_limit": 0, "train_data_md5": data.md5sum(train_npz),
                "code_digest": "c0de", "packages": {"torch": "2.14.1", "numpy": "2.4.6"}}
    last, logs, marker = tmp_path / "last.ckpt", tmp_path / "logs", tmp_path / "code-ran"
    logs.mkdir()
    (logs / "metrics.csv").write_text("epoch,step\n0,3\n")
    _write_bad_checkpoint(kind, last, identity, marker)
    original = last.read_bytes()
    assert usable_checkpoint(last, identity, logs) is None
    reason, message = CHECKPOINTS[kind]
    assert message in caplog.text, caplog.text
    assert "training starts from epoch 0" in caplog.text
    aside = list(tmp_path.glob(f"last.ckpt.{reason}-*"))
    assert len(aside) == 1 and aside[0].read_bytes() == original  # kept, byte for byte
    assert not last.exists() and not logs.exists() and list(tmp_path.glob(f"logs.{reason}-*"))
    assert not marker.exists(), "loading the checkpoint ran code from it"


def test_logs_of_another_identity_without_a_checkpoint_are_set_aside(tmp_path, caplog):
    """An attempt killed before its first epoch ended leaves logs and no checkpoint; after a
    change of settings the next attempt must not count it among its own."""
    from mnistflow.resume import Attempt, identity_digest, read_attempts, usable_checkpoint

    old, new = {"settings": {"lr": 0.1}}, {"settings": {"lr": 0.003}}
    logs = tmp_path / "logs"
    Attempt(logs, old).begin()
    assert usable_checkpoint(tmp_path / "last.ckpt", new, logs) is None
    assert not logs.exists() and f"holds attempts of another identity ({identity_digest(old)})" in caplog.text
    [aside] = tmp_path.glob("logs.foreign-*")
    assert [a["identity"] for a in read_attempts(aside / "attempts.jsonl")] == [identity_digest(old)]
    # the same identity's logs stay: the retry is the next attempt of the same training
    Attempt(logs, new).begin()
    assert usable_checkpoint(tmp_path / "last.ckpt", new, logs) is None and logs.exists()
    second = Attempt(logs, new)
    second.begin()
    assert [a["attempt"] for a in second.all()] == [1, 2] and second.all()[0]["ended"] is None


def test_valid_checkpoint_is_resumed_and_evaluation_refuses_pickled_code(tmp_path):
    import pickle

    from mnistflow.evaluate import load_model
    from mnistflow.resume import usable_checkpoint

    identity = {"settings": {"lr": 0.003}, "val_size": 0, "train_limit": 0, "train_data_md5": "x"}
    last = tmp_path / "last.ckpt"
    _write_bad_checkpoint("valid", last, identity, tmp_path / "unused")
    assert usable_checkpoint(last, identity, tmp_path / "logs") == last and last.exists()
    # the evaluation loads model.ckpt with weights_only=True too
    marker = tmp_path / "code-ran"
    _write_bad_checkpoint("runs-code", tmp_path / "model.ckpt", identity, marker)
    with pytest.raises(pickle.UnpicklingError, match="posix.system"):
        load_model(tmp_path / "model.ckpt")
    assert not marker.exists()


def test_corrupt_then_foreign_last_ckpt_through_the_workflow(prepared):
    """A corrupt last.ckpt, then one left by other settings (an lr change): both set aside,
    training restarts at epoch 0 and runs every epoch (before: a cryptic unpickling error,
    and a settings change silently 'resumed' the old run)."""
    wf = prepared
    wf.write_config("extra.yaml", {"dataset": TINY, "runs": {"ck": {"model": "mlp", "epochs": 2, "lr": 0.003}}})
    ckpt_dir = wf.path("results/runs/ck/checkpoints")
    ckpt_dir.mkdir(parents=True)
    (ckpt_dir / "last.ckpt").write_bytes(b"\x80\x02 not a checkpoint" * 100)
    wf.snakemake("--cores", "2", "results/runs/ck/train.json", timeout=300)
    log = wf.path("results/logs/train/ck.log").read_text()
    assert "last.ckpt cannot be loaded with weights_only=True" in log and "set aside as last.ckpt.corrupt-" in log, log[-3000:]
    record = json.loads(wf.path("results/runs/ck/train.json").read_text())
    assert record["resumed_from"] is None and record["epochs"] == 2
    steps = record["global_step"]
    assert [p.read_bytes()[:4] for p in ckpt_dir.glob("last.ckpt.corrupt-*")] == [b"\x80\x02 n"]
    assert not (ckpt_dir / "last.ckpt").exists()  # the finished run's resume state is retired

    # a checkpoint of the lr-0.003 training left behind (as an unfinished run of it would),
    # then the lr changes
    shutil.copy(wf.path("results/runs/ck/model.ckpt"), ckpt_dir / "last.ckpt")
    wf.write_config("extra.yaml", {"dataset": TINY, "runs": {"ck": {"model": "mlp", "epochs": 2, "lr": 0.01}}})
    wf.snakemake("--cores", "2", "results/runs/ck/train.json", timeout=300)
    log = wf.path("results/logs/train/ck.log").read_text()
    assert "was written for other settings, data, code or packages (settings.lr: 0.003 -> 0.01)" in log, log[-3000:]
    record = json.loads(wf.path("results/runs/ck/train.json").read_text())
    assert record["resumed_from"] is None and record["epochs"] == 2 and record["global_step"] == steps
    assert epochs_logged(wf.path("results/runs/ck/metrics.csv")) == [0, 1]
    assert len(list(ckpt_dir.glob("last.ckpt.foreign-*"))) == 1


# ---- faults: download -----------------------------------------------------------------------


def test_download_killed_half_way_is_never_accepted(tmp_path, mirror, slurm_controller):
    raw = "results/data/mnist/raw"
    with broken_mirror(mirror.directory, "stall") as server:
        wf = fresh(tmp_path / "wf", {"dataset": {"mirrors": [server.url], "md5": mirror.md5, "timeout_s": 60, "retries": 0}})
        with background(wf, "--cores", "2", *(f"{raw}/{n}" for n in FILES)) as bg:
            wait_for(server.half_sent.is_set, 120, "the first half of the first file")
            partial = wait_for(lambda: list(wf.path(raw).glob(f".{FILES[0]}.*.part")), 10, "the partial file")
            os.kill(one_process(wf, "data"), signal.SIGKILL)
            assert bg.wait(60) != 0
    assert "Error in rule download" in bg.output()
    assert partial[0].exists() and partial[0].stat().st_size < (mirror.directory / FILES[0]).stat().st_size
    assert not any(wf.path(f"{raw}/{name}").exists() for name in FILES), "a partial file under its final name"

    wf.write_config("mirror.yaml", mirror.overlay())  # the mirror is back
    wf.snakemake("--cores", "2", *(f"{raw}/{n}" for n in FILES), timeout=120)
    for name in FILES:
        assert data.md5sum(wf.path(f"{raw}/{name}")) == mirror.md5[name]
    assert not list(wf.path(raw).glob(".*.part")), "the killed download's partial file was left behind"
    assert "removing the partial file of an interrupted download" in wf.path("results/logs/download.log").read_text()


def test_download_that_breaks_off_is_retried(tmp_path, mirror, slurm_controller):
    with broken_mirror(mirror.directory, "cut") as server:
        wf = fresh(tmp_path / "wf", {"dataset": {"mirrors": [server.url], "md5": mirror.md5, "timeout_s": 5, "retries": 1}})
        wf.snakemake("--cores", "2", *(f"results/data/mnist/raw/{n}" for n in FILES), timeout=120)
    assert server.requests == {name: 2 for name in FILES}
    log = wf.path("results/logs/download.log").read_text()
    assert "the transfer broke off) (attempt 1/2)" in log, log
    for name in FILES:
        assert data.md5sum(wf.path(f"results/data/mnist/raw/{name}")) == mirror.md5[name]


def test_download_that_stalls_times_out_and_leaves_nothing(tmp_path, mirror, slurm_controller):
    with broken_mirror(mirror.directory, "stall") as server:
        wf = fresh(tmp_path / "wf", {"dataset": {"mirrors": [server.url], "md5": mirror.md5, "timeout_s": 1, "retries": 1}})
        result = wf.snakemake("--cores", "2", "--show-failed-logs", f"results/data/mnist/raw/{FILES[0]}", check=False, timeout=120)
    out = result.stdout + result.stderr
    assert result.returncode != 0 and "timed out (attempt 2/2)" in out, out[-3000:]
    raw = wf.path("results/data/mnist/raw")
    assert not raw.exists() or not list(raw.iterdir())  # neither the file nor a partial one
    wf.write_config("mirror.yaml", mirror.overlay())  # the mirror is back
    wf.snakemake("--cores", "2", f"results/data/mnist/raw/{FILES[0]}", timeout=120)
    assert data.md5sum(raw / FILES[0]) == mirror.md5[FILES[0]]


# ---- faults: training -----------------------------------------------------------------------


def _assert_resumed_to_the_end(wf: Workflow, run: str, epochs: int = 3):
    record = json.loads(wf.path(f"results/runs/{run}/train.json").read_text())
    resumed = record["resumed_from"]
    assert resumed and resumed["checkpoint"].endswith("checkpoints/last.ckpt"), resumed
    # the checkpoint it resumed from was the same training's: its identity is the run's
    assert resumed["identity"] == record["attempts"][-1]["identity"] and resumed["written_by_attempt"] >= 1, record["attempts"]
    # every epoch trained exactly once: the steps of `epochs` epochs, one validation row each
    assert record["epochs"] == epochs and record["global_step"] == epochs * STEPS_PER_EPOCH, record
    assert epochs_logged(wf.path(f"results/runs/{run}/metrics.csv")) == list(range(epochs))
    assert load_checkpoint(wf.path(f"results/runs/{run}/model.ckpt"))["global_step"] == epochs * STEPS_PER_EPOCH
    return record


def test_training_killed_mid_epoch_resumes_from_last_ckpt(prepared):
    wf = prepared
    wf.write_config("extra.yaml", {"dataset": SHORT, "runs": {"killed": dict(THREE_EPOCHS)}})
    last = wf.path("results/runs/killed/checkpoints/last.ckpt")
    with background(wf, "--cores", "2", "results/runs/killed/train.json") as bg:
        wait_for(last.exists, 240, "the first epoch's checkpoint")
        time.sleep(0.5)  # into the second epoch
        os.kill(one_process(wf, "train", "killed"), signal.SIGKILL)
        assert bg.wait(60) != 0
    assert "Error in rule train" in bg.output() and not wf.path("results/runs/killed/train.json").exists()
    assert load_checkpoint(last)["epoch"] < 2

    wf.snakemake("--cores", "2", "--rerun-incomplete", "results/runs/killed/train.json", timeout=300)
    _assert_resumed_to_the_end(wf, "killed")


# SIGTERM (at the time limit, on preemption) takes the same path, with the uninterrupted run's
# weights compared: tests/test_rerun.py, single-term and ddp-term.
@pytest.mark.parametrize("signame", ["SIGUSR1"])
def test_stop_signal_saves_mid_epoch_and_retry_resumes(prepared, signame):
    """SIGUSR1 (what Slurm sends before the time limit): the run saves a checkpoint at the
    next batch, exits 75, and Snakemake's retry resumes from it at the next batch."""
    wf = prepared
    wf.write_config("extra.yaml", {"dataset": SHORT, "runs": {"preempted": dict(THREE_EPOCHS)}})
    last = wf.path("results/runs/preempted/checkpoints/last.ckpt")
    with background(wf, "--cores", "2", "--retries", "1", "--show-failed-logs", "results/runs/preempted/train.json") as bg:
        wait_for(last.exists, 240, "the first epoch's checkpoint")
        time.sleep(0.5)  # into the second epoch
        os.kill(one_process(wf, "train", "preempted"), getattr(signal, signame))
        assert bg.wait(300) == 0, bg.output()[-5000:]
    out = bg.output()
    assert f"{signame} received: saved a mid-epoch checkpoint at epoch" in out, out[-5000:]
    assert "exiting 75 so a retry or requeue resumes" in out, out[-5000:]
    record = _assert_resumed_to_the_end(wf, "preempted")
    first, last_attempt = record["attempts"][0], record["attempts"][-1]
    stopped = re.fullmatch(rf"preempted: {signame} received; stopped after saving epoch (\d+), step (\d+) \(mid-epoch\)", first["outcome"])
    assert stopped, record["attempts"]
    # the retry resumed from the checkpoint written at the step the signal stopped
    assert record["resumed_from"]["mid_epoch"] and record["resumed_from"]["global_step"] == int(stopped.group(2))
    assert last_attempt["outcome"] == "finished" and len(record["attempts"]) == 2
    assert first["steps_trained"] + last_attempt["steps_trained"] == record["global_step"]


def test_stop_signal_before_training_starts_is_on_record_and_the_retry_starts_cleanly(prepared):
    """SIGTERM while the job imports torch and loads data (a preemption right after the start):
    the attempt ends on record, exit 75, and the retry trains from epoch 0."""
    wf = prepared
    wf.write_config("extra.yaml", {"dataset": TINY, "runs": {"early": {"model": "mlp", "epochs": 1}}})
    attempts = wf.path("results/runs/early/logs/attempts.jsonl")
    with background(wf, "--cores", "2", "--retries", "1", "results/runs/early/train.json") as bg:
        wait_for(attempts.exists, 120, "the attempt's start on record")
        os.kill(one_process(wf, "train", "early"), signal.SIGTERM)
        assert bg.wait(300) == 0, bg.output()[-5000:]
    record = json.loads(wf.path("results/runs/early/train.json").read_text())
    first, second = record["attempts"]
    assert first["outcome"] == "preempted: SIGTERM received before training started" and first["ended"], first
    assert first["steps_trained"] == 0 and second["outcome"] == "finished" and second["resumed_from"] is None
    assert record["resumed_from"] is None and record["epochs"] == 1


GLOO_TIMEOUTS = ("Timed out waiting 10000ms", "Application timeout caused pair closure")


def test_dead_or_hung_ddp_rank_fails_in_bounded_time_naming_it_then_resumes(prepared):
    wf = prepared
    wf.write_config("extra.yaml", {"dataset": SHORT, "runs": {"ddp": {**THREE_EPOCHS, "nodes": 2, "devices": 1}}})
    env = {"MNISTFLOW_COLLECTIVE_TIMEOUT_S": "10"}
    target = "results/runs/ddp/train.json"
    last = wf.path("results/runs/ddp/checkpoints/last.ckpt")
    log = wf.path("results/logs/train/ddp.log")

    # 1. node rank 1 hangs (SIGSTOP: alive, silent): rank 0 gives up after the collective timeout
    with background(wf, "--cores", "2", target, env=env) as bg:
        wait_for(last.exists, 240, "the first epoch's checkpoint")
        os.kill(one_process(wf, "train", "ddp", node_rank=1), signal.SIGSTOP)
        t0 = time.monotonic()
        assert bg.wait(120) != 0
        hung_s = time.monotonic() - t0
    text = log.read_text()
    assert hung_s < 10 + 10 + 20, hung_s  # collective timeout + the launcher's grace + start-up slack
    # gloo words its timeout by where rank 0 waits: a receive, or the DDP reducer's all-reduce
    assert any(m in text for m in GLOO_TIMEOUTS) and "node rank 0 exited with code 1" in text, text[-4000:]
    assert "node rank 1 did not stop within 10 s of SIGTERM" in text

    # 2. node rank 1 dies (SIGKILL) mid-epoch: the job fails at once, naming it
    with background(wf, "--cores", "2", target, env=env) as bg:
        wait_for(lambda: "Restored all states from the checkpoint" in log.read_text() if log.exists() else False, 240, "the resume")
        os.kill(one_process(wf, "train", "ddp", node_rank=1), signal.SIGKILL)
        t0 = time.monotonic()
        assert bg.wait(120) != 0
        dead_s = time.monotonic() - t0
    text = log.read_text()
    assert dead_s < 30, dead_s
    assert "node rank 1 was killed by SIGKILL" in text, text[-4000:]

    # 3. the retry resumes and ends with every epoch
    wf.snakemake("--cores", "2", "--rerun-incomplete", target, env=env, timeout=300)
    record = _assert_resumed_to_the_end(wf, "ddp")
    assert record["world_size"] == 2 and record["num_nodes"] == 2
    print(f"hung rank: job failed {hung_s:.1f} s after SIGSTOP; dead rank: {dead_s:.1f} s after SIGKILL")


def test_snakemake_killed_mid_run_resumes_and_redoes_nothing_finished(tmp_path, mirror, slurm_controller):
    """The login node dies (SIGKILL to Snakemake and its jobs) while training runs."""
    wf = fresh(tmp_path / "wf", mirror.overlay())
    wf.write_config("extra.yaml", {"dataset": SHORT, "runs": {"sk": dict(THREE_EPOCHS)}})
    target = "results/runs/sk/train.json"
    finished = [f"results/data/mnist/raw/{n}" for n in FILES] + list(PREPARED)
    last = wf.path("results/runs/sk/checkpoints/last.ckpt")
    with background(wf, "--cores", "2", target) as bg:
        wait_for(last.exists, 300, "training under way")
        before = fingerprint(wf, finished)
        bg.kill_group()
    assert not wf.path(target).exists()

    locked = wf.snakemake("--cores", "2", target, check=False, timeout=120)
    assert locked.returncode != 0 and "--unlock" in locked.stdout + locked.stderr  # Snakemake says what to do
    wf.snakemake("--unlock", "--cores", "1", timeout=120)
    plan = wf.snakemake("--dry-run", "--cores", "2", "--rerun-incomplete", target, timeout=120).stdout
    assert planned_jobs(plan) == {"train/sk"}, plan
    wf.snakemake("--cores", "2", "--rerun-incomplete", target, timeout=300)
    assert fingerprint(wf, finished) == before, "a finished job's output was redone"
    _assert_resumed_to_the_end(wf, "sk")


def test_disk_full_while_checkpointing_or_writing_results(prepared):
    wf = prepared
    wf.write_config("extra.yaml", {"dataset": TINY, "runs": {"full": {"model": "mlp", "epochs": 2}}})
    ckpt_dir = wf.path("results/runs/full/checkpoints")
    # an MLP checkpoint is ~2.4 MB: the first fits, the second (written beside it, then renamed) does not
    with tmpfs(ckpt_dir, "4m"):
        result = wf.snakemake("--cores", "2", "--show-failed-logs", "results/runs/full/train.json", check=False, timeout=300)
        out = result.stdout + result.stderr
        assert result.returncode != 0
        assert "disk full: No space left on device" in out and "last.ckpt (the last finished epoch) is intact" in out, out[-4000:]
        assert [p.name for p in ckpt_dir.iterdir()] == ["last.ckpt"]  # no partial file left
        assert load_checkpoint(ckpt_dir / "last.ckpt")["epoch"] == 0
        subprocess.run(["mount", "-o", "remount,size=64m", str(ckpt_dir)], check=True)  # space freed
        wf.snakemake("--cores", "2", "results/runs/full/train.json", timeout=300)
        record = json.loads(wf.path("results/runs/full/train.json").read_text())
        assert record["resumed_from"] and record["epochs"] == 2
        assert not (ckpt_dir / "last.ckpt").exists()  # retired once the run finished

    eval_dir = wf.path("results/runs/full/eval")
    with tmpfs(eval_dir, "16k"):  # room for the CSVs, not for the plots
        result = wf.snakemake("--cores", "2", "--show-failed-logs", "results/runs/full/eval/metrics.json", check=False, timeout=300)
        out = result.stdout + result.stderr
        assert result.returncode != 0 and "disk full: No space left on device" in out, out[-4000:]
        assert not list(eval_dir.iterdir()), "a failed job's output (or a partial file) was left"
    wf.snakemake("--cores", "2", "results/runs/full/eval/metrics.json", timeout=300)
    assert json.loads(wf.path("results/runs/full/eval/metrics.json").read_text())["samples"] == 2000


# ---- load -----------------------------------------------------------------------------------


def test_sixty_run_sweep_plans_in_seconds(prepared):
    wf = prepared
    grid = {"lr": [0.001, 0.003, 0.01], "seed": [1, 2, 3, 4], "batch_size": [32, 64, 96, 128, 256]}
    wf.write_config("extra.yaml", {"sweeps": {"big": {"settings": {"model": "mlp"}, "grid": grid}}})
    t0 = time.monotonic()
    plan = wf.snakemake("--dry-run", "--cores", "2", timeout=120).stdout
    elapsed = time.monotonic() - t0
    jobs = planned_jobs(plan)
    assert sum(j.startswith("train/big_") for j in jobs) == 60 and sum(j.startswith("evaluate/big_") for j in jobs) == 60
    print(f"60-run sweep: dry run in {elapsed:.1f} s")
    assert elapsed < 20, elapsed


def test_twenty_run_sweep_never_oversubscribes_two_cores(prepared):
    """Snakemake starts jobs only while their threads fit in --cores, and passes each job's
    threads to its process (`--job-threads`), which trains with no more (its record says)."""
    wf = prepared
    grid = {"lr": [0.001, 0.002, 0.003, 0.005, 0.01], "seed": [1, 2, 3, 4]}
    wf.write_config("extra.yaml", {"dataset": {"train_limit": 300, "val_size": 100},
                                   "sweeps": {"tiny": {"settings": {"model": "mlp", "epochs": 1}, "grid": grid}}})
    runs = [f"tiny_lr-{lr}_seed-{seed}" for lr in grid["lr"] for seed in grid["seed"]]
    samples: list[dict[str, int]] = []  # {run: threads} of the jobs running at one instant
    done = threading.Event()

    def sample():
        while not done.is_set():
            found = {}
            for pid in job_processes(wf, "train"):
                try:
                    args = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
                    found[pid] = (args[args.index("--run") + 1], int(args[args.index("--job-threads") + 1]))
                except (OSError, ValueError, IndexError):
                    continue
            # A scan of /proc is not one instant: keep only processes still alive once it ends. A job is
            # counted once, since a forked child (the `git` probe before it execs) shows its parent's cmdline.
            running = {}
            for pid, (run, threads) in found.items():
                if Path(f"/proc/{pid}").exists():
                    running[run] = max(threads, running.get(run, 0))
            samples.append(running)
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.monotonic()
    try:
        # threads per job come from the rules' resources; --set-threads is how a user packs tiny jobs
        wf.snakemake(*(f"results/runs/{r}/train.json" for r in runs), "--cores", "2", "--set-threads", "train=1", timeout=600)
    finally:
        done.set()
        sampler.join()
    elapsed = time.monotonic() - t0
    for run in runs:
        assert json.loads(wf.path(f"results/runs/{run}/train.json").read_text())["threads_per_process"] == 1
    most = max(samples, key=lambda running: sum(running.values()))
    print(f"20-run sweep: trained in {elapsed:.0f} s on --cores 2; most threads at once: {sum(most.values())} "
          f"({len(samples)} samples, {len({run for running in samples for run in running})} training jobs seen)")
    assert sum(most.values()) <= 2, f"more threads than cores: {most}"
    assert sum(most.values()) == 2, "the two cores were never both used"
