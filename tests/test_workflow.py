"""The whole chain with the local executor on real digits from the loopback mirror."""

import json
import subprocess
import zipfile

import pytest

from tests.conftest import REPO, SNAKEMAKE, VENV_BIN

pytestmark = pytest.mark.workflow

EPOCHS = {"single": 1, "multinode": 2}
RULES = ["environment", "download", "prepare", "train", "train_ddp", "evaluate", "summarize", "all"]


@pytest.fixture(scope="module")
def chain(tmp_path_factory, mirror, slurm_controller):
    """Run the default target once; the tests below read what it produced."""
    from tests.conftest import Workflow, copy_workflow

    wf = Workflow(copy_workflow(tmp_path_factory.mktemp("chain")), [".test/config/config.yaml"])
    wf.write_config("mirror.yaml", mirror.overlay())
    wf.write_config("epochs.yaml", {"runs": {"multinode": {"epochs": EPOCHS["multinode"]}}})
    plan = wf.snakemake("--dry-run", "--cores", "2")
    wf.snakemake("--cores", "2")
    wf.snakemake("--report", "results/report.zip")
    wf.snakemake("--report", "results/report.html")
    wf.plan = plan.stdout
    return wf


def test_dry_run_shows_the_whole_chain(chain):
    for rule in RULES:
        assert f"{rule} " in chain.plan or f"rule {rule}:" in chain.plan, rule


def test_environment_record(chain):
    record = json.loads(chain.path("results/env/train_env.json").read_text())
    assert record["packages"]["torch"] and record["packages"]["pytorch-lightning"]
    assert record["cpu_count"] >= 1 and record["executable"]
    # What each run trained on is in its own record, from the node that ran it.
    for run in ("single", "multinode"):
        assert json.loads(chain.path(f"results/runs/{run}/train.json").read_text())["device"]


def test_data_verified_and_prepared(chain, mirror):
    from mnistflow.data import FILES, load_split, md5sum

    for name in FILES:
        assert md5sum(chain.path(f"results/data/mnist/raw/{name}")) == mirror.md5[name]
    images, labels = load_split(chain.path("results/data/mnist/test.npz"))
    assert images.shape == (2000, 28, 28) and len(labels) == 2000


@pytest.mark.parametrize("run", ["single", "multinode"])
def test_runs_trained_and_evaluated(chain, run):
    record = json.loads(chain.path(f"results/runs/{run}/train.json").read_text())
    metrics = json.loads(chain.path(f"results/runs/{run}/eval/metrics.json").read_text())
    assert record["epochs"] == EPOCHS[run] and record["samples_per_s"] > 0
    # the examples CNN, one epoch on 7,500 real digits, tested on 2,000 others
    assert 0.93 < metrics["accuracy"] <= 1.0, metrics["accuracy"]
    assert 0 < metrics["loss"] < 0.4
    assert len(metrics["per_class"]) == 10 and all(c["support"] > 0 for c in metrics["per_class"])
    for name in ("confusion_matrix.png", "learning_curves.png", "confusion_matrix.csv", "per_class.csv"):
        assert chain.path(f"results/runs/{run}/eval/{name}").stat().st_size > 0
    # a finished run's resume state is retired: its logs kept aside, no last.ckpt to resume from
    assert not chain.path(f"results/runs/{run}/checkpoints/last.ckpt").exists()
    attempts = chain.path(f"results/runs/{run}/logs.finished/attempts.jsonl").read_text().splitlines()
    assert [json.loads(a)["outcome"] for a in attempts] == ["finished"] == [a["outcome"] for a in record["attempts"]]


def test_multinode_run_really_ran_ddp_across_node_processes(chain):
    record = json.loads(chain.path("results/runs/multinode/train.json").read_text())
    assert record["world_size"] == 2 and record["num_nodes"] == 2 and record["strategy"] == "DDPStrategy"
    assert record["granted"]["launcher"] == "local"
    node_ranks = {h.split("/")[1] for h in record["hosts"]}
    assert node_ranks == {"node0", "node1"}
    log = chain.path("results/logs/train/multinode.log").read_text()
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in log


def test_training_log_shows_each_epochs_progress_and_no_noise(chain):
    """The 2-epoch DDP run's log (what `tail -f` shows): rank 0's line for each epoch, with the
    figures metrics.csv has for it; none of the lines that are not the user's to act on."""
    import csv
    import re

    log = chain.path("results/logs/train/multinode.log").read_text()
    lines = re.findall(r"epoch (\d+)/2 done \(step (\d+)\): train_loss ([\d.]+), val_loss ([\d.]+), val_acc ([\d.]+); "
                       r"(\d+) samples/s; elapsed (\d+:\d\d:\d\d), about (\d+:\d\d:\d\d) left", log)
    assert [line[0] for line in lines] == ["1", "2"], log[-3000:]
    epochs: dict = {}  # the CSV has the epoch's training loss and its validation in two rows
    with open(chain.path("results/runs/multinode/metrics.csv")) as fh:
        for row in csv.DictReader(fh):
            if row["train_loss_epoch"] or row["val_acc"]:
                epochs.setdefault(row["epoch"], {}).update({k: v for k, v in row.items() if v})
    for (_, steps, train_loss, val_loss, val_acc, rate, _, _), row in zip(lines, epochs.values(), strict=True):
        assert int(steps) == int(row["step"]) + 1  # steps done; the CSV numbers the last one from 0
        assert (train_loss, val_loss, val_acc) == tuple(f"{float(row[k]):.4f}" for k in ("train_loss_epoch", "val_loss", "val_acc"))
        assert int(rate) > 0
    assert lines[-1][-1] == "0:00:00"
    for noise in ("💡 Tip", "The `srun` command is available", "is deprecated", "exists and is not empty"):
        assert noise not in log, noise
    # TensorBoard's event files beside the CSV log: `tensorboard --logdir results/runs`
    for run in EPOCHS:
        assert list(chain.path(f"results/runs/{run}/logs.finished").glob("events.out.tfevents.*")), run


def test_summary_compares_runs(chain):
    table = chain.path("results/summary/runs.md").read_text()
    assert "| single | fast_cnn | 1 | 1 | 1 |" in table and "| multinode | fast_cnn | 2 | 1 | 2 |" in table
    assert chain.path("results/summary/runs.png").read_bytes()[:4] == b"\x89PNG"


def test_report_contains_plots_and_captions(chain):
    with zipfile.ZipFile(chain.path("results/report.zip")) as report:
        names = report.namelist()
        pngs = [n for n in names if n.endswith(".png")]
        assert sum("confusion_matrix" in n for n in pngs) == 2 and sum("learning_curves" in n for n in pngs) == 2
        assert any("runs.png" in n for n in pngs)
        html = "".join(report.read(n).decode(errors="ignore") for n in names if n.endswith((".html", ".js")))
        assert "Confusion matrix of run" in html


def test_report_in_a_browser_shows_the_run_table_provenance_and_plots(chain):
    """`results/report.html` in headless Chromium, used as a reader does: open the Summary
    category, open the runs page, read the tables from the rendered DOM. The screenshot is kept
    in test-artifacts/report.png."""
    from tests.browser import Browser
    from tests.conftest import REPO

    with Browser() as browser:
        browser.open(chain.path("results/report.html").resolve().as_uri())
        menu = "[...document.querySelectorAll('a')].filter(a => a.textContent.trim() === 'Summary')"
        browser.wait_for(f"{menu}.length > 0")
        browser.evaluate(f"{menu}[0].click()")
        # the category's results: the charts, the sweep plot and the runs page, by file name
        listed = browser.wait_for("""(() => { const names = [...document.querySelectorAll('tr')].map(r => r.textContent);
            return ['runs.png', 'sweeps.png', 'runs.html'].every(n => names.some(t => t.includes(n))) && names; })()""")
        assert any("runs.html" in row for row in listed), listed
        browser.evaluate("""[...document.querySelectorAll('tr')].find(r => r.textContent.includes('runs.html'))
            .querySelector('td:last-child a').click()""")
        rows = browser.wait_for("[...document.querySelectorAll('#runs tbody tr')].map(r => [...r.cells].map(c => c.textContent))",
                                frame_index=1)
        head = browser.evaluate("[...document.querySelectorAll('#runs th')].map(c => c.textContent)", browser.frames()[1])
        table = {row[0]: dict(zip(head, row)) for row in rows}
        assert set(table) == {"single", "multinode"}, table
        for run in table:
            metrics = json.loads(chain.path(f"results/runs/{run}/eval/metrics.json").read_text())
            assert table[run]["test_accuracy"] == str(round(metrics["accuracy"], 4)), table[run]
            assert float(table[run]["samples_per_s"]) > 0 and float(table[run]["train_s"]) > 0
        provenance = browser.evaluate(
            "[...document.querySelectorAll('#provenance tbody tr')].map(r => [...r.cells].map(c => c.textContent))", browser.frames()[1])
        record = json.loads(chain.path("results/runs/multinode/train.json").read_text())
        by_run = {row[0]: row for row in provenance}
        assert record["provenance"]["code_digest"][:12] in by_run["multinode"] and "1: finished" in by_run["multinode"], by_run
        assert "torch 2.14.1" in " ".join(by_run["single"]) and "none (local)" in by_run["single"], by_run
        per_class = browser.evaluate("document.querySelectorAll('details table tbody tr').length", browser.frames()[1])
        assert per_class == 2 * 10
        browser.screenshot(REPO / "test-artifacts" / "report.png")
    assert (REPO / "test-artifacts" / "report.png").read_bytes()[:4] == b"\x89PNG"


def test_second_run_has_nothing_to_do(chain):
    out = chain.snakemake("--dry-run", "--cores", "2").stdout
    assert "Nothing to be done" in out


def test_bad_config_fails_before_any_job_naming_the_key(make_workflow):
    wf = make_workflow("badcfg", extra={"train": {"batch_size": -4}, "runs": {"single": {"devices": "two"}}})
    result = wf.snakemake("--dry-run", check=False)
    assert result.returncode != 0
    err = result.stdout + result.stderr
    assert "-4 is less than the minimum of 1" in err and "batch_size" in err


def test_indivisible_batch_rejected(make_workflow):
    wf = make_workflow("divide", extra={"runs": {"three": {"nodes": 3, "batch_size": 100}}})
    result = wf.snakemake("--dry-run", check=False)
    assert result.returncode != 0
    assert "runs.three.batch_size: 100 does not divide across nodes x devices = 3" in result.stdout + result.stderr


def test_lint_clean():
    result = subprocess.run([SNAKEMAKE, "--lint"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_snakefmt_clean():
    result = subprocess.run([str(VENV_BIN / "snakefmt"), "--check", "Snakefile", "workflow/rules"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_without_internet_the_download_fails_fast_and_says_what_to_do(tmp_path_factory, slurm_controller):
    """`make run` with torchvision's mirrors unreachable: a clear error within a minute."""
    import time

    from tests.conftest import Workflow, copy_workflow

    wf = Workflow(copy_workflow(tmp_path_factory.mktemp("offline")), [])
    started = time.monotonic()
    result = wf.snakemake("--cores", "1", "results/data/mnist/raw/train-images-idx3-ubyte.gz", check=False, timeout=120)
    elapsed = time.monotonic() - started
    if result.returncode == 0:
        pytest.skip("this machine reached torchvision's MNIST mirrors: nothing offline to test")
    log = wf.path("results/logs/download.log").read_text()
    assert elapsed < 60, elapsed
    assert "could not download train-images-idx3-ubyte.gz from any mirror" in log
    assert "ossci-datasets" in log  # each mirror tried is named with its reason
    assert "point `dataset.mirrors` at a local copy" in log
    assert not list(wf.path("results/data/mnist/raw").glob("*.gz"))
